#ifndef MOE_TESTS_REFERENCE_NAIVE_MOE_H_
#define MOE_TESTS_REFERENCE_NAIVE_MOE_H_

// Plain double-precision loops straight from DESIGN.md's formulas: the independent reference the
// unit tests compare the optimised code against. Slow on purpose; no shared code with it.

#include <cstdint>
#include <vector>

#include "services/common/checkpoint.h"

namespace moe::testing {

double NaiveAct(common::Activation a, double x);
double NaiveActGrad(common::Activation a, double x);

// y [m, d_model] of one expert.
std::vector<double> NaiveExpertForward(const common::ModelConfig& c, const common::ExpertWeights& w,
                                       const std::vector<float>& x, int64_t m);

struct NaiveExpertGrads {
  std::vector<double> dx, w1, w2, w3, b1, b2, b3;
};
NaiveExpertGrads NaiveExpertBackward(const common::ModelConfig& c, const common::ExpertWeights& w,
                                     const std::vector<float>& x, const std::vector<float>& dy,
                                     int64_t m);

struct NaiveRouting {
  std::vector<int> ids;         // [n, k], -1 when dropped
  std::vector<double> weights;  // [n, k], 0 when dropped
  std::vector<std::vector<double>> probs;
  double lb_loss = 0, z_loss = 0;
  int64_t dropped = 0;
};
NaiveRouting NaiveRoute(const common::Checkpoint& ck, const std::vector<float>& x, int64_t n,
                        double capacity_factor);

std::vector<double> NaiveLayerForward(const common::Checkpoint& ck, const std::vector<float>& x,
                                      int64_t n, double capacity_factor);

// The scalar loss used for gradient checks: sum(y * dy) + aux * lb + z * zl, in double.
double NaiveLayerLoss(const common::Checkpoint& ck, const std::vector<float>& x,
                      const std::vector<float>& dy, int64_t n, double capacity_factor, double aux,
                      double z);

}  // namespace moe::testing

#endif  // MOE_TESTS_REFERENCE_NAIVE_MOE_H_
