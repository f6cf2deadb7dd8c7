#include "expert_server/shard_metrics.h"

#include <string>

namespace moe::expert {

ShardMetrics::ShardMetrics(prometheus::Registry& registry, int num_experts) {
  auto& tokens = prometheus::BuildCounter()
                     .Name("moe_shard_tokens_total")
                     .Help("Token rows computed, per expert")
                     .Register(registry);
  auto& batches = prometheus::BuildCounter()
                      .Name("moe_shard_batches_total")
                      .Help("Dispatched batches computed, per expert")
                      .Register(registry);
  for (int e = 0; e < num_experts; ++e) {
    tokens_.push_back(&tokens.Add({{"expert", std::to_string(e)}}));
    batches_.push_back(&batches.Add({{"expert", std::to_string(e)}}));
  }
  compute_seconds_ = &prometheus::BuildHistogram()
                          .Name("moe_shard_compute_seconds")
                          .Help("Time of one coalesced expert matmul")
                          .Register(registry)
                          .Add({}, prometheus::Histogram::BucketBoundaries{
                                       1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                                       1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0});
  coalesced_rows_ = &prometheus::BuildHistogram()
                         .Name("moe_shard_coalesced_rows")
                         .Help("Rows per coalesced expert matmul")
                         .Register(registry)
                         .Add({}, prometheus::Histogram::BucketBoundaries{
                                      1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096});
  coalesced_batches_ = &prometheus::BuildHistogram()
                            .Name("moe_shard_coalesced_batches")
                            .Help("Dispatched batches merged into one expert matmul")
                            .Register(registry)
                            .Add({}, prometheus::Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64});
  rejected_family_ = &prometheus::BuildCounter()
                          .Name("moe_shard_rejected_batches_total")
                          .Help("Batches answered with an error, by reason")
                          .Register(registry);
  for (const char* r : {"queue_full", "invalid", "not_loaded", "cancelled", "deadline",
                        "too_large", "shutdown", "other_model", "internal"}) {
    rejected_[r] = &rejected_family_->Add({{"reason", r}});
  }
  auto& queue = prometheus::BuildGauge()
                    .Name("moe_shard_queue_depth")
                    .Help("Work waiting for the compute pool")
                    .Register(registry);
  queue_rows_ = &queue.Add({{"unit", "rows"}});
  queue_batches_ = &queue.Add({{"unit", "batches"}});
  auto& bytes = prometheus::BuildCounter()
                    .Name("moe_shard_bytes_total")
                    .Help("Dispatch payload bytes by direction")
                    .Register(registry);
  bytes_in_ = &bytes.Add({{"direction", "in"}});
  bytes_out_ = &bytes.Add({{"direction", "out"}});
  experts_loaded_ = &prometheus::BuildGauge()
                         .Name("moe_shard_experts_loaded")
                         .Help("Experts ready on this shard")
                         .Register(registry)
                         .Add({});
  placement_version_ = &prometheus::BuildGauge()
                            .Name("moe_shard_placement_version")
                            .Help("Placement version the shard last loaded or unloaded under")
                            .Register(registry)
                            .Add({});
  auto& loads = prometheus::BuildCounter()
                    .Name("moe_shard_expert_loads_total")
                    .Help("Experts' weights read by this shard, by source (checkpoint, peer, "
                          "or state_dir: its own trained weights kept on disk)")
                    .Register(registry);
  loads_checkpoint_ = &loads.Add({{"source", "checkpoint"}});
  loads_peer_ = &loads.Add({{"source", "peer"}});
  loads_state_dir_ = &loads.Add({{"source", "state_dir"}});
  auto& writes = prometheus::BuildCounter()
                     .Name("moe_shard_state_writes_total")
                     .Help("Trained experts written to the shard's --state-dir, by result")
                     .Register(registry);
  state_writes_ok_ = &writes.Add({{"result", "ok"}});
  state_writes_failed_ = &writes.Add({{"result", "failed"}});
}

void ShardMetrics::ObserveCompute(int expert, int batches, int64_t rows, double seconds) {
  if (expert >= 0 && expert < static_cast<int>(tokens_.size())) {
    tokens_[expert]->Increment(static_cast<double>(rows));
    batches_[expert]->Increment(batches);
  }
  compute_seconds_->Observe(seconds);
  coalesced_rows_->Observe(static_cast<double>(rows));
  coalesced_batches_->Observe(batches);
}

void ShardMetrics::Rejected(const std::string& reason) {
  auto it = rejected_.find(reason);
  (it != rejected_.end() ? it->second : rejected_["internal"])->Increment();
}

void ShardMetrics::SetQueue(int64_t rows, int64_t batches) {
  queue_rows_->Set(static_cast<double>(rows));
  queue_batches_->Set(static_cast<double>(batches));
}

}  // namespace moe::expert
