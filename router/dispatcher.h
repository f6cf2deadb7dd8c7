#ifndef MOE_ROUTER_DISPATCHER_H_
#define MOE_ROUTER_DISPATCHER_H_

// Fan-out and reassembly for one batch: the gated assignments go to the shards that host their
// experts (an expert's rows split across its healthy replicas by outstanding work, each token row
// sent once per shard), the expert outputs come back, and the gate-weighted sum is combined in
// the original token order. A shard that fails mid-batch is excluded and its rows are re-sent to
// another replica; an expert left without a healthy replica fails the batch with UNAVAILABLE
// naming it. Asynchronous: nothing blocks between sending and the answers, which are combined on
// the thread that brings the last one. No gRPC here: shards are ShardClients.

#include <cstdint>
#include <functional>
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

// The most token-expert assignments one Dispatch batch may carry when the shard's own limit has
// not been read yet: the shard's default --max-batch-rows.
inline constexpr int64_t kDefaultShardBatchRows = 8192;
// The most bytes of rows one Dispatch batch (and its answer, one output row per assignment) may
// carry: a quarter of the channels' 64 MiB message limit, so that no request the router accepts
// makes a message that gRPC refuses (which ends the whole stream, and every batch on it).
inline constexpr int64_t kMaxDispatchBytes = 16 << 20;

// The most token-expert assignments one batch to `shard` may carry: its --max-batch-rows (the
// default until read), and no more FP32 rows of d_model than `max_bytes` hold, nor than a
// quarter of the shard's largest message.
int64_t MaxBatchAssignments(const ShardClient& shard, int64_t d_model, int64_t max_bytes);

// A shard's plan (per expert, the assignment positions it computes) cut into plans of at most
// `max_rows` positions in all, in order; an expert's positions may be cut between two of them.
std::vector<std::map<int, std::vector<int64_t>>> SplitShardPlan(
    std::map<int, std::vector<int64_t>> plan, int64_t max_rows);

// One Dispatch batch: the shard it goes to (an index of the routing table's shards) and, per
// expert, the assignment positions it computes.
struct ShardBatch {
  int shard;
  std::map<int, std::vector<int64_t>> plan;
};

// Every shard's plan (indexed like `shards`) cut into batches within that shard's limits
// (MaxBatchAssignments of `max_bytes`, then SplitShardPlan), in shard order.
std::vector<ShardBatch> CutIntoBatches(std::vector<std::map<int, std::vector<int64_t>>> plan,
                                       const std::vector<std::shared_ptr<ShardClient>>& shards,
                                       int64_t d_model, int64_t max_bytes);

struct DispatchStats {
  int failovers = 0;  // shard failures recovered by re-sending to another replica
  int64_t shard_batches = 0;
};

struct DispatcherOptions {
  common::WireType wire = common::WireType::kFloat32;
  int max_rounds = 4;  // send rounds per batch (the first plus failovers)
  // Where a batch's answers are decoded and combined: inline on the thread that brought the last
  // answer when the batch has at most `inline_assignments` token-expert assignments (one fewer
  // thread hand-off on the latency path), otherwise through `offload` (which returns false when
  // it cannot take the work; then it runs inline). Null `offload`: always inline.
  std::function<bool(std::function<void()>)> offload;
  int64_t inline_assignments = 512;
  // An expert's rows in one batch go to its replicas in pieces of at least this many (the last
  // may be smaller), each to the replica with the least outstanding work: an expert's weights
  // are read once per piece, and the kernel reaches its plateau only at about 64 rows (at 8 rows
  // it runs at half of it, at 1 row at a tenth), so a few rows are not scattered over every
  // replica. Batches still alternate between replicas as their outstanding work changes.
  int64_t min_split_rows = 64;
  // A shard's share of a batch is cut into Dispatch batches of at most MaxBatchAssignments rows.
  int64_t max_batch_bytes = kMaxDispatchBytes;
};

// The Dispatch request for one shard: each token row once, then per expert (ascending) the
// positions of `plan` in order. `local` is scratch of size n filled with -1 (restored on return).
// Its batch_id is new in the process: serving and training batches share each shard's stream,
// whose answers are matched to their batches by id.
std::shared_ptr<v1::DispatchRequest> BuildShardRequest(
    const std::map<int, std::vector<int64_t>>& plan, const ExpertGroups& groups, int k,
    const float* x, int64_t d, common::WireType wire, std::vector<int32_t>* local);

// OK when `outputs` answer `plan` exactly: one per planned expert, none twice and none
// unplanned, each a [rows of the plan, d] matrix; else INTERNAL naming the shard. A shard that
// answered otherwise would leave rows of the combine (or of grad_input) unfilled or filled twice.
absl::Status CheckShardAnswer(const google::protobuf::RepeatedPtrField<v1::ExpertOutput>& outputs,
                              const std::map<int, std::vector<int64_t>>& plan, int64_t d,
                              const std::string& shard);

class Dispatcher {
 public:
  // y [n, d_model] or an error, with the gating the batch was routed by and what it took.
  using Done = std::function<void(absl::StatusOr<std::vector<float>> y, const GatingResult& gating,
                                  const DispatchStats& stats)>;

  Dispatcher(const common::ModelConfig& config, DispatcherOptions options);
  ~Dispatcher();  // Shutdown()

  // Starts the fan-out of tokens x [n, d_model] routed by `gating` and returns without waiting.
  // `done` runs exactly once: on the thread of the last shard answer, on the deadline timer's
  // thread when `deadline` passes first (late answers are then ignored), on an `offload` thread,
  // or on this thread when the batch fails before anything is sent. Batches in flight keep what
  // they need (table, tokens, gating) alive themselves until they finish; a shard that never
  // answers keeps nothing alive. Returns the batch's id for Cancel. `deadline` is on
  // common::MonotonicNow's clock, as every deadline in the router is.
  uint64_t Start(std::shared_ptr<const RoutingTable> table, std::vector<float> x, int64_t n,
                 GatingResult gating, absl::Time deadline, Done done);

  // Ends batch `id` with `why` if it has not finished (its `done` runs now), and asks its shards
  // to drop what they have not begun of it. Nothing when it has finished.
  void Cancel(uint64_t id, absl::Status why);

  // The same, waiting for the answer.
  absl::StatusOr<std::vector<float>> Run(const RoutingTable& table, const float* x, int64_t n,
                                         const GatingResult& gating, absl::Time deadline,
                                         DispatchStats* stats);

  // Fails every batch in flight with UNAVAILABLE (their `done` runs) and every later Start at
  // once, then waits until no batch holds anything (its routing table and shard clients).
  void Shutdown();

  class Call;
  class Token;

 private:
  struct Shared;
  std::shared_ptr<Shared> shared_;  // what calls in flight use; outlives the Dispatcher if needed
};

}  // namespace moe::router

#endif  // MOE_ROUTER_DISPATCHER_H_
