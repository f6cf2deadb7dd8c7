#include "router/gating.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moe::router {

namespace {

// sum_i a[i] * b[i] in 16 independent partial sums, so the compiler can keep them in vector
// registers (a single running sum is one long chain of dependent adds that it may not reorder).
float Dot(const float* a, const float* b, int d) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  float sum = acc[0];
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

void ComputeLogits(const GateParams& gate, const float* x, int64_t n, float* logits) {
  const int e_count = gate.num_experts, d = gate.d_model;
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * d;
    for (int e = 0; e < e_count; ++e) {
      const float* we = gate.weight + static_cast<int64_t>(e) * d;
      logits[t * e_count + e] = Dot(we, xt, d) + (gate.bias != nullptr ? gate.bias[e] : 0.f);
    }
  }
}

int64_t ExpertCapacity(int64_t tokens, int top_k, int num_experts, double capacity_factor) {
  if (capacity_factor <= 0.0) return 0;
  const double c = std::ceil(static_cast<double>(tokens) * top_k / num_experts * capacity_factor);
  return std::max<int64_t>(static_cast<int64_t>(c), 0);
}

GatingResult RouteFromLogits(std::vector<float> logits, int64_t n, int num_experts,
                             const GatingOptions& options) {
  GatingResult g;
  const int E = num_experts, k = options.top_k;
  g.tokens = n;
  g.num_experts = E;
  g.top_k = k;
  g.logits = std::move(logits);
  g.probs.resize(static_cast<size_t>(n) * E);
  g.lse.resize(static_cast<size_t>(n));
  g.selected.resize(static_cast<size_t>(n) * k);
  g.selected_weights.resize(static_cast<size_t>(n) * k);
  std::vector<int> order(E);
  std::vector<int64_t> selected_count(E, 0);
  double z_sum = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    const float* l = &g.logits[t * E];
    float* p = &g.probs[t * E];
    float mx = l[0];
    for (int e = 1; e < E; ++e) mx = std::max(mx, l[e]);
    float sum = 0.f;
    for (int e = 0; e < E; ++e) {
      p[e] = std::exp(l[e] - mx);
      sum += p[e];
    }
    for (int e = 0; e < E; ++e) p[e] /= sum;
    g.lse[t] = mx + std::log(sum);
    z_sum += static_cast<double>(g.lse[t]) * g.lse[t];

    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [p](int a, int b) {
      return p[a] > p[b] || (p[a] == p[b] && a < b);
    });
    float topk_sum = 0.f;
    for (int j = 0; j < k; ++j) topk_sum += p[order[j]];
    for (int j = 0; j < k; ++j) {
      const int e = order[j];
      g.selected[t * k + j] = e;
      g.selected_weights[t * k + j] = options.normalize_topk ? p[e] / topk_sum : p[e];
      ++selected_count[e];
    }
  }

  g.expert_ids = g.selected;
  g.weights = g.selected_weights;
  g.expert_load.assign(E, 0);
  g.capacity = ExpertCapacity(n, k, E, options.capacity_factor);
  for (int j = 0; j < k; ++j) {
    for (int64_t t = 0; t < n; ++t) {
      const size_t a = t * k + j;
      const int e = g.selected[a];
      const int64_t cap =
          g.capacity * (options.capacity_scale.empty() ? 1 : options.capacity_scale[e]);
      if (g.capacity > 0 && g.expert_load[e] >= cap) {
        g.expert_ids[a] = -1;
        g.weights[a] = 0.f;
        ++g.dropped;
      } else {
        if (g.capacity > 0 && g.expert_load[e] >= g.capacity) ++g.spilled;
        ++g.expert_load[e];
      }
    }
  }

  if (n > 0) {
    double lb = 0.0;
    for (int e = 0; e < E; ++e) {
      double mean_p = 0.0;
      for (int64_t t = 0; t < n; ++t) mean_p += g.probs[t * E + e];
      mean_p /= static_cast<double>(n);
      lb += static_cast<double>(selected_count[e]) / (static_cast<double>(n) * k) * mean_p;
    }
    g.load_balance_loss = static_cast<float>(E * lb);
    g.router_z_loss = static_cast<float>(z_sum / static_cast<double>(n));
  }
  return g;
}

