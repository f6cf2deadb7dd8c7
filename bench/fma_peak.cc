#include "bench/fma_peak.h"

#include <immintrin.h>

#include <chrono>

namespace moe::bench {
namespace {

// Each iteration issues kChains independent FMAs; different start values stop the compiler from
// merging chains. Returns a value derived from the accumulators so nothing is optimised away.
constexpr int kChains = 12;

#pragma GCC push_options
#pragma GCC optimize("O3", "unroll-loops")

__attribute__((target("avx512f"))) float Avx512Loop(long iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * (i + 1));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  float out[16];
  _mm512_storeu_ps(out, s);
  return out[0] + out[15];
}

__attribute__((target("avx2,fma"))) float Avx2Loop(long iters) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(0.001f * (i + 1));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, acc[i]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0] + out[7];
}

#pragma GCC pop_options

volatile float g_sink;

}  // namespace

const char* PeakIsa() {
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  return "scalar";
}

double MeasureFmaPeakGflops(double seconds) {
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!avx512 && !avx2) return 0.0;
  const int lanes = avx512 ? 16 : 8;
  auto run = [&](long iters) { g_sink = avx512 ? Avx512Loop(iters) : Avx2Loop(iters); };
  run(1 << 20);  // warm up (frequency, caches)
  double best = 0.0;
  long iters = 1 << 22;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  do {
    const auto t0 = std::chrono::steady_clock::now();
    run(iters);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double gflops = 2.0 * kChains * lanes * static_cast<double>(iters) / dt * 1e-9;
    if (gflops > best) best = gflops;
  } while (std::chrono::steady_clock::now() < deadline);
  return best;
}

}  // namespace moe::bench
