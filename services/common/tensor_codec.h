#ifndef MOE_SERVICES_COMMON_TENSOR_CODEC_H_
#define MOE_SERVICES_COMMON_TENSOR_CODEC_H_

// Validating decoder and encoder between moe.v1.Tensor and FP32 host buffers.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "moe/v1/tensor.pb.h"

namespace moe::common {

enum class WireType { kFloat32, kBFloat16 };

// Bytes per element of `type`.
size_t ElementSize(WireType type);

// Bounds a decoder enforces before touching the payload.
struct DecodeLimits {
  int max_rank = 8;
  int64_t max_elements = int64_t{1} << 31;
};

// A checked, non-owning view of a Tensor's payload (valid while the message lives).
struct TensorView {
  std::vector<int64_t> shape;
  WireType type = WireType::kFloat32;
  int64_t num_elements = 0;
  absl::string_view bytes;

  // Dimension `i`, or 0 past the rank.
  int64_t dim(size_t i) const { return i < shape.size() ? shape[i] : 0; }
};

// Validates rank and dims (>= 0, product without overflow, within limits), the dtype and that
// the byte length equals elements * element size. Errors are INVALID_ARGUMENT, or
// RESOURCE_EXHAUSTED past `limits`, and name `what` (e.g. "tokens").
absl::StatusOr<TensorView> DecodeTensor(const moe::v1::Tensor& tensor, absl::string_view what,
                                        const DecodeLimits& limits = {});

// Like DecodeTensor, and additionally requires rank 2 with `cols` columns (any row count).
absl::StatusOr<TensorView> DecodeMatrix(const moe::v1::Tensor& tensor, absl::string_view what,
                                        int64_t cols, const DecodeLimits& limits = {});

// Converts a checked view to FP32 (BF16 widened exactly). `out` must hold num_elements floats.
void ViewToFloat(const TensorView& view, float* out);

// The index of the first NaN or infinite value of `x`, or -1 when every value is finite.
int64_t FirstNonFinite(const std::vector<float>& x);

// INVALID_ARGUMENT unless `x` ([n, d] row-major) holds at least one row and only finite values:
// "WHAT: the batch is empty (0 tokens)" or "WHAT[i, j] is NaN" (or "infinite").
absl::Status CheckTokens(const std::vector<float>& x, int64_t n, int64_t d,
                         const std::string& what);

// OUT_OF_RANGE when the layer's output `y` ([n, d] row-major) holds a value that is not finite:
// weights grown large (trained at too high a rate), or tokens too large for them. Served by
// neither the router nor moe-client --local.
absl::Status CheckOutputFinite(const std::vector<float>& y, int64_t d);
std::vector<float> ViewToFloat(const TensorView& view);

// Fills `out` with `data` in `shape`, as FP32 or BF16 (round to nearest even). Reuses the
// message's byte capacity.
void EncodeTensor(absl::Span<const float> data, absl::Span<const int64_t> shape, WireType type,
                  moe::v1::Tensor* out);

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_TENSOR_CODEC_H_
