#ifndef MOE_EXPERT_SERVER_ACTIVATION_H_
#define MOE_EXPERT_SERVER_ACTIVATION_H_

#include <cmath>

#include "services/common/checkpoint.h"

namespace moe::expert {

// act(x) for the scalar (training) path; gelu is the exact erf form.
inline float Activate(common::Activation a, float x) {
  switch (a) {
    case common::Activation::kRelu:
      return x > 0.f ? x : 0.f;
    case common::Activation::kGelu:
      return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));
    case common::Activation::kSilu:
      return x / (1.f + std::exp(-x));
  }
  return 0.f;
}

// d act(x) / dx.
inline float ActivateGrad(common::Activation a, float x) {
  switch (a) {
    case common::Activation::kRelu:
      return x > 0.f ? 1.f : 0.f;
    case common::Activation::kGelu:
      return 0.5f * (1.f + std::erf(x * 0.70710678118654752f)) +
             x * 0.39894228040143268f * std::exp(-0.5f * x * x);
    case common::Activation::kSilu: {
      const float s = 1.f / (1.f + std::exp(-x));
      return s * (1.f + x * (1.f - s));
    }
  }
  return 0.f;
}

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVER_ACTIVATION_H_
