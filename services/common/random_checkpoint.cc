#include "services/common/random_checkpoint.h"

#include <cmath>
#include <random>

namespace moe::common {
namespace {

std::vector<float> Uniform(std::mt19937_64& rng, size_t n, double bound, bool integer_valued) {
  std::vector<float> v(n);
  if (integer_valued) {
    // Multiples of 1/8 in [-1, 1]: exactly representable, products stay exact in FP32.
    std::uniform_int_distribution<int> dist(-8, 8);
    for (float& x : v) x = static_cast<float>(dist(rng)) / 8.f;
    return v;
  }
  std::uniform_real_distribution<double> dist(-bound, bound);
  for (float& x : v) x = static_cast<float>(dist(rng));
  return v;
}

}  // namespace

Checkpoint MakeRandomCheckpoint(const RandomCheckpointSpec& spec) {
  const ModelConfig& c = spec.config;
  std::mt19937_64 rng(spec.seed);
  const double in_bound = 1.0 / std::sqrt(static_cast<double>(c.d_model));
  const double ff_bound = 1.0 / std::sqrt(static_cast<double>(c.d_ff));
  const size_t up = static_cast<size_t>(c.d_ff) * c.d_model;
  const bool iv = spec.integer_valued;
  Checkpoint ck;
  ck.config = c;
  ck.gate.weight = Uniform(rng, static_cast<size_t>(c.num_experts) * c.d_model, in_bound, iv);
  if (spec.bias) ck.gate.bias = Uniform(rng, c.num_experts, in_bound, iv);
  ck.experts.resize(c.num_experts);
  for (ExpertWeights& w : ck.experts) {
    w.w1 = Uniform(rng, up, in_bound, iv);
    w.w2 = Uniform(rng, up, ff_bound, iv);
    if (c.gated) w.w3 = Uniform(rng, up, in_bound, iv);
    if (spec.bias) {
      w.b1 = Uniform(rng, c.d_ff, in_bound, iv);
      w.b2 = Uniform(rng, c.d_model, ff_bound, iv);
      if (c.gated) w.b3 = Uniform(rng, c.d_ff, in_bound, iv);
    }
  }
  return ck;
}

std::vector<float> RandomMatrix(int64_t n, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  return Uniform(rng, static_cast<size_t>(n * cols), 1.0, false);
}

}  // namespace moe::common
