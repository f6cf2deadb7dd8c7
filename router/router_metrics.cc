#include "router/router_metrics.h"

namespace moe::router {
namespace {

const prometheus::Histogram::BucketBoundaries kLatency = {
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

}  // namespace

RouterMetrics::RouterMetrics(prometheus::Registry& registry, int num_experts,
                             const std::vector<std::string>& shards) {
  requests_ = &prometheus::BuildCounter()
                   .Name("moe_router_requests_total")
                   .Help("Requests by method and gRPC status code")
                   .Register(registry);
  request_seconds_ = &prometheus::BuildHistogram()
                          .Name("moe_router_request_seconds")
                          .Help("Whole-request latency by method")
                          .Register(registry);
  auto& stage = prometheus::BuildHistogram()
                    .Name("moe_router_stage_seconds")
                    .Help("Latency of the gate, dispatch and combine stages")
                    .Register(registry);
  for (const char* s : {"gate", "dispatch", "combine"}) stages_[s] = &stage.Add({{"stage", s}}, kLatency);
  for (const char* m : {"Infer", "InferStream"}) {
    request_hists_[m] = &request_seconds_->Add({{"method", m}}, kLatency);
    request_counters_[{m, "OK"}] = &requests_->Add({{"method", m}, {"code", "OK"}});
  }
  tokens_ = &prometheus::BuildCounter()
                 .Name("moe_router_tokens_total")
                 .Help("Tokens routed")
                 .Register(registry)
                 .Add({});
  auto& per_expert = prometheus::BuildCounter()
                         .Name("moe_expert_tokens_total")
                         .Help(
                             "Admitted token assignments per expert, of Infer and "
                             "InferStream (training steps are not counted)")
                         .Register(registry);
  for (int e = 0; e < num_experts; ++e) {
    expert_tokens_.push_back(&per_expert.Add({{"expert", std::to_string(e)}}));
  }
  auto& assignments = prometheus::BuildCounter()
                          .Name("moe_router_assignments_total")
                          .Help("Assignments over capacity, by outcome (dropped or spilled)")
                          .Register(registry);
  dropped_ = &assignments.Add({{"outcome", "dropped"}});
  spilled_ = &assignments.Add({{"outcome", "spilled"}});
  failovers_ = &prometheus::BuildCounter()
                    .Name("moe_router_failovers_total")
                    .Help("Shard failures recovered by re-sending to another replica, in answered requests")
                    .Register(registry)
                    .Add({});
  rebalances_ = &prometheus::BuildCounter()
                     .Name("moe_router_rebalances_total")
                     .Help("Placement changes applied")
                     .Register(registry)
                     .Add({});
  auto& skipped = prometheus::BuildCounter()
                      .Name("moe_router_rebalances_skipped_total")
                      .Help(
                          "Rebalances of dynamic placement past the imbalance threshold that "
                          "were not applied, by reason: refused (as an operator's Rebalance "
                          "would be: trained experts to copy whose holders are all out of "
                          "rotation, or experts left with no replica in rotation), failed (the "
                          "switch failed); each is tried again after the cooldown")
                      .Register(registry);
  skipped_refused_ = &skipped.Add({{"reason", "refused"}});
  skipped_failed_ = &skipped.Add({{"reason", "failed"}});
  stale_replicas_ = &prometheus::BuildCounter()
                         .Name("moe_router_stale_replicas_total")
                         .Help(
                             "Replicas found behind their expert's latest training step, or "
                             "carrying the update of an aborted step, and copied again from "
                             "an up-to-date replica")
                         .Register(registry)
                         .Add({});
  lost_training_ = &prometheus::BuildCounter()
                        .Name("moe_router_experts_lost_training_total")
                        .Help("Experts whose every replica fell back below a training step the "
                              "expert had reached (its only trained replica restarted)")
                        .Register(registry)
                        .Add({});
  imbalance_ = &prometheus::BuildGauge()
                    .Name("moe_router_load_imbalance")
                    .Help("max/mean - 1 of expected shard load under the current placement")
                    .Register(registry)
                    .Add({});
  placement_version_ = &prometheus::BuildGauge()
                            .Name("moe_router_placement_version")
                            .Help("Version of the placement in use")
                            .Register(registry)
                            .Add({});
  lease_held_ = &prometheus::BuildGauge()
                     .Name("moe_router_placement_lease_held")
                     .Help(
                         "1 while this router may place the shards (it holds a placement lease "
                         "renewed less than a lease ago, or needs none), 0 while it stands by or "
                         "its lease is not renewed")
                     .Register(registry)
                     .Add({});
  auto& refused = prometheus::BuildCounter()
                      .Name("moe_router_auth_refused_total")
                      .Help("Calls refused for a missing or wrong bearer token")
                      .Register(registry);
  for (const char* r : {"missing_token", "wrong_token"}) auth_refused_[r] = &refused.Add({{"reason", r}});
  shard_up_family_ = &prometheus::BuildGauge()
                         .Name("moe_shard_up")
                         .Help("1 when the shard is in rotation")
                         .Register(registry);
  shard_draining_family_ =
      &prometheus::BuildGauge()
           .Name("moe_shard_draining")
           .Help(
               "1 while the shard drains (moe-client drain, a pod's preStop): out of rotation "
               "on purpose, its experts moving off (read once a second)")
           .Register(registry);
  for (const std::string& s : shards) ShardUpLocked(s);
}

void RouterMetrics::Request(const std::string& method, const std::string& code, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  auto key = std::make_pair(method, code);
  auto it = request_counters_.find(key);
  if (it == request_counters_.end()) {
    it = request_counters_.emplace(key, &requests_->Add({{"method", method}, {"code", code}})).first;
  }
  it->second->Increment();
  auto h = request_hists_.find(method);
  if (h == request_hists_.end()) {
    h = request_hists_.emplace(method, &request_seconds_->Add({{"method", method}}, kLatency)).first;
  }
  h->second->Observe(seconds);
}

void RouterMetrics::Stage(const std::string& stage, double seconds) {
  auto it = stages_.find(stage);
  if (it != stages_.end()) it->second->Observe(seconds);
}

void RouterMetrics::Tokens(int64_t tokens, const std::vector<int64_t>& per_expert,
                           int64_t dropped, int64_t spilled) {
  tokens_->Increment(static_cast<double>(tokens));
  for (size_t e = 0; e < per_expert.size() && e < expert_tokens_.size(); ++e) {
    if (per_expert[e] > 0) expert_tokens_[e]->Increment(static_cast<double>(per_expert[e]));
  }
  if (dropped > 0) dropped_->Increment(static_cast<double>(dropped));
  if (spilled > 0) spilled_->Increment(static_cast<double>(spilled));
}

void RouterMetrics::AuthRefused(const std::string& reason) {
  auto it = auth_refused_.find(reason);
  if (it != auth_refused_.end()) it->second->Increment();
}

void RouterMetrics::SetShardUp(const std::string& shard, bool up) {
  std::lock_guard<std::mutex> lock(mu_);
  if (kept_shards_ && kept_shards_->count(shard) == 0) return;  // not a member (any more)
  ShardUpLocked(shard).Set(up ? 1 : 0);
}

prometheus::Gauge& RouterMetrics::ShardUpLocked(const std::string& shard) {
  auto it = shard_up_.find(shard);
  if (it == shard_up_.end()) {
    it = shard_up_.emplace(shard, &shard_up_family_->Add({{"shard", shard}})).first;
    shard_draining_[shard] = &shard_draining_family_->Add({{"shard", shard}});
  }
  return *it->second;
}

void RouterMetrics::SetShardsDraining(const std::set<std::string>& draining) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [address, gauge] : shard_draining_) gauge->Set(draining.count(address) ? 1 : 0);
}

void RouterMetrics::KeepShards(const std::vector<std::pair<std::string, bool>>& shards) {
  std::lock_guard<std::mutex> lock(mu_);
  std::set<std::string> keep;
  for (const auto& [address, up] : shards) {
    keep.insert(address);
    // A series that exists already keeps the value SetShardUp gave it.
    if (shard_up_.count(address) == 0) ShardUpLocked(address).Set(up ? 1 : 0);
  }
  for (auto it = shard_up_.begin(); it != shard_up_.end();) {
    if (keep.count(it->first) != 0) {
      ++it;
      continue;
    }
    shard_up_family_->Remove(it->second);
    shard_draining_family_->Remove(shard_draining_[it->first]);
    shard_draining_.erase(it->first);
    it = shard_up_.erase(it);
  }
  kept_shards_ = std::move(keep);
}

}  // namespace moe::router
