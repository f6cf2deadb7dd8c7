// ZipfTokens against the gate: the experts the gate picks for its tokens follow the Zipf law the
// generator was asked for, computed here independently as the exact marginals of drawing k
// experts without replacement.

#include "client/router_client.h"

#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "router/gating.h"
#include "services/common/random_checkpoint.h"

namespace moe::client {
namespace {

constexpr int kExperts = 16;
constexpr int kDModel = 128;

// Share of all assignments that expert e receives when each token draws `k` (1 or 2) experts
// without replacement, expert e with weight w[e].
std::vector<double> ExpectedShare(const std::vector<double>& w, int k) {
  double total = 0;
  for (double v : w) total += v;
  std::vector<double> share(w.size(), 0.0);
  for (size_t a = 0; a < w.size(); ++a) {
    const double pa = w[a] / total;
    share[a] += pa;
    if (k == 2) {
      for (size_t b = 0; b < w.size(); ++b) {
        if (b != a) share[b] += pa * w[b] / (total - w[a]);
      }
    }
  }
  for (double& s : share) s /= k;
  return share;
}

void CheckShares(int k, const std::vector<int>& order) {
  common::GateWeights gate;
  gate.weight = common::RandomMatrix(kExperts, kDModel, 11);
  for (float& v : gate.weight) v /= std::sqrt(static_cast<float>(kDModel));
  const double s = 1.2;
  ZipfTokens gen(gate, kExperts, kDModel, s, 3, order, k);
  constexpr int64_t kTokens = 40000;
  const std::vector<float> x = gen.Next(kTokens);
  router::GateParams params{gate.weight.data(), nullptr, kExperts, kDModel};
  router::GatingOptions opts;
  opts.top_k = k;
  const router::GatingResult g = router::Route(params, x.data(), kTokens, opts);
  std::vector<double> weight(kExperts);
  for (int r = 0; r < kExperts; ++r) weight[order.empty() ? r : order[r]] = std::pow(r + 1.0, -s);
  const std::vector<double> want = ExpectedShare(weight, k);
  for (int e = 0; e < kExperts; ++e) {
    const double got = static_cast<double>(g.expert_load[e]) / (kTokens * k);
    // 40000 draws: one standard deviation of a share p is below 0.0025.
    EXPECT_NEAR(got, want[e], 0.01) << "expert " << e << ", top-" << k;
  }
}

TEST(ZipfTokens, TheGatePicksTheFirstExpertByZipf) { CheckShares(1, {}); }

TEST(ZipfTokens, EveryOneOfTheTopKExpertsIsDrawnByZipf) { CheckShares(2, {}); }

TEST(ZipfTokens, ThePopularityOrderIsTheOneGiven) {
  std::vector<int> reversed;
  for (int e = kExperts - 1; e >= 0; --e) reversed.push_back(e);
  CheckShares(2, reversed);
}

}  // namespace
}  // namespace moe::client
