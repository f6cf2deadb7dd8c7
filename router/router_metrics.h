#ifndef MOE_ROUTER_ROUTER_METRICS_H_
#define MOE_ROUTER_ROUTER_METRICS_H_

// The router's Prometheus metrics; families built once, labelled handles cached.

#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace moe::router {

class RouterMetrics {
 public:
  RouterMetrics(prometheus::Registry& registry, int num_experts,
                const std::vector<std::string>& shards);

  void Request(const std::string& method, const std::string& code, double seconds);
  void Stage(const std::string& stage, double seconds);
  void Tokens(int64_t tokens, const std::vector<int64_t>& per_expert, int64_t dropped,
              int64_t spilled);
  void Failovers(int n) { failovers_->Increment(n); }
  void Rebalanced() { rebalances_->Increment(); }
  // A dynamic rebalance not applied: `refused` (by CheckSwitchable, as an operator's would be:
  // e.g. it would copy trained experts whose holders are all out of rotation), else failed (the
  // switch itself failed).
  void RebalanceSkipped(bool refused) {
    (refused ? skipped_refused_ : skipped_failed_)->Increment();
  }
  void StaleReplicasRecopied(int n) { stale_replicas_->Increment(n); }
  void ExpertLostTraining() { lost_training_->Increment(); }
  void SetImbalance(double v) { imbalance_->Set(v); }
  void SetPlacementVersion(double v) { placement_version_->Set(v); }
  // moe_router_placement_lease_held: 1 while this router may place (it holds the coordinator's
  // placement lease, renewed less than a lease ago, or needs none: no coordinator, or one that
  // grants none), 0 while it stands by or its lease is not renewed.
  void SetPlacementLeaseHeld(bool held) { lease_held_->Set(held ? 1 : 0); }
  void SetShardUp(const std::string& shard, bool up);
  // The shards whose moe_shard_up is exported from now on (the current members, each with
  // whether it is up): the series of one that left is removed, so that an alert on
  // moe_shard_up == 0 does not fire for good after a planned scale-down, and SetShardUp for
  // an address not kept is ignored until it is kept again.
  void KeepShards(const std::vector<std::pair<std::string, bool>>& shards);
  // moe_shard_draining: 1 for the shards in `draining` (as the control loop last read them), 0
  // for the others with a moe_shard_up series (the two series come and go together).
  void SetShardsDraining(const std::set<std::string>& draining);
  // reason: missing_token, wrong_token.
  void AuthRefused(const std::string& reason);

 private:
  // The moe_shard_up series of `shard`, made (at 0) if it has none, with its moe_shard_draining
  // series (mu_ held).
  prometheus::Gauge& ShardUpLocked(const std::string& shard);

  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* request_seconds_;
  std::mutex mu_;
  std::map<std::pair<std::string, std::string>, prometheus::Counter*> request_counters_;
  std::map<std::string, prometheus::Histogram*> request_hists_;
  std::map<std::string, prometheus::Histogram*> stages_;
  prometheus::Counter* tokens_;
  std::vector<prometheus::Counter*> expert_tokens_;
  prometheus::Counter* dropped_;
  prometheus::Counter* spilled_;
  prometheus::Counter* failovers_;
  prometheus::Counter* rebalances_;
  prometheus::Counter* skipped_refused_;
  prometheus::Counter* skipped_failed_;
  prometheus::Counter* stale_replicas_;
  prometheus::Counter* lost_training_;
  prometheus::Gauge* imbalance_;
  prometheus::Gauge* placement_version_;
  prometheus::Gauge* lease_held_;
  prometheus::Family<prometheus::Gauge>* shard_up_family_;
  prometheus::Family<prometheus::Gauge>* shard_draining_family_;
  std::map<std::string, prometheus::Counter*> auth_refused_;
  std::map<std::string, prometheus::Gauge*> shard_up_;
  std::map<std::string, prometheus::Gauge*> shard_draining_;  // the same keys as shard_up_
  std::optional<std::set<std::string>> kept_shards_;  // none: every shard SetShardUp names
};

}  // namespace moe::router

#endif  // MOE_ROUTER_ROUTER_METRICS_H_
