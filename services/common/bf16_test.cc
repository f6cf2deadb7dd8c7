#include "services/common/bf16.h"

#include <cmath>
#include <cstring>
#include <limits>

#include <gtest/gtest.h>

namespace moe::common {
namespace {

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

TEST(Bf16, ExactValuesRoundTrip) {
  for (float f : {0.f, -0.f, 1.f, -2.f, 0.5f, 3.f, 65280.f, -1.5f}) {
    EXPECT_EQ(Bf16ToFloat(FloatToBf16(f)), f) << f;
  }
}

TEST(Bf16, RoundsToNearestEven) {
  // 0x3f808000 lies halfway between 0x3f80 and 0x3f81: ties go to the even 0x3f80.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808000u)), 0x3f80);
  // 0x3f818000 lies halfway between 0x3f81 and 0x3f82: ties go to the even 0x3f82.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f818000u)), 0x3f82);
  // Just above and below halfway.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(FloatToBf16(FromBits(0xbf808001u)), 0xbf81);
}

TEST(Bf16, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(inf)), inf);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(-inf)), -inf);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  // A NaN whose payload sits only in the low bits must not become Inf.
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(FromBits(0x7f800001u)))));
  // The largest float rounds up to Inf, as round-to-nearest requires.
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::max())), inf);
}

TEST(Bf16, RelativeErrorWithinHalfUlp) {
  for (int i = -1000; i <= 1000; ++i) {
    const float f = static_cast<float>(i) * 0.37311f + 0.001f;
    const float r = Bf16ToFloat(FloatToBf16(f));
    EXPECT_LE(std::fabs(r - f), std::fabs(f) * (1.0f / 256.f)) << f;
  }
}

}  // namespace
}  // namespace moe::common
