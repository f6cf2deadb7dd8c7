#include "router/moe_layer.h"

#include <algorithm>
#include <cstring>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "services/common/status_macros.h"

namespace moe::router {
namespace {

// Copies the rows of x named by the grouped assignments into `out` [rows, d].
void GatherRows(const float* x, int64_t d, int k, const int64_t* assignment, int64_t rows,
                float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(out + r * d, x + (assignment[r] / k) * d, sizeof(float) * d);
  }
}

}  // namespace

ExpertGroups GroupByExpert(const GatingResult& g) {
  ExpertGroups groups;
  const int E = g.num_experts, k = g.top_k;
  const int64_t total = g.tokens * k;
  groups.offsets.assign(E + 1, 0);
  for (int32_t e : g.expert_ids) {
    if (e >= 0) ++groups.offsets[e + 1];
  }
  for (int e = 0; e < E; ++e) groups.offsets[e + 1] += groups.offsets[e];
  groups.assignment.resize(groups.offsets[E]);
  groups.slot.assign(total, -1);
  std::vector<int64_t> cursor(groups.offsets.begin(), groups.offsets.end() - 1);
  for (int64_t a = 0; a < total; ++a) {
    const int e = g.expert_ids[a];
    if (e < 0) continue;
    groups.slot[a] = cursor[e];
    groups.assignment[cursor[e]++] = a;
  }
  return groups;
}

std::vector<float> CombineOutputs(const GatingResult& g, const ExpertGroups& groups,
                                  const float* eo, int64_t d) {
  const int k = g.top_k;
  std::vector<float> y(g.tokens * d, 0.f);
  for (int64_t t = 0; t < g.tokens; ++t) {
    float* yt = y.data() + t * d;
    for (int j = 0; j < k; ++j) {
      const int64_t slot = groups.slot[t * k + j];
      if (slot < 0) continue;
      const float w = g.weights[t * k + j];
      const float* o = eo + slot * d;
      for (int64_t i = 0; i < d; ++i) yt[i] += w * o[i];
    }
  }
  return y;
}

absl::StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::Create(common::Checkpoint ck,
                                                          const MoeLayerOptions& options) {
  auto layer = std::unique_ptr<MoeLayer>(new MoeLayer());
  layer->config_ = ck.config;
  layer->options_ = options;
  layer->gate_ = std::move(ck.gate);
  const common::ModelConfig& c = layer->config_;
  if (layer->gate_.weight.size() != static_cast<size_t>(c.num_experts) * c.d_model) {
    return absl::InvalidArgumentError("gate.weight does not match [E, d_model]");
  }
  if (static_cast<int>(ck.experts.size()) != c.num_experts) {
    return absl::InvalidArgumentError("the in-process layer needs every expert");
  }
  for (int e = 0; e < c.num_experts; ++e) {
    auto ffn = expert::ExpertFfn::Create(c, std::move(ck.experts[e]));
    if (!ffn.ok()) {
      return absl::Status(ffn.status().code(),
                          absl::StrCat("expert ", e, ": ", ffn.status().message()));
    }
    layer->experts_.push_back(std::move(*ffn));
  }
  return layer;
}

GateParams MoeLayer::gate_params() const {
  return GateParams{gate_.weight.data(), gate_.bias.empty() ? nullptr : gate_.bias.data(),
                    config_.num_experts, config_.d_model};
}

absl::Status MoeLayer::RunExperts(const ExpertGroups& groups, const float* in, float* out) const {
  const int64_t d = config_.d_model;
  // Largest groups first, handed out one at a time to the OpenMP threads; each expert's matmuls
  // then run single-threaded inside the parallel region (no nested teams).
  std::vector<int> order;
  for (int e = 0; e < config_.num_experts; ++e) {
    if (groups.offsets[e + 1] > groups.offsets[e]) order.push_back(e);
  }
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return groups.offsets[a + 1] - groups.offsets[a] > groups.offsets[b + 1] - groups.offsets[b];
  });
  std::vector<absl::Status> status(order.size());
  const int count = static_cast<int>(order.size());
#pragma omp parallel for schedule(dynamic, 1) if (count > 1)
  for (int i = 0; i < count; ++i) {
    const int e = order[i];
    const int64_t begin = groups.offsets[e], rows = groups.offsets[e + 1] - begin;
    status[i] = experts_[e]->Forward(in + begin * d, rows, out + begin * d);
  }
  for (absl::Status& st : status) RETURN_IF_ERROR(st);
  return absl::OkStatus();
}

