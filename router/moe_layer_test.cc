#include "router/moe_layer.h"

#include <cmath>

#include <gtest/gtest.h>

#include "services/common/random_checkpoint.h"
#include "tests/reference/naive_moe.h"

namespace moe::router {
namespace {

using common::Activation;

common::ModelConfig TinyConfig(Activation act, bool gated, bool normalize = true) {
  common::ModelConfig c;
  c.num_experts = 5;
  c.d_model = 8;
  c.d_ff = 12;
  c.top_k = 2;
  c.activation = act;
  c.gated = gated;
  c.normalize_topk = normalize;
  return c;
}

TEST(MoeLayer, ForwardMatchesNaiveLayer) {
  for (bool gated : {false, true}) {
    for (double cf : {0.0, 0.6}) {
      const common::ModelConfig c = TinyConfig(Activation::kGelu, gated, !gated);
      const common::Checkpoint ck = common::MakeRandomCheckpoint({c, true, 61});
      auto layer = MoeLayer::Create(ck, {cf});
      ASSERT_TRUE(layer.ok()) << layer.status();
      const int64_t n = 33;
      const std::vector<float> x = common::RandomMatrix(n, c.d_model, 62);
      auto out = (*layer)->Forward(x.data(), n);
      ASSERT_TRUE(out.ok());
      const std::vector<double> ref = testing::NaiveLayerForward(ck, x, n, cf);
      ASSERT_EQ(out->y.size(), ref.size());
      for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(out->y[i], ref[i], 1e-5) << i;
      const testing::NaiveRouting r = testing::NaiveRoute(ck, x, n, cf);
      EXPECT_EQ(out->gating.expert_ids, std::vector<int32_t>(r.ids.begin(), r.ids.end()));
      EXPECT_EQ(out->gating.dropped, r.dropped);
      if (cf > 0) {
        EXPECT_GT(out->gating.dropped, 0);
      }
    }
  }
}

TEST(MoeLayer, EmptyBatch) {
  const common::ModelConfig c = TinyConfig(Activation::kRelu, false);
  auto layer = MoeLayer::Create(common::MakeRandomCheckpoint({c, false, 1}));
  ASSERT_TRUE(layer.ok());
  auto out = (*layer)->Forward(nullptr, 0);
  ASSERT_TRUE(out.ok());
  EXPECT_TRUE(out->y.empty());
  auto grads = (*layer)->Backward(nullptr, nullptr, 0, 0.1f, 0.1f);
  ASSERT_TRUE(grads.ok());
  EXPECT_TRUE(grads->grad_input.empty());
}

// Central difference of the naive double loss in one parameter chosen by `param`.
double NumericGrad(common::Checkpoint ck, float* (*param)(common::Checkpoint&), const std::vector<float>& x,
                   const std::vector<float>& dy, int64_t n, double cf, double aux, double z) {
  const float h = 1e-3f;
  float* p = param(ck);
  const float orig = *p;
  *p = orig + h;
  const double up = testing::NaiveLayerLoss(ck, x, dy, n, cf, aux, z);
  *p = orig - h;
  const double down = testing::NaiveLayerLoss(ck, x, dy, n, cf, aux, z);
  *p = orig;
  return (up - down) / (2.0 * h);
}

struct GradCase {
  Activation act;
  bool gated;
  bool normalize;
  double cf;
};

class MoeLayerGradTest : public ::testing::TestWithParam<GradCase> {};

TEST_P(MoeLayerGradTest, BackwardMatchesFiniteDifferences) {
  const GradCase gc = GetParam();
  const common::ModelConfig c = TinyConfig(gc.act, gc.gated, gc.normalize);
  const common::Checkpoint ck = common::MakeRandomCheckpoint({c, true, 71});
  auto layer = MoeLayer::Create(ck, {gc.cf});
  ASSERT_TRUE(layer.ok());
  const int64_t n = 9;
  const std::vector<float> x = common::RandomMatrix(n, c.d_model, 72);
  const std::vector<float> dy = common::RandomMatrix(n, c.d_model, 73);
  const float aux = 0.2f, z = 0.03f;
  auto grads = (*layer)->Backward(x.data(), dy.data(), n, aux, z);
  ASSERT_TRUE(grads.ok()) << grads.status();
  const double tol = 2e-3;
  // grad_input, by perturbing x.
  for (int64_t i : {0L, 5L, 17L, 40L, 71L}) {
    std::vector<float> xp = x, xm = x;
    const float h = 1e-3f;
    xp[i] += h;
    xm[i] -= h;
    const double fd = (testing::NaiveLayerLoss(ck, xp, dy, n, gc.cf, aux, z) -
                       testing::NaiveLayerLoss(ck, xm, dy, n, gc.cf, aux, z)) / (2.0 * h);
    EXPECT_NEAR(grads->grad_input[i], fd, tol) << "grad_input " << i;
  }
  using P = float* (*)(common::Checkpoint&);
  const std::vector<std::pair<const char*, std::pair<P, float>>> params = {
      {"gate.weight[3]", {[](common::Checkpoint& k) { return &k.gate.weight[3]; },
                          grads->gate_weight[3]}},
      {"gate.weight[22]", {[](common::Checkpoint& k) { return &k.gate.weight[22]; },
                           grads->gate_weight[22]}},
      {"gate.bias[1]", {[](common::Checkpoint& k) { return &k.gate.bias[1]; }, grads->gate_bias[1]}},
  };
  for (const auto& [name, pg] : params) {
    EXPECT_NEAR(pg.second, NumericGrad(ck, pg.first, x, dy, n, gc.cf, aux, z), tol) << name;
  }
  // Every expert's first w1, w2 entries and biases.
  for (int e = 0; e < c.num_experts; ++e) {
    const common::ExpertWeights& g = grads->experts[e];
    auto check = [&](float got, auto accessor, const char* what) {
      common::Checkpoint copy = ck;
      float* p = accessor(copy.experts[e]);
      const float orig = *p, h = 1e-3f;
      *p = orig + h;
      const double up = testing::NaiveLayerLoss(copy, x, dy, n, gc.cf, aux, z);
      *p = orig - h;
      const double down = testing::NaiveLayerLoss(copy, x, dy, n, gc.cf, aux, z);
      EXPECT_NEAR(got, (up - down) / (2.0 * h), tol) << "expert " << e << " " << what;
    };
    check(g.w1[7], [](common::ExpertWeights& w) { return &w.w1[7]; }, "w1");
    check(g.w2[5], [](common::ExpertWeights& w) { return &w.w2[5]; }, "w2");
    check(g.b1[2], [](common::ExpertWeights& w) { return &w.b1[2]; }, "b1");
    check(g.b2[1], [](common::ExpertWeights& w) { return &w.b2[1]; }, "b2");
    if (gc.gated) {
      check(g.w3[9], [](common::ExpertWeights& w) { return &w.w3[9]; }, "w3");
      check(g.b3[0], [](common::ExpertWeights& w) { return &w.b3[0]; }, "b3");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, MoeLayerGradTest,
                         ::testing::Values(GradCase{Activation::kSilu, true, true, 0.0},
                                           GradCase{Activation::kGelu, false, false, 0.0},
                                           GradCase{Activation::kRelu, false, true, 0.7},
                                           GradCase{Activation::kSilu, true, false, 0.8}));

TEST(MoeLayer, SgdAppliesGradients) {
  const common::ModelConfig c = TinyConfig(Activation::kSilu, true);
  const common::Checkpoint ck = common::MakeRandomCheckpoint({c, true, 81});
  auto layer = MoeLayer::Create(ck);
  ASSERT_TRUE(layer.ok());
  const int64_t n = 12;
  const std::vector<float> x = common::RandomMatrix(n, c.d_model, 82);
  const std::vector<float> dy = common::RandomMatrix(n, c.d_model, 83);
  auto grads = (*layer)->Backward(x.data(), dy.data(), n, 0.f, 0.f);
  ASSERT_TRUE(grads.ok());
  ASSERT_TRUE((*layer)->ApplySgd(*grads, 0.1f).ok());
  const common::Checkpoint after = (*layer)->Snapshot();
  for (size_t i = 0; i < ck.gate.weight.size(); ++i) {
    EXPECT_EQ(after.gate.weight[i], ck.gate.weight[i] - 0.1f * grads->gate_weight[i]);
  }
  for (int e = 0; e < c.num_experts; ++e) {
    for (size_t i = 0; i < ck.experts[e].w2.size(); ++i) {
      EXPECT_EQ(after.experts[e].w2[i], ck.experts[e].w2[i] - 0.1f * grads->experts[e].w2[i]);
    }
  }
  // The forward now uses the new weights.
  auto out = (*layer)->Forward(x.data(), n);
  ASSERT_TRUE(out.ok());
  const std::vector<double> ref = testing::NaiveLayerForward(after, x, n, 0.0);
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(out->y[i], ref[i], 1e-5);
}

TEST(MoeLayer, RejectsIncompleteCheckpoint) {
  const common::ModelConfig c = TinyConfig(Activation::kRelu, false);
  common::Checkpoint ck = common::MakeRandomCheckpoint({c, false, 1});
  ck.experts.pop_back();
  EXPECT_EQ(MoeLayer::Create(ck).status().code(), absl::StatusCode::kInvalidArgument);
  ck = common::MakeRandomCheckpoint({c, false, 1});
  ck.experts[2].w1.resize(3);
  auto bad = MoeLayer::Create(ck);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("expert 2"), std::string::npos);
}

}  // namespace
}  // namespace moe::router
