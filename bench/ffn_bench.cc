// Expert FFN forward GFLOP/s on oneDNN at M rows (d_model 512, d_ff 2048, 1 thread), beside this
// machine's FP32 FMA peak measured just before each run (0.1 s): counter `of_peak` is the ratio.
// This VM's speed drifts within a minute, and a peak measured once at the start made the ratio
// at M = 1024 move between 0.75 and 0.88 from run to run. 3 repetitions, medians reported.

#include <omp.h>

#include <cstdio>

#include <benchmark/benchmark.h>

#include "bench/fma_peak.h"
#include "expert_server/expert_ffn.h"
#include "services/common/random_checkpoint.h"

namespace {

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
  (void)(*ffn)->Forward(x.data(), m, y.data());
  const double peak = moe::bench::MeasureFmaPeakGflops(0.1);
  for (auto _ : state) {
    if (!(*ffn)->Forward(x.data(), m, y.data()).ok()) state.SkipWithError("forward failed");
    benchmark::DoNotOptimize(y.data());
  }
  const double flops = (*ffn)->FlopsPerRow() * static_cast<double>(m);
  state.counters["GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["of_peak"] = benchmark::Counter(
      flops * 1e-9 / peak, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_GFLOPs"] = peak;
}

}  // namespace

int main(int argc, char** argv) {
  std::fprintf(stderr, "FP32 FMA peak (1 thread, %s): %.1f GFLOP/s at the start\n",
               moe::bench::PeakIsa(), moe::bench::MeasureFmaPeakGflops());
  for (bool gated : {false, true}) {
    auto* b = benchmark::RegisterBenchmark(gated ? "ExpertForward/gated_silu" : "ExpertForward/relu",
                                           BM_ExpertForward, gated);
    for (int m : {1, 8, 32, 64, 256, 1024}) b->Arg(m);
    b->Unit(benchmark::kMicrosecond)->MinTime(0.3)->UseRealTime()->Repetitions(3)->ReportAggregatesOnly(
        true);
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
