# Helpers shared by every folder: warnings in one place, moe:: aliases, test targets.

set(MOE_WARNINGS -Wall -Wextra)
if(MOE_WERROR)
  list(APPEND MOE_WARNINGS -Werror)
endif()

if(MOE_SANITIZE)
  # GCC 12 reports false maybe-uninitialized warnings under the sanitizers' instrumentation.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    list(APPEND MOE_WARNINGS -Wno-maybe-uninitialized)
  endif()
  add_compile_options(-fsanitize=${MOE_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${MOE_SANITIZE})
endif()

# moe_library(NAME SRCS ... DEPS ...): a static library NAME with alias moe::NAME.
function(moe_library name)
  cmake_parse_arguments(ARG "" "" "SRCS;DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SRCS})
  add_library(moe::${name} ALIAS ${name})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
  target_compile_options(${name} PRIVATE ${MOE_WARNINGS})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS})
endfunction()

# moe_binary(NAME SRCS ... DEPS ...): an executable in build/bin.
function(moe_binary name)
  cmake_parse_arguments(ARG "" "" "SRCS;DEPS" ${ARGN})
  add_executable(${name} ${ARG_SRCS})
  target_compile_options(${name} PRIVATE ${MOE_WARNINGS})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS})
  if(MOE_FUZZ)
    set_target_properties(${name} PROPERTIES EXCLUDE_FROM_ALL TRUE)
  endif()
endfunction()

# moe_test(NAME SRCS ... DEPS ... [TIMEOUT s] [RESOURCE_LOCK name]): a GoogleTest binary whose
# tests ctest lists one by one (tests sharing a RESOURCE_LOCK never run at the same time).
# Without MOE_BUILD_TESTS it defines nothing; callers guard follow-ups with if(TARGET name).
function(moe_test name)
  if(NOT MOE_BUILD_TESTS)
    return()
  endif()
  cmake_parse_arguments(ARG "" "TIMEOUT;RESOURCE_LOCK" "SRCS;DEPS" ${ARGN})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  set(extra)
  if(ARG_RESOURCE_LOCK)
    set(extra RESOURCE_LOCK ${ARG_RESOURCE_LOCK})
  endif()
  add_executable(${name} ${ARG_SRCS})
  target_compile_options(${name} PRIVATE ${MOE_WARNINGS})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gmock GTest::gtest_main)
  gtest_discover_tests(${name} DISCOVERY_MODE PRE_TEST
    PROPERTIES TIMEOUT ${ARG_TIMEOUT} LABELS unit ${extra})
endfunction()

include(GoogleTest OPTIONAL)
