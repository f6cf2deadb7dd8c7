#ifndef MOE_ROUTER_GATING_H_
#define MOE_ROUTER_GATING_H_

// Token-to-expert gating (DESIGN.md): logits = Wg x + bg, p = softmax(logits), the top-k largest
// p (ties: lower expert id), weights normalised over the k when normalize_topk, capacity with
// drop, the load-balance and z losses, and the backward of all of it. No gRPC here.

#include <cstdint>
#include <vector>

namespace moe::router {

struct GateParams {
  const float* weight = nullptr;  // [E, d_model]
  const float* bias = nullptr;    // [E] or null
  int num_experts = 0;
  int d_model = 0;
};

struct GatingOptions {
  int top_k = 1;
  bool normalize_topk = true;
  double capacity_factor = 0.0;  // 0: no capacity limit
  // Per-expert multiplier of the capacity (e.g. its replica count when overflow spills to other
  // replicas); empty means 1 for every expert.
  std::vector<int> capacity_scale;
};

struct GatingResult {
  int64_t tokens = 0;
  int num_experts = 0;
  int top_k = 0;
  std::vector<float> logits;  // [N, E]
  std::vector<float> probs;   // [N, E]
  std::vector<float> lse;     // [N] logsumexp of each token's logits
  // The k choices of each token in rank order, before capacity, [N, k].
  std::vector<int32_t> selected;
  std::vector<float> selected_weights;
  // What the combine uses, [N, k]: the expert id or -1 when dropped; the weight or 0 when dropped.
  std::vector<int32_t> expert_ids;
  std::vector<float> weights;
  std::vector<int64_t> expert_load;  // admitted assignments per expert, [E]
  int64_t dropped = 0;
  int64_t capacity = 0;  // per expert (per replica when scaled); 0 when unlimited
  int64_t spilled = 0;   // admitted assignments past the unscaled capacity
  float load_balance_loss = 0.f;
  float router_z_loss = 0.f;
};

// logits[n, E] = x[n, d_model] Wg^T + bg.
void ComputeLogits(const GateParams& gate, const float* x, int64_t n, float* logits);

// Capacity per expert for a batch: ceil(N k / E * cf), or 0 (unlimited) when cf <= 0.
int64_t ExpertCapacity(int64_t tokens, int top_k, int num_experts, double capacity_factor);

// Everything after the logits: softmax, top-k, weights, capacity (first choices first, then
// token order), losses. `logits` is [n, E].
GatingResult RouteFromLogits(std::vector<float> logits, int64_t n, int num_experts,
                             const GatingOptions& options);

// ComputeLogits + RouteFromLogits.
GatingResult Route(const GateParams& gate, const float* x, int64_t n, const GatingOptions& options);

// dL/dlogits [N, E] from dL/dw for each (token, rank) [N, k] (ignored where dropped), plus
// aux_loss_coef * load_balance_loss + z_loss_coef * router_z_loss.
void GateBackward(const GatingResult& g, const float* dweights, bool normalize_topk,
                  float aux_loss_coef, float z_loss_coef, float* dlogits);

// From dlogits [n, E]: dWg [E, d_model] = dlogits^T x and dbg [E] (if non-null) are written;
// dx [n, d_model] += dlogits Wg.
void GateParamBackward(const GateParams& gate, const float* x, const float* dlogits, int64_t n,
                       float* dweight, float* dbias, float* dx);

}  // namespace moe::router

#endif  // MOE_ROUTER_GATING_H_
