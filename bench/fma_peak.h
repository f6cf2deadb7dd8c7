#ifndef MOE_BENCH_FMA_PEAK_H_
#define MOE_BENCH_FMA_PEAK_H_

namespace moe::bench {

// This machine's single-thread FP32 FMA peak in GFLOP/s, measured now with 12 independent FMA
// chains per vector register width the CPU has (AVX-512 when present, else AVX2+FMA).
double MeasureFmaPeakGflops(double seconds = 0.3);

// The widest vector ISA the peak kernel used ("avx512f", "avx2", or "scalar").
const char* PeakIsa();

}  // namespace moe::bench

#endif  // MOE_BENCH_FMA_PEAK_H_
