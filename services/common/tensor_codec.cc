#include "services/common/tensor_codec.h"

#include <cmath>

#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/common/bf16.h"

namespace moe::common {

size_t ElementSize(WireType type) { return type == WireType::kBFloat16 ? 2 : 4; }

absl::StatusOr<TensorView> DecodeTensor(const moe::v1::Tensor& tensor, absl::string_view what,
                                        const DecodeLimits& limits) {
  TensorView view;
  switch (tensor.dtype()) {
    case moe::v1::FLOAT32:
      view.type = WireType::kFloat32;
      break;
    case moe::v1::BFLOAT16:
      view.type = WireType::kBFloat16;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": dtype ", static_cast<int>(tensor.dtype()),
                       " is not supported (use FLOAT32 or BFLOAT16)"));
  }
  if (tensor.shape_size() > limits.max_rank) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": rank ", tensor.shape_size(),
                                                   " exceeds the limit ", limits.max_rank));
  }
  int64_t elements = 1;
  for (int i = 0; i < tensor.shape_size(); ++i) {
    const int64_t d = tensor.shape(i);
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": dimension ", i, " is negative (", d, ")"));
    }
    if (d != 0 && elements > limits.max_elements / d) {
      return absl::ResourceExhaustedError(
          absl::StrCat(what, ": shape [", absl::StrJoin(tensor.shape(), ", "),
                       "] has more than ", limits.max_elements, " elements"));
    }
    elements *= d;
  }
  if (elements > limits.max_elements) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": ", elements,
                                                     " elements exceed the limit ",
                                                     limits.max_elements));
  }
  const uint64_t expected = static_cast<uint64_t>(elements) * ElementSize(view.type);
  if (tensor.data().size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": data has ", tensor.data().size(), " bytes but shape [",
        absl::StrJoin(tensor.shape(), ", "), "] needs ", expected));
  }
  view.shape.assign(tensor.shape().begin(), tensor.shape().end());
  view.num_elements = elements;
  view.bytes = tensor.data();
  return view;
}

absl::StatusOr<TensorView> DecodeMatrix(const moe::v1::Tensor& tensor, absl::string_view what,
                                        int64_t cols, const DecodeLimits& limits) {
  absl::StatusOr<TensorView> view = DecodeTensor(tensor, what, limits);
  if (!view.ok()) return view;
  if (view->shape.size() != 2 || view->shape[1] != cols) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": shape [",
                                                   absl::StrJoin(view->shape, ", "),
                                                   "] must be [N, ", cols, "]"));
  }
  return view;
}

void ViewToFloat(const TensorView& view, float* out) {
  if (view.type == WireType::kFloat32) {
    if (!view.bytes.empty()) std::memcpy(out, view.bytes.data(), view.bytes.size());
    return;
  }
  const auto* src = reinterpret_cast<const unsigned char*>(view.bytes.data());
  for (int64_t i = 0; i < view.num_elements; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    out[i] = Bf16ToFloat(h);
  }
}

std::vector<float> ViewToFloat(const TensorView& view) {
  std::vector<float> out(static_cast<size_t>(view.num_elements));
  ViewToFloat(view, out.data());
  return out;
}

void EncodeTensor(absl::Span<const float> data, absl::Span<const int64_t> shape, WireType type,
                  moe::v1::Tensor* out) {
  out->clear_shape();
  for (int64_t d : shape) out->add_shape(d);
  std::string* bytes = out->mutable_data();
  if (type == WireType::kFloat32) {
    out->set_dtype(moe::v1::FLOAT32);
    bytes->assign(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(float));
    return;
  }
  out->set_dtype(moe::v1::BFLOAT16);
  bytes->resize(data.size() * 2);
  auto* dst = reinterpret_cast<unsigned char*>(bytes->data());
  for (size_t i = 0; i < data.size(); ++i) {
    const uint16_t h = FloatToBf16(data[i]);
    std::memcpy(dst + 2 * i, &h, 2);
  }
}

int64_t FirstNonFinite(const std::vector<float>& x) {
  for (size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i])) return static_cast<int64_t>(i);
  }
  return -1;
}

absl::Status CheckTokens(const std::vector<float>& x, int64_t n, int64_t d,
                         const std::string& what) {
  if (n == 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the batch is empty (0 tokens)"));
  }
  const int64_t i = FirstNonFinite(x);
  if (i >= 0 && i < n * d) {
    return absl::InvalidArgumentError(absl::StrCat(what, "[", i / d, ", ", i % d, "] is ",
                                                   std::isnan(x[i]) ? "NaN" : "infinite"));
  }
  return absl::OkStatus();
}

absl::Status CheckOutputFinite(const std::vector<float>& y, int64_t d) {
  const int64_t i = FirstNonFinite(y);
  if (i < 0) return absl::OkStatus();
  return absl::OutOfRangeError(absl::StrCat(
      "the output of token ", i / d, " is not finite (", std::isnan(y[i]) ? "NaN" : "infinite",
      "): the model's weights have diverged (trained at too high a learning rate: serve a "
      "checkpoint saved before), or the token is too large for them"));
}

}  // namespace moe::common
