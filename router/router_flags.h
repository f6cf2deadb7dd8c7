#ifndef MOE_ROUTER_ROUTER_FLAGS_H_
#define MOE_ROUTER_ROUTER_FLAGS_H_

// The router's flags that take one of a fixed set of values. moe-router reads them here, and
// moe-cluster checks them here before it starts a single process, so the two never disagree on
// what is allowed or on how a wrong value is told.

#include "absl/status/statusor.h"
#include "router/placement.h"
#include "services/common/flags.h"

namespace moe::router {

struct RouterChoices {
  Strategy strategy = Strategy::kHybrid;  // --placement (default hybrid)
  bool spill = false;                     // --overflow drop|spill (default drop)
  bool bf16_rows = false;                 // --wire fp32|bf16 (default fp32)
  bool bf16_allreduce = false;            // --allreduce-wire fp32|bf16 (default fp32)
};

// INVALID_ARGUMENT "--FLAG VALUE: use one of A, B, ..." for the first wrong value.
absl::StatusOr<RouterChoices> ParseRouterChoices(const common::Flags& f);

}  // namespace moe::router

#endif  // MOE_ROUTER_ROUTER_FLAGS_H_
