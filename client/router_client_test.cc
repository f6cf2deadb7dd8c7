// ZipfTokens against the gate: the experts the gate picks for its tokens follow the Zipf law the
// generator was asked for, computed here independently as the exact marginals of drawing k
// experts without replacement.

#include "client/router_client.h"

#include <cmath>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "client/cli_util.h"
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

// The synthetic objective against a naive loop in double; and a residual that leaves the loss
// finite but overflows its float gradient, or a NaN output, is refused rather than sent.
TEST(RegressionLoss, IsTheMeanSquaredErrorAndItsGradient) {
  const std::vector<float> y = {1.f, -2.f, 0.5f, 4.f, 3.f, 0.f};
  const std::vector<float> target = {0.f, 1.f, 0.5f, -1.f, 2.f, 2.f};
  std::vector<float> dy;
  // 3 tokens of 2 values: the loss is the sum of squares over the tokens, its gradient 2 r / 3
  // (with 2 tokens, 2 r / tokens would be r, and a lost division would pass).
  const absl::StatusOr<double> loss = RegressionLoss(y, target, 3, &dy);
  ASSERT_TRUE(loss.ok()) << loss.status();
  double want = 0;
  for (size_t i = 0; i < y.size(); ++i) want += (y[i] - target[i]) * (y[i] - target[i]);
  EXPECT_DOUBLE_EQ(*loss, want / 3.0);
  ASSERT_EQ(dy.size(), y.size());
  for (size_t i = 0; i < y.size(); ++i) {
    EXPECT_FLOAT_EQ(dy[i], static_cast<float>(2.0 * (y[i] - target[i]) / 3.0)) << i;
  }

  const float big = 2e38f;  // r^2 fits a double; 2 r / 1 is past float's largest
  const absl::StatusOr<double> over = RegressionLoss({big}, {0.f}, 1, &dy);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(over.status().message(), "the loss (4e+76) has a gradient that is not finite");

  const absl::StatusOr<double> nan = RegressionLoss({std::nanf("")}, {0.f}, 1, &dy);
  EXPECT_EQ(nan.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(nan.status().message(), "the loss (nan) is not finite");
}

// A call that never reaches a server (nothing listens on port 1) is made three times, the first
// failure returned; one answered with another code is made once.
TEST(CallWithReconnects, TriesAgainOnlyWhatFailedUnavailable) {
  auto nowhere =
      v1::Router::NewStub(grpc::CreateChannel("127.0.0.1:1", grpc::InsecureChannelCredentials()));
  int attempts = 0;
  v1::ClusterInfo info;
  const grpc::Status unreached =
      CallWithReconnects(absl::Seconds(10), [&](grpc::ClientContext* ctx) {
        ++attempts;
        return nowhere->GetClusterInfo(ctx, v1::GetClusterInfoRequest(), &info);
      });
  EXPECT_EQ(unreached.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(attempts, 3);
  attempts = 0;
  const grpc::Status refused = CallWithReconnects(absl::Seconds(10), [&](grpc::ClientContext*) {
    ++attempts;
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "refused");
  });
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(attempts, 1);
}

// A number's place held by "- (why)" (placement's expected load of a draining shard) keeps the
// column right-aligned: it turned the column into text, and the numbers beside it moved left.
TEST(PrintTable, ADashWithWhyKeepsAColumnOfNumbersRightAligned) {
  ::testing::internal::CaptureStdout();
  PrintTable({"shard", "load"}, {{"0", "9.2"}, {"1", "- (drains)"}, {"2", "12.5"}});
  EXPECT_EQ(::testing::internal::GetCapturedStdout(),
            "shard        load\n"
            "-----------------\n"
            "0             9.2\n"
            "1      - (drains)\n"
            "2            12.5\n");
}

}  // namespace
}  // namespace moe::client
