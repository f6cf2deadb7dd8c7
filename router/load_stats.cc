#include "router/load_stats.h"

namespace moe::router {

LoadStats::LoadStats(int num_experts, double alpha) : alpha_(alpha), ema_(num_experts, 0.0) {}

void LoadStats::Record(const std::vector<int64_t>& per_expert) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t e = 0; e < ema_.size() && e < per_expert.size(); ++e) {
    const double x = static_cast<double>(per_expert[e]);
    ema_[e] = batches_ == 0 ? x : (1.0 - alpha_) * ema_[e] + alpha_ * x;
  }
  ++batches_;
}

std::vector<double> LoadStats::Load() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ema_;
}

int64_t LoadStats::batches() const {
  std::lock_guard<std::mutex> lock(mu_);
  return batches_;
}

}  // namespace moe::router
