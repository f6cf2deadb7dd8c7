#ifndef MOE_SERVICES_COMMON_STATUS_MACROS_H_
#define MOE_SERVICES_COMMON_STATUS_MACROS_H_

// Abseil 20220623 has no status macros; these are the project's only copies.

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MOE_STATUS_CONCAT_INNER_(a, b) a##b
#define MOE_STATUS_CONCAT_(a, b) MOE_STATUS_CONCAT_INNER_(a, b)

// Returns `expr` from the enclosing function when it is not OK.
#define RETURN_IF_ERROR(expr)                                   \
  do {                                                          \
    ::absl::Status moe_status_ = (expr);                        \
    if (!moe_status_.ok()) return moe_status_;                  \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());` binds the value or returns the error.
#define ASSIGN_OR_RETURN(lhs, expr) \
  MOE_ASSIGN_OR_RETURN_IMPL_(MOE_STATUS_CONCAT_(moe_statusor_, __LINE__), lhs, expr)

#define MOE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                               \
  if (!statusor.ok()) return statusor.status();         \
  lhs = std::move(statusor).value()

#endif  // MOE_SERVICES_COMMON_STATUS_MACROS_H_
