#include "expert_server/expert_ffn.h"

#include <cmath>
#include <cstdlib>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "services/common/random_checkpoint.h"
#include "tests/reference/naive_moe.h"

namespace moe::expert {
namespace {

using common::Activation;

struct Case {
  Activation act;
  bool gated;
  bool bias;
};

std::string Name(const ::testing::TestParamInfo<Case>& info) {
  return std::string(common::ActivationName(info.param.act)) + (info.param.gated ? "_gated" : "") +
         (info.param.bias ? "_bias" : "");
}

common::ModelConfig Config(const Case& c) {
  common::ModelConfig m;
  m.num_experts = 1;
  m.d_model = 24;
  m.d_ff = 40;
  m.top_k = 1;
  m.activation = c.act;
  m.gated = c.gated;
  return m;
}

// |got - want| <= tol * (max |want| + 1), elementwise.
template <typename A, typename B>
void ExpectClose(const A& got, const B& want, double tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 1;
  for (auto v : want) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], tol * scale) << what << " at " << i;
  }
}

class ExpertFfnTest : public ::testing::TestWithParam<Case> {};

TEST_P(ExpertFfnTest, ForwardMatchesNaiveLoops) {
  const common::ModelConfig c = Config(GetParam());
  const common::Checkpoint ck = common::MakeRandomCheckpoint({c, GetParam().bias, 11});
  auto ffn = ExpertFfn::Create(c, ck.experts[0]);
  ASSERT_TRUE(ffn.ok()) << ffn.status();
  for (int64_t m : {0, 1, 7, 64, 100, 4100}) {
    const std::vector<float> x = common::RandomMatrix(m, c.d_model, 100 + m);
    std::vector<float> y(m * c.d_model, -1.f);
    ASSERT_TRUE((*ffn)->Forward(x.data(), m, y.data()).ok());
    ExpectClose(y, testing::NaiveExpertForward(c, ck.experts[0], x, m), 1e-5,
                "forward m=" + std::to_string(m));
    // The training forward computes the same function.
    ForwardCache cache;
    std::vector<float> y2(m * c.d_model);
    ASSERT_TRUE((*ffn)->ForwardTrain(x.data(), m, y2.data(), &cache).ok());
    ExpectClose(y2, y, 1e-5, "train forward");
    EXPECT_EQ(cache.rows, m);
  }
}

TEST_P(ExpertFfnTest, BackwardMatchesNaiveLoops) {
  const common::ModelConfig c = Config(GetParam());
  const common::Checkpoint ck = common::MakeRandomCheckpoint({c, GetParam().bias, 12});
  auto ffn = ExpertFfn::Create(c, ck.experts[0]);
  ASSERT_TRUE(ffn.ok());
  for (int64_t m : {1, 5, 33}) {
    const std::vector<float> x = common::RandomMatrix(m, c.d_model, 200 + m);
    const std::vector<float> dy = common::RandomMatrix(m, c.d_model, 300 + m);
    std::vector<float> y(m * c.d_model), dx(m * c.d_model);
    ForwardCache cache;
    ASSERT_TRUE((*ffn)->ForwardTrain(x.data(), m, y.data(), &cache).ok());
    common::ExpertWeights g;
    ASSERT_TRUE((*ffn)->Backward(x.data(), dy.data(), cache, dx.data(), &g).ok());
    const auto ref = testing::NaiveExpertBackward(c, ck.experts[0], x, dy, m);
    const double tol = 1e-4;
    ExpectClose(dx, ref.dx, tol, "dx");
    ExpectClose(g.w1, ref.w1, tol, "dW1");
    ExpectClose(g.w2, ref.w2, tol, "dW2");
    ExpectClose(g.w3, ref.w3, tol, "dW3");
    ExpectClose(g.b1, ref.b1, tol, "db1");
    ExpectClose(g.b2, ref.b2, tol, "db2");
    ExpectClose(g.b3, ref.b3, tol, "db3");
    EXPECT_EQ(g.b1.empty(), !GetParam().bias);
    EXPECT_EQ(g.w3.empty(), !GetParam().gated);
  }
}

