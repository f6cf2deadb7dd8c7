#ifndef MOE_EXPERT_SERVER_EXPERT_FFN_H_
#define MOE_EXPERT_SERVER_EXPERT_FFN_H_

// One expert's feed-forward network on oneDNN:
//   E(x) = W2 act(W1 x + b1) + b2, or gated: W2 (act(W1 x + b1) * (W3 x + b3)) + b2.
// The weights are reordered once into the layout of this CPU's fastest matmul (blocked for brgemm
// on AVX-512, plain with padded rows for gemm:jit elsewhere; expert_ffn.cc says why), and the
// matmuls take any row count. Every const method is safe to call from several threads at once
// (each call uses its own stream and scratchpad).

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "services/common/checkpoint.h"

namespace moe::expert {

// One parameter's SGD update, w - lr * g: ExpertFfn::ApplySgd applies it, and a training step
// checks with it, before the step commits, that the update leaves every weight finite.
inline float SgdStep(float w, float lr, float g) { return w - lr * g; }

// What ForwardTrain keeps for Backward, for one batch of rows.
struct ForwardCache {
  int64_t rows = 0;
  std::vector<float> h1;  // [rows, d_ff] pre-activation W1 x + b1
  std::vector<float> h3;  // [rows, d_ff] W3 x + b3 (gated only)
  std::vector<float> a;   // [rows, d_ff] act(h1) (* h3 when gated): the input of W2
};

class ExpertFfn {
 public:
  // Validates the weights' sizes against `config` and builds the primitives.
  static absl::StatusOr<std::unique_ptr<ExpertFfn>> Create(const common::ModelConfig& config,
                                                           common::ExpertWeights weights);
  ~ExpertFfn();

  // y[rows, d_model] = E(x[rows, d_model]). rows may be 0.
  absl::Status Forward(const float* x, int64_t rows, float* y) const;

  // Forward that also keeps the activations Backward needs.
  absl::Status ForwardTrain(const float* x, int64_t rows, float* y, ForwardCache* cache) const;

  // From dy = dL/dy for the rows of `cache`, writes dx[rows, d_model] and every gradient into
  // `grads` (resized to the weights' shapes; biases only where the expert has them).
  absl::Status Backward(const float* x, const float* dy, const ForwardCache& cache, float* dx,
                        common::ExpertWeights* grads) const;

  // W = SgdStep(W, lr, grad) for every parameter, then re-reorders. Not safe concurrently with
  // Forward.
  absl::Status ApplySgd(const common::ExpertWeights& grads, float lr);

  const common::ExpertWeights& weights() const { return weights_; }
  const common::ModelConfig& config() const { return config_; }
  // Multiply-adds per row of Forward, times two.
  double FlopsPerRow() const;

  struct Impl;

 private:
  ExpertFfn() = default;
  absl::Status Rebuild();

  common::ModelConfig config_;
  common::ExpertWeights weights_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVER_EXPERT_FFN_H_
