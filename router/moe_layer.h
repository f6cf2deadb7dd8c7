#ifndef MOE_ROUTER_MOE_LAYER_H_
#define MOE_ROUTER_MOE_LAYER_H_

// The whole MoE layer in one process: gating, the experts on oneDNN and the gate-weighted
// combine, forward and backward plus SGD. It is the reference the cluster is checked against.

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "expert_server/expert_ffn.h"
#include "router/gating.h"
#include "services/common/checkpoint.h"

namespace moe::router {

// Rows of a batch grouped by expert: for expert e, assignments
// [offsets[e], offsets[e+1]) of `assignment` (each t * k + j) in token order.
struct ExpertGroups {
  std::vector<int64_t> offsets;     // [E + 1]
  std::vector<int64_t> assignment;  // admitted assignments
  std::vector<int64_t> slot;        // [N * k]: row of each assignment in the grouped order, or -1
};
ExpertGroups GroupByExpert(const GatingResult& g);

// y [N, d] = sum_j w_tj * eo[slot(t, j)], added in rank order j = 0..k-1 for every token; `eo`
// holds the expert outputs in grouped order. The one combine both the layer and the router use.
std::vector<float> CombineOutputs(const GatingResult& g, const ExpertGroups& groups,
                                  const float* eo, int64_t d);

struct MoeLayerOptions {
  double capacity_factor = 0.0;
};

struct LayerOutput {
  std::vector<float> y;  // [N, d_model]
  GatingResult gating;
};

struct LayerGradients {
  std::vector<float> grad_input;  // [N, d_model]
  std::vector<float> gate_weight;  // [E, d_model]
  std::vector<float> gate_bias;    // [E] or empty
  std::vector<common::ExpertWeights> experts;  // every expert, zero where it got no tokens
  GatingResult gating;
};

class MoeLayer {
 public:
  static absl::StatusOr<std::unique_ptr<MoeLayer>> Create(common::Checkpoint checkpoint,
                                                          const MoeLayerOptions& options = {});

  // y = sum_j w_j E_{e_j}(x) for x [n, d_model]. Safe from several threads at once.
  absl::StatusOr<LayerOutput> Forward(const float* x, int64_t n) const;

  // Exact gradients of L + aux * load_balance_loss + z * router_z_loss where dL/dy = dy.
  absl::StatusOr<LayerGradients> Backward(const float* x, const float* dy, int64_t n,
                                          float aux_loss_coef, float z_loss_coef) const;

  // W -= lr * dW for the gate and every expert.
  absl::Status ApplySgd(const LayerGradients& grads, float lr);

  const common::ModelConfig& config() const { return config_; }
  const MoeLayerOptions& options() const { return options_; }
  const expert::ExpertFfn& expert(int e) const { return *experts_[e]; }
  GateParams gate_params() const;
  // The current weights as a checkpoint.
  common::Checkpoint Snapshot() const;

 private:
  MoeLayer() = default;
  // Runs every expert's group of rows (in -> out, grouped order) across the OpenMP threads.
  absl::Status RunExperts(const ExpertGroups& groups, const float* in, float* out) const;
  common::ModelConfig config_;
  MoeLayerOptions options_;
  common::GateWeights gate_;
  std::vector<std::unique_ptr<expert::ExpertFfn>> experts_;
};


}  // namespace moe::router

#endif  // MOE_ROUTER_MOE_LAYER_H_