TEST_P(ExpertFfnTest, SgdUpdatesWeightsAndKernel) {
  const common::ModelConfig c = Config(GetParam());
  const common::Checkpoint ck = common::MakeRandomCheckpoint({c, GetParam().bias, 13});
  auto ffn = ExpertFfn::Create(c, ck.experts[0]);
  ASSERT_TRUE(ffn.ok());
  const int64_t m = 9;
  const std::vector<float> x = common::RandomMatrix(m, c.d_model, 400);
  const std::vector<float> dy = common::RandomMatrix(m, c.d_model, 401);
  std::vector<float> y(m * c.d_model), dx(m * c.d_model);
  ForwardCache cache;
  ASSERT_TRUE((*ffn)->ForwardTrain(x.data(), m, y.data(), &cache).ok());
  common::ExpertWeights g;
  ASSERT_TRUE((*ffn)->Backward(x.data(), dy.data(), cache, dx.data(), &g).ok());
  const float lr = 0.5f;
  ASSERT_TRUE((*ffn)->ApplySgd(g, lr).ok());
  // Each of the six tensors, by the plain SGD loop (empty where the model has none).
  common::ExpertWeights expected = ck.experts[0];
  for (auto [w, gw] : {std::pair{&expected.w1, &g.w1}, std::pair{&expected.w2, &g.w2},
                       std::pair{&expected.w3, &g.w3}, std::pair{&expected.b1, &g.b1},
                       std::pair{&expected.b2, &g.b2}, std::pair{&expected.b3, &g.b3}}) {
    ASSERT_EQ(w->size(), gw->size());
    for (size_t i = 0; i < w->size(); ++i) (*w)[i] -= lr * (*gw)[i];
  }
  EXPECT_NE(expected.w1, ck.experts[0].w1) << "the step changed nothing: the test proves nothing";
  EXPECT_EQ((*ffn)->weights().w1, expected.w1);
  EXPECT_EQ((*ffn)->weights().w2, expected.w2);
  EXPECT_EQ((*ffn)->weights().w3, expected.w3);
  EXPECT_EQ((*ffn)->weights().b1, expected.b1);
  EXPECT_EQ((*ffn)->weights().b2, expected.b2);
  EXPECT_EQ((*ffn)->weights().b3, expected.b3);
  // The primitives use the new weights.
  ASSERT_TRUE((*ffn)->Forward(x.data(), m, y.data()).ok());
  ExpectClose(y, testing::NaiveExpertForward(c, expected, x, m), 1e-5, "after sgd");
  // Mismatched gradient sizes are refused.
  common::ExpertWeights short_grad = g;
  short_grad.w1.pop_back();
  EXPECT_EQ((*ffn)->ApplySgd(short_grad, lr).code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(AllVariants, ExpertFfnTest,
                         ::testing::Values(Case{Activation::kRelu, false, false},
                                           Case{Activation::kRelu, false, true},
                                           Case{Activation::kGelu, false, false},
                                           Case{Activation::kGelu, true, true},
                                           Case{Activation::kSilu, true, false},
                                           Case{Activation::kSilu, true, true},
                                           Case{Activation::kSilu, false, true}),
                         Name);

TEST(ExpertFfn, ConcurrentCallersGetIdenticalResults) {
  common::ModelConfig c = Config({Activation::kSilu, true, true});
  c.d_model = 64;
  c.d_ff = 128;
  const common::Checkpoint ck = common::MakeRandomCheckpoint({c, true, 21});
  auto ffn = ExpertFfn::Create(c, ck.experts[0]);
  ASSERT_TRUE(ffn.ok());
  constexpr int kThreads = 4;
  std::vector<std::vector<float>> inputs, serial;
  for (int t = 0; t < kThreads; ++t) {
    const int64_t m = 3 + 17 * t;
    inputs.push_back(common::RandomMatrix(m, c.d_model, 500 + t));
    serial.emplace_back(m * c.d_model);
    ASSERT_TRUE((*ffn)->Forward(inputs[t].data(), m, serial[t].data()).ok());
  }
  std::vector<std::vector<float>> parallel(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const int64_t m = static_cast<int64_t>(inputs[t].size()) / c.d_model;
      parallel[t].assign(m * c.d_model, 0.f);
      for (int rep = 0; rep < 20; ++rep) {
        if (!(*ffn)->Forward(inputs[t].data(), m, parallel[t].data()).ok()) return;
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(parallel[t], serial[t]) << "thread " << t;
}

// Shapes past the kernels' register and cache blocks, whose weights' rows are padded (gemm:jit
// path): 600 and 1000 to a cache line (608, 1008), 256 and 768 one line past a multiple of 1 KiB
// (272, 784). The tests above stay inside one block of each.
TEST(ExpertFfn, LargerShapesMatchNaiveLoops) {
  for (auto [d, f] : {std::pair<int64_t, int64_t>{600, 1000}, {256, 768}}) {
    common::ModelConfig c = Config({Activation::kSilu, true, true});
    c.d_model = d;
    c.d_ff = f;
    const common::Checkpoint ck = common::MakeRandomCheckpoint({c, true, 31});
    auto ffn = ExpertFfn::Create(c, ck.experts[0]);
    ASSERT_TRUE(ffn.ok()) << ffn.status();
    for (int64_t m : {1, 5, 70}) {
      const std::vector<float> x = common::RandomMatrix(m, c.d_model, 200 + m);
      std::vector<float> y(m * c.d_model, -1.f);
      ASSERT_TRUE((*ffn)->Forward(x.data(), m, y.data()).ok());
      ExpectClose(y, testing::NaiveExpertForward(c, ck.experts[0], x, m), 1e-5,
                  absl::StrCat("forward ", d, " x ", f, " m=", m));
    }
  }
}

// The ctest ExpertFfnOnAvx2 runs these tests with ONEDNN_MAX_CPU_ISA=AVX2, so that an AVX-512
// machine tests the gemm:jit path too: check that the cap took effect.
TEST(ExpertFfn, OneDnnHeldToAvx2WhenAsked) {
  const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (cap == nullptr || std::string(cap) != "AVX2") {
    GTEST_SKIP() << "ONEDNN_MAX_CPU_ISA is not AVX2";
  }
  const dnnl::cpu_isa isa = dnnl::get_effective_cpu_isa();
  EXPECT_TRUE(isa == dnnl::cpu_isa::avx2 || isa == dnnl::cpu_isa::avx ||
              isa == dnnl::cpu_isa::sse41)
      << "oneDNN runs ISA " << static_cast<int>(isa);
}

TEST(ExpertFfn, RejectsWrongWeightSizes) {
  common::ModelConfig c = Config({Activation::kRelu, false, false});
  common::ExpertWeights w = common::MakeRandomCheckpoint({c, false, 1}).experts[0];
  w.w2.resize(5);
  auto ffn = ExpertFfn::Create(c, w);
  EXPECT_EQ(ffn.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(ffn.status().message().find("w2.weight"), std::string::npos);
}

}  // namespace
}  // namespace moe::expert
