// Parses arbitrary bytes as a moe.v1.Tensor and runs the validating decoder on it; accepted
// tensors are widened to FP32 and re-encoded as BF16.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "services/common/tensor_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::v1::Tensor tensor;
  if (!tensor.ParseFromArray(data, static_cast<int>(size))) return 0;
  moe::common::DecodeLimits limits;
  limits.max_elements = 1 << 20;
  auto view = moe::common::DecodeTensor(tensor, "fuzz", limits);
  if (!view.ok()) return 0;
  std::vector<float> values = moe::common::ViewToFloat(*view);
  moe::v1::Tensor out;
  moe::common::EncodeTensor(values, view->shape, moe::common::WireType::kBFloat16, &out);
  if (view->num_elements > 0 && view->dim(view->shape.size() - 1) > 0) {
    (void)moe::common::DecodeMatrix(tensor, "fuzz", view->dim(view->shape.size() - 1), limits);
  }
  return 0;
}
