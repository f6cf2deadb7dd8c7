#include "router/gating.h"

#include <cmath>

#include <gtest/gtest.h>

#include "services/common/random_checkpoint.h"
#include "tests/reference/naive_moe.h"

namespace moe::router {
namespace {

GatingResult FromLogits(std::vector<float> logits, int64_t n, int e, int k, bool normalize,
                        double cf = 0) {
  return RouteFromLogits(std::move(logits), n, e, GatingOptions{k, normalize, cf, {}});
}

TEST(Gating, TiesGoToLowerExpertId) {
  // Experts 1, 2 and 3 tie for the largest probability.
  GatingResult g = FromLogits({0.f, 2.f, 2.f, 2.f, 1.f}, 1, 5, 2, true);
  EXPECT_EQ(g.expert_ids, (std::vector<int32_t>{1, 2}));
  EXPECT_FLOAT_EQ(g.weights[0], 0.5f);
  EXPECT_FLOAT_EQ(g.weights[1], 0.5f);
  // All equal: 0, 1, 2.
  g = FromLogits({3.f, 3.f, 3.f, 3.f}, 1, 4, 3, false);
  EXPECT_EQ(g.expert_ids, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_FLOAT_EQ(g.weights[0], 0.25f);
}

TEST(Gating, TopOneAndTopAll) {
  std::vector<float> logits = {0.1f, 0.5f, -0.2f, 0.3f};
  GatingResult g1 = FromLogits(logits, 1, 4, 1, true);
  EXPECT_EQ(g1.expert_ids, (std::vector<int32_t>{1}));
  EXPECT_FLOAT_EQ(g1.weights[0], 1.f);  // normalised over one choice
  GatingResult g1n = FromLogits(logits, 1, 4, 1, false);
  double denominator = 0;  // softmax over the four logits, in double
  for (float l : logits) denominator += std::exp(static_cast<double>(l));
  EXPECT_NEAR(g1n.weights[0], std::exp(0.5) / denominator, 1e-6);
  GatingResult gall = FromLogits(logits, 1, 4, 4, true);
  EXPECT_EQ(gall.expert_ids, (std::vector<int32_t>{1, 3, 0, 2}));
  float sum = 0;
  for (float w : gall.weights) sum += w;
  EXPECT_NEAR(sum, 1.f, 1e-6);
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(gall.weights[j], gall.probs[gall.expert_ids[j]], 1e-6);
}

TEST(Gating, SoftmaxIsStableForLargeLogits) {
  GatingResult g = FromLogits({1000.f, 999.f, -1000.f}, 1, 3, 1, false);
  EXPECT_NEAR(g.probs[0], 1.f / (1.f + std::exp(-1.f)), 1e-6);
  EXPECT_NEAR(g.lse[0], 1000.f + std::log1p(std::exp(-1.f)), 1e-3);
  EXPECT_TRUE(std::isfinite(g.router_z_loss));
}

TEST(Gating, CapacityAdmitsFirstChoicesFirstThenTokenOrder) {
  // 4 tokens, 2 experts, top-2, cf 0.5: C = ceil(4 * 2 / 2 * 0.5) = 2.
  // Every token prefers expert 0 then expert 1.
  std::vector<float> logits = {1, 0, 1, 0, 1, 0, 1, 0};
  GatingResult g = FromLogits(logits, 4, 2, 2, true, 0.5);
  EXPECT_EQ(g.capacity, 2);
  // First choices: tokens 0 and 1 get expert 0; 2 and 3 are dropped. Second choices: tokens 0
  // and 1 get expert 1; 2 and 3 dropped.
  EXPECT_EQ(g.expert_ids, (std::vector<int32_t>{0, 1, 0, 1, -1, -1, -1, -1}));
  EXPECT_EQ(g.dropped, 4);
  EXPECT_EQ(g.weights[4], 0.f);
  EXPECT_EQ(g.expert_load, (std::vector<int64_t>{2, 2}));
}

TEST(Gating, FirstChoicesBeatEarlierTokensSecondChoices) {
  // Token 0 picks (1, 0); tokens 1 and 2 pick (0, 1). C = ceil(3 * 2 / 2 * 1/3) = 1.
  std::vector<float> logits = {0, 1, 1, 0, 1, 0};
  GatingResult g = FromLogits(logits, 3, 2, 2, false, 1.0 / 3.0);
  EXPECT_EQ(g.capacity, 1);
  // First choices in token order: t0 -> 1 (admitted), t1 -> 0 (admitted), t2 -> 0 (dropped).
  // Second choices: t0 -> 0 dropped (full), t1 -> 1 dropped, t2 -> 1 dropped.
  EXPECT_EQ(g.expert_ids, (std::vector<int32_t>{1, -1, 0, -1, -1, -1}));
  EXPECT_EQ(g.dropped, 4);
}

TEST(Gating, CapacityEdgeCases) {
  EXPECT_EQ(ExpertCapacity(10, 2, 4, 0.0), 0);
  EXPECT_EQ(ExpertCapacity(10, 2, 4, 1.0), 5);
  EXPECT_EQ(ExpertCapacity(10, 2, 4, 1.01), 6);
  EXPECT_EQ(ExpertCapacity(1, 1, 8, 1.0), 1);
  EXPECT_EQ(ExpertCapacity(0, 2, 4, 1.0), 0);
  // A huge factor never drops.
  std::vector<float> logits = {1, 0, 1, 0, 1, 0};
  EXPECT_EQ(FromLogits(logits, 3, 2, 1, true, 100.0).dropped, 0);
}

TEST(Gating, EmptyBatch) {
  GatingResult g = FromLogits({}, 0, 4, 2, true, 1.0);
  EXPECT_EQ(g.tokens, 0);
  EXPECT_TRUE(g.expert_ids.empty());
  EXPECT_EQ(g.load_balance_loss, 0.f);
  EXPECT_EQ(g.router_z_loss, 0.f);
}

TEST(Gating, RoutingAndLossesMatchNaiveReference) {
  for (bool normalize : {true, false}) {
    for (double cf : {0.0, 0.75, 1.25}) {
      common::ModelConfig c;
      c.num_experts = 6;
      c.d_model = 10;
      c.d_ff = 4;
      c.top_k = 2;
      c.normalize_topk = normalize;
      const common::Checkpoint ck = common::MakeRandomCheckpoint({c, true, 31});
      const int64_t n = 40;
      const std::vector<float> x = common::RandomMatrix(n, c.d_model, 32);
      GateParams gp{ck.gate.weight.data(), ck.gate.bias.data(), c.num_experts, c.d_model};
      GatingResult g = Route(gp, x.data(), n, GatingOptions{2, normalize, cf, {}});
      testing::NaiveRouting ref = testing::NaiveRoute(ck, x, n, cf);
      EXPECT_EQ(g.expert_ids, std::vector<int32_t>(ref.ids.begin(), ref.ids.end()));
      for (size_t i = 0; i < ref.weights.size(); ++i) EXPECT_NEAR(g.weights[i], ref.weights[i], 1e-6);
      EXPECT_EQ(g.dropped, ref.dropped);
      EXPECT_NEAR(g.load_balance_loss, ref.lb_loss, 1e-5);
      EXPECT_NEAR(g.router_z_loss, ref.z_loss, 1e-5);
    }
  }
}

// The loss sum_tj c_tj w_tj + aux * lb + z * zl as a function of the logits, in float.
double Loss(const std::vector<float>& logits, int64_t n, int e, int k, bool normalize,
            const std::vector<float>& c, float aux, float z, double cf) {
  GatingResult g = FromLogits(logits, n, e, k, normalize, cf);
  double loss = aux * g.load_balance_loss + z * g.router_z_loss;
  for (size_t i = 0; i < g.weights.size(); ++i) loss += c[i] * g.weights[i];
  return loss;
}

TEST(Gating, BackwardMatchesFiniteDifferences) {
  const int64_t n = 7;
  const int E = 5, k = 2;
  for (bool normalize : {true, false}) {
    for (double cf : {0.0, 0.8}) {
      std::vector<float> logits = common::RandomMatrix(n, E, 41);
      for (float& l : logits) l *= 3.f;
      const std::vector<float> c = common::RandomMatrix(n, k, 42);
      const float aux = 0.3f, z = 0.05f;
      GatingResult g = FromLogits(logits, n, E, k, normalize, cf);
      std::vector<float> dlogits(n * E);
      GateBackward(g, c.data(), normalize, aux, z, dlogits.data());
      const float h = 1e-2f;
      int compared = 0;
      for (int64_t i = 0; i < n * E; ++i) {
        std::vector<float> plus = logits, minus = logits;
        plus[i] += h;
        minus[i] -= h;
        // Perturbations that change the selection make the loss discontinuous; skip them.
        if (FromLogits(plus, n, E, k, normalize, cf).expert_ids != g.expert_ids ||
            FromLogits(minus, n, E, k, normalize, cf).expert_ids != g.expert_ids) {
          continue;
        }
        const double fd = (Loss(plus, n, E, k, normalize, c, aux, z, cf) -
                           Loss(minus, n, E, k, normalize, c, aux, z, cf)) / (2 * h);
        EXPECT_NEAR(dlogits[i], fd, 2e-3) << "logit " << i << " normalize " << normalize;
        ++compared;
      }
      // Most perturbations keep the selection: the check compared something.
      EXPECT_GE(compared, n * E / 2) << "normalize " << normalize << " cf " << cf;
    }
  }
}

TEST(Gating, ParamBackwardIsTheLinearMapTransposed) {
  const int E = 3, D = 4;
  const int64_t n = 2;
  const std::vector<float> w = common::RandomMatrix(E, D, 51);
  const std::vector<float> b = {0.1f, 0.2f, 0.3f};
  const std::vector<float> x = common::RandomMatrix(n, D, 52);
  const std::vector<float> dl = common::RandomMatrix(n, E, 53);
  GateParams gp{w.data(), b.data(), E, D};
  std::vector<float> dw(E * D), db(E), dx(n * D, 1.f);
  GateParamBackward(gp, x.data(), dl.data(), n, dw.data(), db.data(), dx.data());
  for (int e = 0; e < E; ++e) {
    double sb = 0;
    for (int64_t t = 0; t < n; ++t) sb += dl[t * E + e];
    EXPECT_NEAR(db[e], sb, 1e-6);
    for (int d = 0; d < D; ++d) {
      double s = 0;
      for (int64_t t = 0; t < n; ++t) s += dl[t * E + e] * x[t * D + d];
      EXPECT_NEAR(dw[e * D + d], s, 1e-6);
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    for (int d = 0; d < D; ++d) {
      double s = 1.0;  // dx accumulates onto what was there
      for (int e = 0; e < E; ++e) s += dl[t * E + e] * w[e * D + d];
      EXPECT_NEAR(dx[t * D + d], s, 1e-6);
    }
  }
}

}  // namespace
}  // namespace moe::router
