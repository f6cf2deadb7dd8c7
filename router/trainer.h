#ifndef MOE_ROUTER_TRAINER_H_
#define MOE_ROUTER_TRAINER_H_

// One training step over the cluster: gate forward, training forwards on the shards (which keep
// their activations), backward through the combine and the experts (dX from the shards, expert
// gradients accumulated there), backward through the gate with the auxiliary losses, then the
// commit: replicated experts' gradients are summed over their replicas by ring all-reduce and
// every shard applies SGD, or, if anything failed, every shard drops the step. No gRPC here.

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "moe/v1/coordinator.pb.h"
#include "router/dispatcher.h"
#include "router/gating.h"
#include "services/common/checkpoint.h"

namespace moe::router {

struct TrainParams {
  float learning_rate = 0.f;
  float aux_loss_coef = 0.f;
  float z_loss_coef = 0.f;
  double capacity_factor = 0.0;
  bool bf16_allreduce = false;  // BF16 on the replicas' ring (the sums are rounded to BF16)
};

struct TrainResult {
  uint64_t step = 0;
  std::vector<float> grad_input;   // [N, d_model]
  std::vector<float> gate_weight;  // dL/dWg [E, d_model]
  std::vector<float> gate_bias;    // dL/dbg [E] or empty
  GatingResult gating;
};

class Trainer {
 public:
  // Runs the commit protocol (the coordinator's CommitStep).
  using Committer =
      std::function<absl::StatusOr<v1::CommitStepResponse>(const v1::CommitStepRequest&)>;

  // After a CommitStep that failed (the coordinator died or could not be reached), how long past
  // the step's timeout the coordinator may still send its verdict: its reductions are bounded by
  // the timeout + 1 s and its FinishStep calls by 5 s more (coordinator_server.cc), and 0.5 s is
  // left for messages in flight.
  static constexpr absl::Duration kCoordinatorGrace = absl::Milliseconds(6500);

  Trainer(const common::ModelConfig& config, Committer committer,
          absl::Duration coordinator_grace = kCoordinatorGrace);

  // Numbers the next step past `step` (a training step the shards or the kept gate carry):
  // steps are numbered from the router's start, and a router started before the one that
  // trained last (a spare taking over, a host whose clock is behind) would number below it,
  // and a shard skips an update not later than its weights'. A step at or past 2^63 (no
  // router numbers so: a bad file) is not followed.
  void NumberPast(uint64_t step) {
    if (step >= (uint64_t{1} << 63)) return;
    uint64_t cur = next_step_.load();
    while (cur <= step && !next_step_.compare_exchange_weak(cur, step + 1)) {
    }
  }
  // At the first placement: as at the router's start, from the clock now, and past the latest
  // `step` the shards and the kept gate carry by a gap of 2^20. The router that placed before
  // may have taken steps after its last committed one (aborted when this router took over, or
  // left open by its death, on the shards for a while): a step of this router must not reuse
  // their ids. The clock covers them where it runs ahead of that router's; the gap where not.
  void NumberAfterAnotherRouter(uint64_t step) {
    NumberPast(static_cast<uint64_t>(absl::ToUnixMillis(absl::Now())) << 16);
    if (step > 0) NumberPast(step + (uint64_t{1} << 20));
  }

  // One step on tokens x [n, d_model] with dL/dy = dy. On success the step is committed: every
  // shard has applied its update, or one that did not confirm it is asked again (see
  // RetryConfirmations); the caller applies `gate_weight`/`gate_bias` to the gate. On failure no
  // shard changed a weight: ABORTED (or UNAVAILABLE when an expert has no healthy replica, or
  // while a shard has not confirmed the previous commit). When the coordinator's verdict is lost,
  // the shards are asked what they saw (ResolveLostVerdict), and the step ends committed or
  // aborted everywhere accordingly. A shard that could not be asked may have applied a commit
  // nobody else saw: the step is aborted, and that shard settled before the next step (it
  // aborts too, or its replicas are copied back from the others; see SettleAbort). `deadline`
  // is on common::MonotonicNow's clock.
  absl::StatusOr<TrainResult> Step(const RoutingTable& table, const common::GateWeights& gate,
                                   const float* x, const float* dy, int64_t n,
                                   const TrainParams& params, absl::Time deadline);

