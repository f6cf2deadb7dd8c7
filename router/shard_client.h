#ifndef MOE_ROUTER_SHARD_CLIENT_H_
#define MOE_ROUTER_SHARD_CLIENT_H_

// The router's view of one expert-shard server. The gRPC implementation keeps one long-lived
// Dispatch stream; tests use in-memory fakes.

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "moe/v1/expert_shard.pb.h"

namespace moe::router {

// A router's placement lease epoch, shared by its shard clients (PlacementLeaseResponse.epoch).
struct LeaseEpochs {
  // The router's, sent with each load and unload (LoadExpertsRequest.lease_epoch); 0: none
  // (no coordinator, or one older than epochs): not checked by the shards.
  std::atomic<uint64_t> held{0};
  // The highest a shard reported (ShardStatus.lease_epoch).
  std::atomic<uint64_t> seen{0};
  void See(uint64_t epoch) {
    uint64_t cur = seen.load();
    while (epoch > cur && !seen.compare_exchange_weak(cur, epoch)) {
    }
  }
};

class ShardClient {
 public:
  using DispatchDone = std::function<void(absl::StatusOr<v1::DispatchResponse>)>;
  virtual ~ShardClient() = default;

  // Sends one batch. `done` runs exactly once, on any thread (possibly before Send returns), with
  // the shard's response or an error: UNAVAILABLE when the shard is down or the stream broke.
  virtual void Dispatch(std::shared_ptr<const v1::DispatchRequest> request, int64_t rows,
                        DispatchDone done) = 0;

  // Asks the shard to drop batch `batch_id`, sent by Dispatch and not answered yet, whose
  // request has ended: the shard answers it CANCELLED unless it has begun computing it. Nothing
  // when it has been answered.
  virtual void CancelBatch(uint64_t /*batch_id*/) {}
  // In rotation: reachable, SERVING, and no stream failure since the last good health check.
  virtual bool healthy() const = 0;
  // Answered its last health check (SERVING or NOT_SERVING): out of rotation but not down
  // when it answers NOT_SERVING (draining, or holding no experts yet).
  virtual bool answering() const { return healthy(); }
  // Asks the shard's health now (instead of at the next periodic check) and updates healthy().
  virtual void CheckHealthNow() = 0;
  // Why the shard is out of rotation, as its health and stream last said, and since when
  // (common::MonotonicNow's clock: the flip out, or the first failure of a shard that has not
  // served yet); `why` is empty while it is in rotation, or when nothing has said.
  struct OutOfRotation {
    std::string why;
    absl::Time since = absl::InfinitePast();
  };
  virtual OutOfRotation out_of_rotation() const { return {}; }
  // Rows sent and not yet answered.
  virtual int64_t outstanding_rows() const = 0;
  // Set by the router when the shard's status shows another model than its own (a shard
  // restarted from another checkpoint): never sent a batch, even as a last resort, until it
  // serves the router's model again (every batch would fail as if the client's tokens were
  // wrong).
  void SetServesOtherModel(bool other) { other_model_.store(other); }
  bool serves_other_model() const { return other_model_.load(); }
  // Set by the router once, before the client is used: whether the shard, out of rotation,
  // still holds a replica in the live placement, or in the one a switch replaced while
  // requests routed on it run (asked when the shard answers NOT_SERVING, after it left
  // rotation). Such a shard (draining) keeps a Dispatch stream open, as the last
  // resort of an expert it holds alone, so that its Drain does not answer "drained" until the
  // router has taken it out of the placement.
  // Called under needed_mu_, so that SetStillNeeded(nullptr) (the router's shutdown) returns
  // only once no call of the old function is running.
  void SetStillNeeded(std::function<bool()> needed) {
    std::lock_guard<std::mutex> lock(needed_mu_);
    needed_ = std::move(needed);
  }
  bool StillNeeded() const {
    std::lock_guard<std::mutex> lock(needed_mu_);
    return needed_ && needed_();
  }
  // The most token-expert assignments the shard takes in one batch (its --max-batch-rows) and
  // the largest message it takes, from the shard's status (the gRPC client reads them from every
  // status the shard answers with); 0 until read, or from a shard too old to report them
  // (which does not know DispatchRequest.cancel either).
  void SetBatchLimits(int64_t rows, int64_t message_bytes) {
    max_batch_rows_.store(rows);
    max_message_bytes_.store(message_bytes);
  }
  int64_t max_batch_rows() const { return max_batch_rows_.load(); }
  // The placement lease epoch in the shard's last status (ShardStatus.lease_epoch); the
  // highest uint64_t until one is read (a test's client never reads one).
  void SetReportedLeaseEpoch(uint64_t epoch) { reported_lease_epoch_.store(epoch); }
  uint64_t reported_lease_epoch() const { return reported_lease_epoch_.load(); }
  int64_t max_message_bytes() const { return max_message_bytes_.load(); }
  virtual const std::string& address() const = 0;

  // Blocking admin calls (used by the placement manager, never on a request path).
  virtual absl::StatusOr<v1::ShardStatus> LoadExperts(const std::vector<int>& experts,
                                                      uint64_t version, const std::string& peer,
                                                      absl::Duration timeout) = 0;
  // Like LoadExperts from `peer`, but the peer's weights replace the shard's also where these are
  // of a later training step: gives back the update of a step that this shard applied and the
  // other replicas aborted (LoadExperts keeps the newer weights).
  virtual absl::StatusOr<v1::ShardStatus> RollBackExperts(const std::vector<int>& experts,
                                                          uint64_t version,
                                                          const std::string& peer,
                                                          absl::Duration timeout) = 0;
  virtual absl::StatusOr<v1::ShardStatus> UnloadExperts(const std::vector<int>& experts,
                                                        uint64_t version,
                                                        absl::Duration timeout) = 0;
  virtual absl::StatusOr<v1::ShardStatus> GetStatus(absl::Duration timeout) = 0;
  // Training and checkpoint calls (blocking, from worker threads).
  virtual absl::StatusOr<v1::BackwardResponse> Backward(const v1::BackwardRequest& request,
                                                        absl::Duration timeout) = 0;
  virtual absl::Status FinishStep(uint64_t step, bool commit, float learning_rate,
                                  absl::Duration timeout) = 0;
  // What the shard knows of a step's outcome (asked when the coordinator's verdict was lost).
  virtual absl::StatusOr<v1::StepOutcome::State> GetStep(uint64_t step,
                                                          absl::Duration timeout) = 0;
  // The expert's current weights as safetensors bytes (ExportExpert).
  virtual absl::StatusOr<std::string> ExportExpert(int expert, absl::Duration timeout) = 0;
  // For the router's shutdown: ends the placement calls in progress (LoadExperts,
  // UnloadExperts, GetStatus, ExportExpert) with CANCELLED, and makes every later one fail so
  // at once, so that no expert load (up to minutes) holds the router's exit. Training calls
  // are left to finish: a step cut off between commit and confirmation is worse than a wait.
  virtual void CancelAdminCalls() {}

 private:
  std::atomic<bool> other_model_{false};
  std::atomic<uint64_t> reported_lease_epoch_{UINT64_MAX};
  mutable std::mutex needed_mu_;
  std::function<bool()> needed_;
  std::atomic<int64_t> max_batch_rows_{0};
  std::atomic<int64_t> max_message_bytes_{0};
};

}  // namespace moe::router

#endif  // MOE_ROUTER_SHARD_CLIENT_H_
