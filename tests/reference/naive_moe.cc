#include "tests/reference/naive_moe.h"

#include <algorithm>
#include <cmath>

namespace moe::testing {

double NaiveAct(common::Activation a, double x) {
  switch (a) {
    case common::Activation::kRelu: return std::max(0.0, x);
    case common::Activation::kGelu: return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case common::Activation::kSilu: return x / (1.0 + std::exp(-x));
  }
  return 0;
}

double NaiveActGrad(common::Activation a, double x) {
  const double h = 1e-6;
  if (a == common::Activation::kRelu) return x > 0 ? 1.0 : 0.0;
  return (NaiveAct(a, x + h) - NaiveAct(a, x - h)) / (2 * h);
}

namespace {

// h[f] = sum_d W[f, d] x[d] + b[f]
std::vector<double> Linear(const std::vector<float>& w, const std::vector<float>& b,
                           const double* x, int out, int in) {
  std::vector<double> h(out);
  for (int o = 0; o < out; ++o) {
    double acc = b.empty() ? 0.0 : b[o];
    for (int i = 0; i < in; ++i) acc += static_cast<double>(w[o * in + i]) * x[i];
    h[o] = acc;
  }
  return h;
}

}  // namespace

std::vector<double> NaiveExpertForward(const common::ModelConfig& c, const common::ExpertWeights& w,
                                       const std::vector<float>& x, int64_t m) {
  const int D = c.d_model, F = c.d_ff;
  std::vector<double> y(m * D);
  for (int64_t r = 0; r < m; ++r) {
    std::vector<double> xr(x.begin() + r * D, x.begin() + (r + 1) * D);
    std::vector<double> h1 = Linear(w.w1, w.b1, xr.data(), F, D);
    std::vector<double> a(F);
    for (int f = 0; f < F; ++f) a[f] = NaiveAct(c.activation, h1[f]);
    if (c.gated) {
      std::vector<double> h3 = Linear(w.w3, w.b3, xr.data(), F, D);
      for (int f = 0; f < F; ++f) a[f] *= h3[f];
    }
    std::vector<double> yr = Linear(w.w2, w.b2, a.data(), D, F);
    std::copy(yr.begin(), yr.end(), y.begin() + r * D);
  }
  return y;
}

NaiveExpertGrads NaiveExpertBackward(const common::ModelConfig& c, const common::ExpertWeights& w,
                                     const std::vector<float>& x, const std::vector<float>& dy,
                                     int64_t m) {
  const int D = c.d_model, F = c.d_ff;
  NaiveExpertGrads g;
  g.dx.assign(m * D, 0);
  g.w1.assign(F * D, 0);
  g.w2.assign(D * F, 0);
  if (c.gated) g.w3.assign(F * D, 0);
  if (!w.b1.empty()) g.b1.assign(F, 0);
  if (!w.b2.empty()) g.b2.assign(D, 0);
  if (!w.b3.empty()) g.b3.assign(F, 0);
  for (int64_t r = 0; r < m; ++r) {
    std::vector<double> xr(x.begin() + r * D, x.begin() + (r + 1) * D);
    std::vector<double> h1 = Linear(w.w1, w.b1, xr.data(), F, D);
    std::vector<double> h3 = c.gated ? Linear(w.w3, w.b3, xr.data(), F, D) : std::vector<double>();
    std::vector<double> a(F);
    for (int f = 0; f < F; ++f) a[f] = NaiveAct(c.activation, h1[f]) * (c.gated ? h3[f] : 1.0);
    const float* dyr = dy.data() + r * D;
    std::vector<double> da(F, 0);
    for (int o = 0; o < D; ++o) {
      if (!g.b2.empty()) g.b2[o] += dyr[o];
      for (int f = 0; f < F; ++f) {
        g.w2[o * F + f] += dyr[o] * a[f];
        da[f] += dyr[o] * w.w2[o * F + f];
      }
    }
    for (int f = 0; f < F; ++f) {
      const double act = NaiveAct(c.activation, h1[f]);
      const double dh1 = da[f] * (c.gated ? h3[f] : 1.0) * NaiveActGrad(c.activation, h1[f]);
      const double dh3 = c.gated ? da[f] * act : 0.0;
      if (!g.b1.empty()) g.b1[f] += dh1;
      if (!g.b3.empty()) g.b3[f] += dh3;
      for (int i = 0; i < D; ++i) {
        g.w1[f * D + i] += dh1 * xr[i];
        g.dx[r * D + i] += dh1 * w.w1[f * D + i];
        if (c.gated) {
          g.w3[f * D + i] += dh3 * xr[i];
          g.dx[r * D + i] += dh3 * w.w3[f * D + i];
        }
      }
    }
  }
  return g;
}

NaiveRouting NaiveRoute(const common::Checkpoint& ck, const std::vector<float>& x, int64_t n,
                        double capacity_factor) {
  const common::ModelConfig& c = ck.config;
  const int E = c.num_experts, D = c.d_model, k = c.top_k;
  NaiveRouting r;
  r.ids.assign(n * k, -1);
  r.weights.assign(n * k, 0);
  std::vector<int> count(E, 0);
  std::vector<double> mean_p(E, 0);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<double> xt(x.begin() + t * D, x.begin() + (t + 1) * D);
    std::vector<double> logit = Linear(ck.gate.weight, ck.gate.bias, xt.data(), E, D);
    const double mx = *std::max_element(logit.begin(), logit.end());
    double sum = 0;
    for (double l : logit) sum += std::exp(l - mx);
    const double lse = mx + std::log(sum);
    r.z_loss += lse * lse / n;
    std::vector<double> p(E);
    for (int e = 0; e < E; ++e) p[e] = std::exp(logit[e] - lse);
    r.probs.push_back(p);
    std::vector<int> order(E);
    for (int e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    double s = 0;
    for (int j = 0; j < k; ++j) s += p[order[j]];
    for (int j = 0; j < k; ++j) {
      r.ids[t * k + j] = order[j];
      r.weights[t * k + j] = c.normalize_topk ? p[order[j]] / s : p[order[j]];
      ++count[order[j]];
    }
    for (int e = 0; e < E; ++e) mean_p[e] += p[e] / n;
  }
  for (int e = 0; e < E; ++e) r.lb_loss += E * (static_cast<double>(count[e]) / (n * k)) * mean_p[e];
  if (capacity_factor > 0) {
    const int64_t cap = static_cast<int64_t>(std::ceil(static_cast<double>(n) * k / E * capacity_factor));
    std::vector<int64_t> used(E, 0);
    for (int j = 0; j < k; ++j) {
      for (int64_t t = 0; t < n; ++t) {
        const int e = r.ids[t * k + j];
        if (used[e] < cap) {
          ++used[e];
        } else {
          r.ids[t * k + j] = -1;
          r.weights[t * k + j] = 0;
          ++r.dropped;
        }
      }
    }
  }
  return r;
}

std::vector<double> NaiveLayerForward(const common::Checkpoint& ck, const std::vector<float>& x,
                                      int64_t n, double capacity_factor) {
  const int D = ck.config.d_model, k = ck.config.top_k;
  NaiveRouting r = NaiveRoute(ck, x, n, capacity_factor);
  std::vector<double> y(n * D, 0);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<float> xt(x.begin() + t * D, x.begin() + (t + 1) * D);
    for (int j = 0; j < k; ++j) {
      const int e = r.ids[t * k + j];
      if (e < 0) continue;
      std::vector<double> o = NaiveExpertForward(ck.config, ck.experts[e], xt, 1);
      for (int i = 0; i < D; ++i) y[t * D + i] += r.weights[t * k + j] * o[i];
    }
  }
  return y;
}

double NaiveLayerLoss(const common::Checkpoint& ck, const std::vector<float>& x,
                      const std::vector<float>& dy, int64_t n, double capacity_factor, double aux,
                      double z) {
  std::vector<double> y = NaiveLayerForward(ck, x, n, capacity_factor);
  NaiveRouting r = NaiveRoute(ck, x, n, capacity_factor);
  double loss = aux * r.lb_loss + z * r.z_loss;
  for (size_t i = 0; i < y.size(); ++i) loss += y[i] * dy[i];
  return loss;
}

}  // namespace moe::testing