  // A committed step whose FinishStep{commit} failed on some shards (unreachable or stalled past
  // the step's timeout) is committed all the same, like any two-phase commit: each such shard is
  // sent FinishStep{commit} again (idempotent on the shard: it applies a step's update once)
  // until it confirms, or it is dropped once it has left `table` (a shard that comes back gets
  // its experts copied from live replicas). No step starts while one is unconfirmed: that
  // shard's weights may lack the update. Called by Step, by the router's control loop, and
  // before any copy of an expert or checkpoint save. Returns OK once every shard has confirmed,
  // else UNAVAILABLE naming a shard that has not. With `drop_absent` false (a placement switch
  // not yet applied), a shard absent from `table` is kept, and only `table`'s shards count: the
  // switch may still fail and leave it in the live table, where it must still be asked.
  // A commit counts only for a shard that holds a replica in `table`: one that holds none has
  // no weight to update; with `live` (a switch's check, `table` its proposal), also for one of
  // `table`'s shards that holds a replica in `live` (it may be the source of a copy). A lost
  // verdict a shard could not be asked about counts wherever the shard is listed.
  absl::Status RetryConfirmations(const RoutingTable& table, bool drop_absent = true,
                                  const RoutingTable* live = nullptr);
  // Forgets the unconfirmed commits of shards absent from `table` (the live table, after a
  // switch that left them out was applied), and of shards that hold no replica in it: a replica
  // placed on one later is copied from a replica that has the update (a load replaces older
  // weights), so it has nothing left to confirm.
  void DropUnconfirmedOutside(const RoutingTable& table);

  // Whether `step` is the id of a step aborted while a shard could not be asked whether it had
  // received the lost verdict, a commit: a replica stamped with it (ExpertStatus.trained_step)
  // carries an update that the other replicas aborted. A listed shard is settled before the next
  // step (SettleAbort); one that left the table first, and came back holding such a replica, is
  // found by the replica's step instead (PlanStaleReplicas). The last kKeptAborts such ids are
  // known, for this router's lifetime.
  bool AbortedUpdate(uint64_t step) const;
  static constexpr size_t kKeptAborts = 1024;

 private:
  // OK when every replica of every expert is on a shard in rotation, else UNAVAILABLE naming one
  // that is not: such a step could not commit, so Step refuses it first.
  static absl::Status EveryReplicaInRotation(const RoutingTable& table);
  // UNAVAILABLE naming one of `table`'s shards that has not confirmed its commit (Counts).
  absl::Status Unconfirmed(const RoutingTable& table, const RoutingTable* live) const;
  // Tells every shard to drop the step's kept activations and gradients, all at once and for at
  // most kAbortTimeout: a stalled shard must not hold the failed call (and the routing table it
  // pins) for longer. A shard the abort does not reach drops the step itself once it is stale.
  static constexpr absl::Duration kAbortTimeout = absl::Seconds(2);
  void AbortEverywhere(const RoutingTable& table, uint64_t step);
  // Two-phase commit's cooperative termination, for a step whose CommitStep failed. A shard that
  // saw a commit proves the coordinator decided to commit; it did so only once every shard had
  // reduced its gradients, so every shard still holds them: true, finish the commit everywhere.
  // A shard that saw an abort (or whose reduction failed) proves the verdict was abort: false.
  // With neither, the shards are asked again every 100 ms until `until`, after which the
  // coordinator can send nothing more: false, abort everywhere. `unanswered` gets the shards
  // that did not answer the last round: any of them may have received a commit.
  bool ResolveLostVerdict(const RoutingTable& table, uint64_t step, absl::Time until,
                          std::vector<std::string>* unanswered);
  // For an unsettled abort (PendingCommit::unsettled_abort) on `shard`: OK once the shard has
  // dropped the step, or, had it applied the step, once its replicas of experts held elsewhere
  // are copied back from a settled replica in rotation (UNAVAILABLE while there is none).
  absl::Status SettleAbort(const RoutingTable& table, size_t shard, uint64_t step,
                           float learning_rate);
  // FinishStep{commit} to every shard at once; one that does not confirm is asked again later.
  void CommitEverywhere(const RoutingTable& table, uint64_t step, float learning_rate,
                        const std::string& reason);

