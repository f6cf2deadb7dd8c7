#ifndef MOE_SERVICES_COMMON_RANDOM_CHECKPOINT_H_
#define MOE_SERVICES_COMMON_RANDOM_CHECKPOINT_H_

#include <cstdint>

#include "services/common/checkpoint.h"

namespace moe::common {

struct RandomCheckpointSpec {
  ModelConfig config;
  bool bias = false;
  uint64_t seed = 1;
  // Draw weights as multiples of 1/8 in [-1, 1] instead of uniform floats (exact tests).
  bool integer_valued = false;
};

// A seeded random layer; weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) like torch.nn.Linear.
Checkpoint MakeRandomCheckpoint(const RandomCheckpointSpec& spec);

// n * cols values ~ U(-1, 1), seeded.
std::vector<float> RandomMatrix(int64_t n, int64_t cols, uint64_t seed);

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_RANDOM_CHECKPOINT_H_
