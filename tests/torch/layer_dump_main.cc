// moe-layer-dump: runs the in-process MoeLayer forward and backward on a checkpoint and writes
// every result to one safetensors file, for the PyTorch cross-check (crosscheck.py).
//
// usage: moe-layer-dump CHECKPOINT INPUT OUTPUT AUX_COEF Z_COEF CAPACITY_FACTOR
// INPUT holds `tokens` [N, d_model] and `grad_output` [N, d_model].

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "router/moe_layer.h"
#include "services/common/flags.h"
#include "services/common/safetensors.h"
#include "services/common/signals.h"
#include "services/common/status_macros.h"

namespace {

constexpr char kUsage[] = R"(moe-layer-dump: runs the in-process MoE layer forward and backward on a
checkpoint and writes every result to one safetensors file (for tests/torch/crosscheck.py).

usage: moe-layer-dump CHECKPOINT INPUT OUTPUT AUX_COEF Z_COEF CAPACITY_FACTOR

INPUT holds `tokens` [N, d_model] and `grad_output` [N, d_model].
)";

absl::Status Run(int argc, char** argv) {
  if (argc != 7) {
    return moe::common::UsageError(
        "give CHECKPOINT INPUT OUTPUT AUX_COEF Z_COEF CAPACITY_FACTOR");
  }
  ASSIGN_OR_RETURN(moe::common::Checkpoint ck, moe::common::LoadCheckpoint(argv[1], {}));
  const moe::common::ModelConfig c = ck.config;
  ASSIGN_OR_RETURN(auto layer, moe::router::MoeLayer::Create(
                                   std::move(ck), moe::router::MoeLayerOptions{std::atof(argv[6])}));
  ASSIGN_OR_RETURN(auto in, moe::common::SafetensorsReader::Open(argv[2]));
  ASSIGN_OR_RETURN(std::vector<float> x, in->ReadFloat("tokens"));
  ASSIGN_OR_RETURN(std::vector<float> dy, in->ReadFloat("grad_output"));
  const int64_t n = static_cast<int64_t>(x.size()) / c.d_model;
  ASSIGN_OR_RETURN(moe::router::LayerOutput out, layer->Forward(x.data(), n));
  ASSIGN_OR_RETURN(moe::router::LayerGradients g,
                   layer->Backward(x.data(), dy.data(), n, std::atof(argv[4]), std::atof(argv[5])));
  moe::common::SafetensorsWriter w;
  const int64_t d = c.d_model, f = c.d_ff, e_count = c.num_experts, k = c.top_k;
  RETURN_IF_ERROR(w.AddF32("output", {n, d}, out.y));
  RETURN_IF_ERROR(w.AddI32("expert_ids", {n, k}, out.gating.expert_ids));
  RETURN_IF_ERROR(w.AddF32("weights", {n, k}, out.gating.weights));
  RETURN_IF_ERROR(w.AddF32("load_balance_loss", {1}, std::vector<float>{out.gating.load_balance_loss}));
  RETURN_IF_ERROR(w.AddF32("router_z_loss", {1}, std::vector<float>{out.gating.router_z_loss}));
  RETURN_IF_ERROR(w.AddF32("grad_input", {n, d}, g.grad_input));
  RETURN_IF_ERROR(w.AddF32("grad.gate.weight", {e_count, d}, g.gate_weight));
  if (!g.gate_bias.empty()) RETURN_IF_ERROR(w.AddF32("grad.gate.bias", {e_count}, g.gate_bias));
  for (int e = 0; e < e_count; ++e) {
    const auto& x_e = g.experts[e];
    const std::string p = absl::StrCat("grad.experts.", e, ".");
    RETURN_IF_ERROR(w.AddF32(p + "w1.weight", {f, d}, x_e.w1));
    RETURN_IF_ERROR(w.AddF32(p + "w2.weight", {d, f}, x_e.w2));
    if (!x_e.w3.empty()) RETURN_IF_ERROR(w.AddF32(p + "w3.weight", {f, d}, x_e.w3));
    if (!x_e.b1.empty()) RETURN_IF_ERROR(w.AddF32(p + "w1.bias", {f}, x_e.b1));
    if (!x_e.b2.empty()) RETURN_IF_ERROR(w.AddF32(p + "w2.bias", {d}, x_e.b2));
    if (!x_e.b3.empty()) RETURN_IF_ERROR(w.AddF32(p + "w3.bias", {f}, x_e.b3));
  }
  return w.Write(argv[3]);
}

}  // namespace

int main(int argc, char** argv) {
  return moe::common::RunMain(argc, argv, "moe-layer-dump", kUsage, Run);
}