  const common::ModelConfig config_;
  Committer committer_;
  const absl::Duration coordinator_grace_;
  struct PendingCommit {
    uint64_t step = 0;
    float learning_rate = 0.f;
    std::string reason;
    // Not a commit to confirm but an abort to settle: the step was aborted while this shard
    // could not be asked whether it had received the lost verdict, a commit. Until it answers
    // it may hold an update no other replica has, so no step starts (and no copy is made).
    bool unsettled_abort = false;
    // Why the last attempt to settle it failed (empty before the first).
    std::string settle_error;
  };
  // Whether `address`'s entry `u` holds back `table` (see RetryConfirmations).
  static bool Counts(const RoutingTable& table, const RoutingTable* live,
                     const std::string& address, const PendingCommit& u);
  mutable std::mutex unconfirmed_mu_;
  std::map<std::string, PendingCommit> unconfirmed_;  // by shard address
  std::set<uint64_t> aborted_updates_;                // see AbortedUpdate, unconfirmed_mu_
  std::atomic<uint64_t> next_step_;
};

// Replicated experts grouped by their replica set (ring order = shard order).
std::vector<v1::ReplicaGroup> ReplicaGroups(const RoutingTable& table);

// What the router's stale check (before each step, on each control-loop tick, before a save or
// a placement change) does, from the training steps that the replicas of placement `p` hold:
// `at[s]` maps each READY expert of shard s to its ExpertStatus.trained_step (empty for a shard
// not read). For each expert, the latest replica is the one at the latest step that is not an
// aborted update (`aborted`, Trainer::AbortedUpdate), among `p`'s replicas and any trained one
// outside `p` (another router's training); every replica of `p` that was read and holds
// something else is brought to it.
struct StalePlan {
  // Target shard -> source shard -> experts whose target replica is of an older step than the
  // source's: copied again (LoadExperts from the source).
  std::vector<std::map<int, std::vector<int>>> copy;
  // Target shard -> source shard -> experts whose target replica carries an aborted update
  // and whose latest replica is of an older step: given back the source's weights
  // (RollBackExperts, which replaces newer ones; LoadExperts keeps them).
  std::vector<std::map<int, std::vector<int>>> give_back;
  // Experts whose every replica was read and is behind the step the expert had reached (the
  // replica that held it restarted without it), with the step their latest replica holds.
  std::vector<std::pair<int, uint64_t>> lost;
};
// Whether shard `r`'s replica of expert `e`, held at `step`, is one outside placement `p` with
// training of its own: past step 0 and not an aborted update (`aborted`). Where it is later than
// the placement's replicas of `e`, they get their weights from it (PlanStaleReplicas, and the
// router's ReloadMissing for a missing one).
bool TrainedOutside(const Placement& p, int r, int e, uint64_t step, bool aborted);
// `reached` (expert -> the latest step known to have reached it) is raised to what the latest
// replicas hold, or lowered to it for a lost expert, which is so reported once. An expert keeps
// an aborted update when every replica read carries it (a single replica: see SettleAbort), and
// when the replicas without it are behind `reached` (restarted meanwhile): giving theirs back
// would lose the expert's training, so the replica with the update is the latest then.
StalePlan PlanStaleReplicas(const Placement& p, const std::vector<std::map<int, uint64_t>>& at,
                            const std::function<bool(uint64_t)>& aborted,
                            std::map<int, uint64_t>* reached);
// Makes the copies of `plan` on `t`'s shards: LoadExperts at placement `version` for `copy`,
// RollBackExperts at version 0 (it changes no placement) for `give_back`, each bounded by
// `timeout`. Adds the replicas copied to `*done`; the first failure (each is logged) is
// returned as UNAVAILABLE, after the others have been tried.
absl::Status CarryOutStalePlan(const RoutingTable& t, const StalePlan& plan, uint64_t version,
                               absl::Duration timeout, int* done);

}  // namespace moe::router

#endif  // MOE_ROUTER_TRAINER_H_
