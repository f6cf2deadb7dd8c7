#include "services/common/tensor_codec.h"

#include <gtest/gtest.h>

namespace moe::common {
namespace {

moe::v1::Tensor MakeF32(std::vector<int64_t> shape, size_t bytes) {
  moe::v1::Tensor t;
  for (int64_t d : shape) t.add_shape(d);
  t.set_dtype(moe::v1::FLOAT32);
  t.mutable_data()->assign(bytes, '\0');
  return t;
}

TEST(TensorCodec, EncodeDecodeFloat32RoundTrip) {
  const std::vector<float> data = {1.f, -2.5f, 3.25f, 0.f, 1e-30f, -7.f};
  moe::v1::Tensor t;
  EncodeTensor(data, {2, 3}, WireType::kFloat32, &t);
  auto view = DecodeMatrix(t, "tokens", 3);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(view->num_elements, 6);
  EXPECT_EQ(ViewToFloat(*view), data);
}

TEST(TensorCodec, EncodeDecodeBFloat16RoundsToNearestEven) {
  const std::vector<float> data = {1.f, 1.00390625f, 3.14159f, -0.1f};
  moe::v1::Tensor t;
  EncodeTensor(data, {4}, WireType::kBFloat16, &t);
  EXPECT_EQ(t.dtype(), moe::v1::BFLOAT16);
  EXPECT_EQ(t.data().size(), 8u);
  auto view = DecodeTensor(t, "x");
  ASSERT_TRUE(view.ok()) << view.status();
  const std::vector<float> back = ViewToFloat(*view);
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: it goes to even (1). 3.14159 (0x40490FD0) keeps
  // its top half, 0x4049; -0.1 (0xBDCCCCCD) rounds up to 0xBDCD.
  EXPECT_EQ(back, (std::vector<float>{1.f, 1.f, 3.140625f, -0.10009765625f}));
}

TEST(TensorCodec, EmptyTensorsAreValid) {
  auto view = DecodeMatrix(MakeF32({0, 4}, 0), "tokens", 4);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->num_elements, 0);
  auto scalar = DecodeTensor(MakeF32({}, 4), "s");
  ASSERT_TRUE(scalar.ok());
  EXPECT_EQ(scalar->num_elements, 1);
}

TEST(TensorCodec, RejectsNegativeDimension) {
  auto v = DecodeTensor(MakeF32({2, -1}, 0), "tokens");
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(v.status().message().find("tokens: dimension 1 is negative"), std::string::npos)
      << v.status();
}

TEST(TensorCodec, RejectsOverflowingShape) {
  auto v = DecodeTensor(MakeF32({int64_t{1} << 40, int64_t{1} << 40, 4}, 16), "tokens");
  EXPECT_EQ(v.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(v.status().message().find("elements"), std::string::npos);
}

TEST(TensorCodec, RejectsTooManyElements) {
  DecodeLimits limits;
  limits.max_elements = 100;
  auto v = DecodeTensor(MakeF32({11, 10}, 440), "tokens", limits);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(TensorCodec, RejectsHighRank) {
  auto v = DecodeTensor(MakeF32({1, 1, 1, 1, 1, 1, 1, 1, 1}, 4), "tokens");
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(v.status().message().find("rank 9"), std::string::npos);
}

TEST(TensorCodec, RejectsUnknownDtype) {
  moe::v1::Tensor t = MakeF32({1}, 4);
  t.set_dtype(moe::v1::DATA_TYPE_UNSPECIFIED);
  EXPECT_EQ(DecodeTensor(t, "x").status().code(), absl::StatusCode::kInvalidArgument);
  t.set_dtype(static_cast<moe::v1::DataType>(77));
  auto v = DecodeTensor(t, "x");
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(v.status().message().find("dtype 77"), std::string::npos);
}

TEST(TensorCodec, RejectsWrongByteLength) {
  auto v = DecodeTensor(MakeF32({2, 3}, 23), "tokens");
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(v.status().message().find("data has 23 bytes but shape [2, 3] needs 24"),
            std::string::npos)
      << v.status();
  moe::v1::Tensor bf = MakeF32({2, 3}, 24);
  bf.set_dtype(moe::v1::BFLOAT16);  // BF16 needs 12 bytes
  EXPECT_EQ(DecodeTensor(bf, "x").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TensorCodec, DecodeMatrixChecksRankAndColumns) {
  EXPECT_EQ(DecodeMatrix(MakeF32({2, 3}, 24), "tokens", 4).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto v = DecodeMatrix(MakeF32({6}, 24), "tokens", 3);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(v.status().message().find("must be [N, 3]"), std::string::npos);
}

TEST(TensorCodec, EncodeReusesMessage) {
  moe::v1::Tensor t;
  EncodeTensor(std::vector<float>(8, 1.f), {2, 4}, WireType::kFloat32, &t);
  EncodeTensor(std::vector<float>(2, 2.f), {1, 2}, WireType::kFloat32, &t);
  EXPECT_EQ(t.shape_size(), 2);
  EXPECT_EQ(t.data().size(), 8u);
  auto v = DecodeMatrix(t, "x", 2);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(ViewToFloat(*v), (std::vector<float>{2.f, 2.f}));
}

}  // namespace
}  // namespace moe::common