GatingResult Route(const GateParams& gate, const float* x, int64_t n,
                   const GatingOptions& options) {
  std::vector<float> logits(static_cast<size_t>(n) * gate.num_experts);
  ComputeLogits(gate, x, n, logits.data());
  return RouteFromLogits(std::move(logits), n, gate.num_experts, options);
}

void GateBackward(const GatingResult& g, const float* dweights, bool normalize_topk,
                  float aux_loss_coef, float z_loss_coef, float* dlogits) {
  const int E = g.num_experts, k = g.top_k;
  const int64_t n = g.tokens;
  if (n == 0) return;
  std::vector<float> aux(E, 0.f);
  if (aux_loss_coef != 0.f) {
    // d(E * sum_i f_i mean_t p_ti) / d p_ti = E f_i / N; f is a count, not differentiated.
    std::vector<int64_t> count(E, 0);
    for (int32_t e : g.selected) ++count[e];
    for (int e = 0; e < E; ++e) {
      const double f = static_cast<double>(count[e]) / (static_cast<double>(n) * k);
      aux[e] = static_cast<float>(aux_loss_coef * E * f / static_cast<double>(n));
    }
  }
  std::vector<float> dp(E);
  for (int64_t t = 0; t < n; ++t) {
    const float* p = &g.probs[t * E];
    for (int e = 0; e < E; ++e) dp[e] = aux[e];
    const int32_t* sel = &g.selected[t * k];
    const int32_t* ids = &g.expert_ids[t * k];
    const float* dw = dweights + t * k;
    if (normalize_topk) {
      // w_j = p_j / S with S the sum of the k selected p: dp_j = (dw_j - sum_i dw_i w_i) / S.
      float s = 0.f, dot = 0.f;
      for (int j = 0; j < k; ++j) s += p[sel[j]];
      for (int j = 0; j < k; ++j) {
        if (ids[j] >= 0) dot += dw[j] * g.selected_weights[t * k + j];
      }
      for (int j = 0; j < k; ++j) {
        const float dwj = ids[j] >= 0 ? dw[j] : 0.f;
        dp[sel[j]] += (dwj - dot) / s;
      }
    } else {
      for (int j = 0; j < k; ++j) {
        if (ids[j] >= 0) dp[sel[j]] += dw[j];
      }
    }
    float pdp = 0.f;
    for (int e = 0; e < E; ++e) pdp += p[e] * dp[e];
    const float z = z_loss_coef * 2.f * g.lse[t] / static_cast<float>(n);
    float* dl = dlogits + t * E;
    for (int e = 0; e < E; ++e) dl[e] = p[e] * (dp[e] - pdp) + z * p[e];
  }
}

void GateParamBackward(const GateParams& gate, const float* x, const float* dlogits, int64_t n,
                       float* dweight, float* dbias, float* dx) {
  const int E = gate.num_experts, d = gate.d_model;
  std::fill(dweight, dweight + static_cast<int64_t>(E) * d, 0.f);
  if (dbias != nullptr) std::fill(dbias, dbias + E, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * d;
    float* dxt = dx + t * d;
    for (int e = 0; e < E; ++e) {
      const float g = dlogits[t * E + e];
      if (dbias != nullptr) dbias[e] += g;
      float* dw = dweight + static_cast<int64_t>(e) * d;
      const float* w = gate.weight + static_cast<int64_t>(e) * d;
      for (int i = 0; i < d; ++i) {
        dw[i] += g * xt[i];
        dxt[i] += g * w[i];
      }
    }
  }
}

}  // namespace moe::router
