#ifndef MOE_ROUTER_LOAD_STATS_H_
#define MOE_ROUTER_LOAD_STATS_H_

// Live per-expert load: an exponential moving average (alpha 0.1) of the tokens each expert gets
// per batch. Thread-safe.

#include <cstdint>
#include <vector>

#include <mutex>

namespace moe::router {

class LoadStats {
 public:
  explicit LoadStats(int num_experts, double alpha = 0.1);
  // Folds in one batch's admitted assignments per expert.
  void Record(const std::vector<int64_t>& per_expert);
  std::vector<double> Load() const;
  int64_t batches() const;

 private:
  const double alpha_;
  mutable std::mutex mu_;
  std::vector<double> ema_;
  int64_t batches_ = 0;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_LOAD_STATS_H_
