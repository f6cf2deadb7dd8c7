#ifndef MOE_SERVICES_COMMON_BF16_H_
#define MOE_SERVICES_COMMON_BF16_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace moe::common {

// FP32 -> BF16 with round to nearest, ties to even. NaN stays NaN (quiet), Inf stays Inf.
inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  const uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7fffu + lsb;
  return static_cast<uint16_t>(bits >> 16);
}

// BF16 -> FP32 is exact.
inline float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void FloatToBf16(const float* src, size_t n, uint16_t* dst) {
  for (size_t i = 0; i < n; ++i) dst[i] = FloatToBf16(src[i]);
}

inline void Bf16ToFloat(const uint16_t* src, size_t n, float* dst) {
  for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_BF16_H_
