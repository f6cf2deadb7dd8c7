// Expert FFN forward GFLOP/s on oneDNN at M rows (d_model 512, d_ff 2048, 1 thread), beside this
// machine's FP32 FMA peak measured in the same run. Counter `of_peak` is the ratio.

#include <omp.h>

#include <cstdio>

#include <benchmark/benchmark.h>

#include "bench/fma_peak.h"
#include "expert_server/expert_ffn.h"
#include "services/common/random_checkpoint.h"

namespace {

double g_peak = 0.0;

void BM_ExpertForward(benchmark::State& state, bool gated) {
  omp_set_num_threads(1);
  moe::common::ModelConfig c;
  c.num_experts = 1;
  c.d_model = 512;
  c.d_ff = 2048;
  c.top_k = 1;
  c.activation = gated ? moe::common::Activation::kSilu : moe::common::Activation::kRelu;
  c.gated = gated;
  auto ck = moe::common::MakeRandomCheckpoint({c, false, 1});
  auto ffn = moe::expert::ExpertFfn::Create(c, ck.experts[0]);
  if (!ffn.ok()) {
    state.SkipWithError("expert creation failed");
    return;
  }
  const int64_t m = state.range(0);
  const std::vector<float> x = moe::common::RandomMatrix(m, c.d_model, 2);
  std::vector<float> y(m * c.d_model);
  for (auto _ : state) {
    if (!(*ffn)->Forward(x.data(), m, y.data()).ok()) state.SkipWithError("forward failed");
    benchmark::DoNotOptimize(y.data());
  }
  const double flops = (*ffn)->FlopsPerRow() * static_cast<double>(m);
  state.counters["GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["of_peak"] = benchmark::Counter(
      flops * 1e-9 / g_peak, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_GFLOPs"] = g_peak;
}

}  // namespace

int main(int argc, char** argv) {
  g_peak = moe::bench::MeasureFmaPeakGflops();
  std::fprintf(stderr, "FP32 FMA peak (1 thread, %s): %.1f GFLOP/s\n", moe::bench::PeakIsa(),
               g_peak);
  for (bool gated : {false, true}) {
    auto* b = benchmark::RegisterBenchmark(gated ? "ExpertForward/gated_silu" : "ExpertForward/relu",
                                           BM_ExpertForward, gated);
    for (int m : {1, 8, 32, 64, 256, 1024}) b->Arg(m);
    b->Unit(benchmark::kMicrosecond)->MinTime(0.3)->UseRealTime();
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