absl::StatusOr<LayerOutput> MoeLayer::Forward(const float* x, int64_t n) const {
  const int k = config_.top_k;
  const int64_t d = config_.d_model;
  LayerOutput out;
  out.gating = Route(gate_params(), x, n,
                     GatingOptions{k, config_.normalize_topk, options_.capacity_factor, {}});
  const ExpertGroups groups = GroupByExpert(out.gating);
  const int64_t rows = static_cast<int64_t>(groups.assignment.size());
  // Scratch rows, left uninitialised: every row is written before it is read.
  std::unique_ptr<float[]> in(new float[rows * d]), eo(new float[rows * d]);
  GatherRows(x, d, k, groups.assignment.data(), rows, in.get());
  RETURN_IF_ERROR(RunExperts(groups, in.get(), eo.get()));
  out.y = CombineOutputs(out.gating, groups, eo.get(), d);
  return out;
}

absl::StatusOr<LayerGradients> MoeLayer::Backward(const float* x, const float* dy, int64_t n,
                                                  float aux_loss_coef, float z_loss_coef) const {
  const int k = config_.top_k, E = config_.num_experts;
  const int64_t d = config_.d_model;
  LayerGradients grads;
  grads.gating = Route(gate_params(), x, n,
                       GatingOptions{k, config_.normalize_topk, options_.capacity_factor, {}});
  const GatingResult& g = grads.gating;
  const ExpertGroups groups = GroupByExpert(g);
  const int64_t rows = static_cast<int64_t>(groups.assignment.size());
  std::vector<float> in(rows * d), eo(rows * d), dye(rows * d), dxe(rows * d);
  GatherRows(x, d, k, groups.assignment.data(), rows, in.data());
  std::vector<expert::ForwardCache> caches(E);
  for (int e = 0; e < E; ++e) {
    const int64_t begin = groups.offsets[e], count = groups.offsets[e + 1] - begin;
    RETURN_IF_ERROR(experts_[e]->ForwardTrain(in.data() + begin * d, count,
                                              eo.data() + begin * d, &caches[e]));
  }
  // dL/dw_tj = <dy_t, E_j(x_t)>; the expert sees dy_t scaled by w_tj.
  std::vector<float> dweights(n * k, 0.f);
  for (int64_t a = 0; a < n * k; ++a) {
    const int64_t slot = groups.slot[a];
    if (slot < 0) continue;
    const float* dyt = dy + (a / k) * d;
    const float* o = eo.data() + slot * d;
    float dot = 0.f;
    for (int64_t i = 0; i < d; ++i) dot += dyt[i] * o[i];
    dweights[a] = dot;
    const float w = g.weights[a];
    float* dst = dye.data() + slot * d;
    for (int64_t i = 0; i < d; ++i) dst[i] = w * dyt[i];
  }
  grads.experts.resize(E);
  for (int e = 0; e < E; ++e) {
    const int64_t begin = groups.offsets[e];
    RETURN_IF_ERROR(experts_[e]->Backward(in.data() + begin * d, dye.data() + begin * d,
                                          caches[e], dxe.data() + begin * d, &grads.experts[e]));
  }
  grads.grad_input.assign(n * d, 0.f);
  for (int64_t a = 0; a < n * k; ++a) {
    const int64_t slot = groups.slot[a];
    if (slot < 0) continue;
    float* gx = grads.grad_input.data() + (a / k) * d;
    const float* src = dxe.data() + slot * d;
    for (int64_t i = 0; i < d; ++i) gx[i] += src[i];
  }
  std::vector<float> dlogits(n * E);
  GateBackward(g, dweights.data(), config_.normalize_topk, aux_loss_coef, z_loss_coef,
               dlogits.data());
  grads.gate_weight.resize(static_cast<size_t>(E) * d);
  grads.gate_bias.resize(gate_.bias.size());
  GateParamBackward(gate_params(), x, dlogits.data(), n, grads.gate_weight.data(),
                    gate_.bias.empty() ? nullptr : grads.gate_bias.data(),
                    grads.grad_input.data());
  return grads;
}

absl::Status MoeLayer::ApplySgd(const LayerGradients& grads, float lr) {
  if (grads.gate_weight.size() != gate_.weight.size() ||
      grads.gate_bias.size() != gate_.bias.size() ||
      static_cast<int>(grads.experts.size()) != config_.num_experts) {
    return absl::InvalidArgumentError("gradients do not match the layer");
  }
  for (size_t i = 0; i < gate_.weight.size(); ++i) gate_.weight[i] -= lr * grads.gate_weight[i];
  for (size_t i = 0; i < gate_.bias.size(); ++i) gate_.bias[i] -= lr * grads.gate_bias[i];
  for (int e = 0; e < config_.num_experts; ++e) {
    RETURN_IF_ERROR(experts_[e]->ApplySgd(grads.experts[e], lr));
  }
  return absl::OkStatus();
}

common::Checkpoint MoeLayer::Snapshot() const {
  common::Checkpoint ck;
  ck.config = config_;
  ck.gate = gate_;
  for (const auto& e : experts_) ck.experts.push_back(e->weights());
  return ck;
}

}  // namespace moe::router
