#ifndef MOE_SERVICES_COMMON_FAILPOINT_H_
#define MOE_SERVICES_COMMON_FAILPOINT_H_

// Failpoints for the multi-process tests of failures that no signal sent from outside can time:
// a process started with MOE_FAILPOINT=name fails at the point that checks for `name`. Each one
// is named and described where it is checked.

#include <cstdlib>
#include <string_view>

namespace moe::common {

inline bool Failpoint(std::string_view name) {
  const char* set = std::getenv("MOE_FAILPOINT");
  return set != nullptr && name == set;
}

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_FAILPOINT_H_
