// The in-process MoeLayer forward (16 experts, d_model 512, d_ff 2048, top-2, N tokens), in
// tokens/s at 1 and 2 threads, gated and non-gated. bench/torch_layer.py runs the same layer in
// PyTorch; run_all.sh puts the two side by side.

#include <omp.h>

#include <benchmark/benchmark.h>

#include "router/moe_layer.h"
#include "services/common/random_checkpoint.h"

namespace {

void BM_LayerForward(benchmark::State& state, bool gated) {
  const int threads = static_cast<int>(state.range(1));
  omp_set_num_threads(threads);
  moe::common::ModelConfig c;
  c.num_experts = 16;
  c.d_model = 512;
  c.d_ff = 2048;
  c.top_k = 2;
  c.activation = gated ? moe::common::Activation::kSilu : moe::common::Activation::kRelu;
  c.gated = gated;
  auto layer = moe::router::MoeLayer::Create(moe::common::MakeRandomCheckpoint({c, false, 1}));
  if (!layer.ok()) {
    state.SkipWithError("layer creation failed");
    return;
  }
  const int64_t n = state.range(0);
  const std::vector<float> x = moe::common::RandomMatrix(n, c.d_model, 3);
  for (auto _ : state) {
    auto out = (*layer)->Forward(x.data(), n);
    if (!out.ok()) state.SkipWithError("forward failed");
    benchmark::DoNotOptimize(out);
  }
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK_CAPTURE(BM_LayerForward, relu, false)
    ->ArgsProduct({{256}, {1, 2}})->ArgNames({"N", "threads"})
    ->Unit(benchmark::kMillisecond)->MinTime(1.0)->UseRealTime();
BENCHMARK_CAPTURE(BM_LayerForward, gated_silu, true)
    ->ArgsProduct({{256}, {1, 2}})->ArgNames({"N", "threads"})
    ->Unit(benchmark::kMillisecond)->MinTime(1.0)->UseRealTime();

BENCHMARK_MAIN();
