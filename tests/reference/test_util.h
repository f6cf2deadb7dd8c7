#ifndef MOE_TESTS_REFERENCE_TEST_UTIL_H_
#define MOE_TESTS_REFERENCE_TEST_UTIL_H_

#include <unistd.h>

#include <string>

#include <gtest/gtest.h>

namespace moe::testing {

// A path in the test temp directory that no other test process uses (ctest runs in parallel).
inline std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/moe_" + std::to_string(getpid()) + "_" + name;
}

}  // namespace moe::testing

#endif  // MOE_TESTS_REFERENCE_TEST_UTIL_H_
