#ifndef MOE_EXPERT_SERVER_SHARD_METRICS_H_
#define MOE_EXPERT_SERVER_SHARD_METRICS_H_

// The shard's Prometheus metrics. Families are built once; per-expert and per-reason handles are
// cached so the hot path never calls Add().

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace moe::expert {

class ShardMetrics {
 public:
  ShardMetrics(prometheus::Registry& registry, int num_experts);

  // One coalesced matmul for `expert`: `batches` dispatched batches, `rows` rows, `seconds`.
  void ObserveCompute(int expert, int batches, int64_t rows, double seconds);
  // reason: queue_full, invalid, not_loaded, cancelled, deadline, too_large, shutdown,
  // other_model.
  void Rejected(const std::string& reason);
  void SetQueue(int64_t rows, int64_t batches);
  void BytesIn(double n) { bytes_in_->Increment(n); }
  void BytesOut(double n) { bytes_out_->Increment(n); }
  void SetExpertsLoaded(int n) { experts_loaded_->Set(n); }
  void SetPlacementVersion(double v) { placement_version_->Set(v); }
  enum class Source { kCheckpoint, kPeer, kStateDir };
  // One expert's weights read: from the checkpoint, copied from a peer shard, or the trained
  // weights this shard kept in its --state-dir.
  void ExpertRead(Source source) {
    (source == Source::kPeer       ? loads_peer_
     : source == Source::kStateDir ? loads_state_dir_
                                   : loads_checkpoint_)
        ->Increment();
  }
  // One expert's trained weights written to the --state-dir (or failed to).
  void StateWritten(bool ok) { (ok ? state_writes_ok_ : state_writes_failed_)->Increment(); }

 private:
  std::vector<prometheus::Counter*> tokens_;
  std::vector<prometheus::Counter*> batches_;
  prometheus::Histogram* compute_seconds_;
  prometheus::Histogram* coalesced_rows_;
  prometheus::Histogram* coalesced_batches_;
  prometheus::Family<prometheus::Counter>* rejected_family_;
  std::map<std::string, prometheus::Counter*> rejected_;
  prometheus::Gauge* queue_rows_;
  prometheus::Gauge* queue_batches_;
  prometheus::Counter* bytes_in_;
  prometheus::Counter* bytes_out_;
  prometheus::Gauge* experts_loaded_;
  prometheus::Gauge* placement_version_;
  prometheus::Counter* loads_checkpoint_;
  prometheus::Counter* loads_peer_;
  prometheus::Counter* loads_state_dir_;
  prometheus::Counter* state_writes_ok_;
  prometheus::Counter* state_writes_failed_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVER_SHARD_METRICS_H_
