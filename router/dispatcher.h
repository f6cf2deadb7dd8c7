#ifndef MOE_ROUTER_DISPATCHER_H_
#define MOE_ROUTER_DISPATCHER_H_

// Fan-out and reassembly for one batch: the gated assignments go to the shards that host their
// experts (an expert's rows split across its healthy replicas by outstanding work, each token row
// sent once per shard), the expert outputs come back, and the gate-weighted sum is combined in
// the original token order. A shard that fails mid-batch is excluded and its rows are re-sent to
// another replica; an expert left without a healthy replica fails the batch with UNAVAILABLE
// naming it. No gRPC here: shards are ShardClients.

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "router/gating.h"
#include "router/moe_layer.h"
#include "router/placement.h"
#include "router/shard_client.h"
#include "services/common/checkpoint.h"
#include "services/common/tensor_codec.h"

namespace moe::router {

// What one request is routed with: a placement and the shards it names, fixed for the request.
struct RoutingTable {
  Placement placement;
  std::vector<std::shared_ptr<ShardClient>> shards;  // indexed like placement's shard indexes
};

struct DispatchStats {
  int failovers = 0;  // shard failures recovered by re-sending to another replica
  int64_t shard_batches = 0;
};

struct DispatcherOptions {
  common::WireType wire = common::WireType::kFloat32;
  int max_rounds = 4;  // send rounds per batch (the first plus failovers)
};

// The Dispatch request for one shard: each token row once, then per expert (ascending) the
// positions of `plan` in order. `local` is scratch of size n filled with -1 (restored on return).
std::shared_ptr<v1::DispatchRequest> BuildShardRequest(
    const std::map<int, std::vector<int64_t>>& plan, const ExpertGroups& groups, int k,
    const float* x, int64_t d, common::WireType wire, std::vector<int32_t>* local);

class Dispatcher {
 public:
  Dispatcher(const common::ModelConfig& config, DispatcherOptions options);

  // y [n, d_model] for tokens x [n, d_model] routed by `gating`. Never hangs past `deadline`.
  absl::StatusOr<std::vector<float>> Run(const RoutingTable& table, const float* x, int64_t n,
                                         const GatingResult& gating, absl::Time deadline,
                                         DispatchStats* stats);

 private:
  const common::ModelConfig config_;
  const DispatcherOptions options_;
  std::atomic<uint64_t> next_batch_id_{1};
};

}  // namespace moe::router

#endif  // MOE_ROUTER_DISPATCHER_H_
