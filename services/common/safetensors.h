#ifndef MOE_SERVICES_COMMON_SAFETENSORS_H_
#define MOE_SERVICES_COMMON_SAFETENSORS_H_

// safetensors files: an 8-byte little-endian header length, a JSON header naming each tensor's
// dtype, shape and [begin, end) byte offsets into the data that follows, and the raw data.
// The reader maps the file and validates every header field before any tensor is touched.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace moe::common {

enum class StDType { kF32, kBF16, kI32 };

absl::string_view StDTypeName(StDType dtype);

struct StTensor {
  std::string name;
  StDType dtype = StDType::kF32;
  std::vector<int64_t> shape;
  int64_t num_elements = 0;
  const unsigned char* data = nullptr;  // may be unaligned
  size_t size = 0;                      // bytes
};

// Largest header accepted (the reference implementation's limit).
inline constexpr uint64_t kMaxSafetensorsHeader = 100u << 20;

class SafetensorsReader {
 public:
  // Maps `path` read-only. Errors: NOT_FOUND for a missing file, INVALID_ARGUMENT naming the
  // file and what is malformed.
  static absl::StatusOr<std::unique_ptr<SafetensorsReader>> Open(const std::string& path);
  // Parses an in-memory file; `bytes` must outlive the reader.
  static absl::StatusOr<std::unique_ptr<SafetensorsReader>> Parse(absl::string_view bytes,
                                                                  absl::string_view origin);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  // Null when absent.
  const StTensor* Find(absl::string_view name) const;
  const std::vector<StTensor>& tensors() const { return tensors_; }
  // What the file holds, for an error about a tensor it lacks: "1 tensor: tokens", or
  // "12 tensors: a, b, c, d, ..." (the first 4 names).
  std::string DescribeTensors() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& origin() const { return origin_; }

  // The tensor as FP32 (F32 copied, BF16 widened). NOT_FOUND when absent, INVALID_ARGUMENT
  // for I32 or, when `expected_shape` is given, another shape.
  absl::StatusOr<std::vector<float>> ReadFloat(
      absl::string_view name, const std::vector<int64_t>* expected_shape = nullptr) const;
  absl::StatusOr<std::vector<int32_t>> ReadInt32(absl::string_view name) const;

 private:
  SafetensorsReader() = default;
  absl::Status ParseHeader(absl::string_view bytes);

  std::string origin_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<StTensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

// Builds a safetensors file in memory and writes it atomically (temp file + rename).
class SafetensorsWriter {
 public:
  void SetMetadata(std::string key, std::string value);
  // Shapes must match the element count; INVALID_ARGUMENT otherwise or on a duplicate name.
  absl::Status AddF32(std::string name, std::vector<int64_t> shape, absl::Span<const float> data);
  absl::Status AddBF16(std::string name, std::vector<int64_t> shape,
                       absl::Span<const float> data);
  absl::Status AddI32(std::string name, std::vector<int64_t> shape,
                      absl::Span<const int32_t> data);
  // The whole file's bytes.
  std::string Serialize() const;
  absl::Status Write(const std::string& path) const;

 private:
  absl::Status Add(std::string name, StDType dtype, std::vector<int64_t> shape, int64_t count,
                   const void* data, size_t bytes);
  struct Entry {
    std::string name;
    StDType dtype;
    std::vector<int64_t> shape;
    std::string bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Removes from `dir` the temporary files ("NAME.safetensors.tmp.PID.N") of Writes whose process
// no longer runs (killed while writing, or out of disk); those of a process that still runs are
// left to it. With `all`, for a caller that holds the directory's lock and has written nothing
// there yet, every such file goes: in a container the process is often PID 1 at every start, so
// a killed run's files carry the pid of the one now reading them. Returns how many were removed.
int RemoveUnfinishedWrites(const std::string& dir, bool all = false);

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_SAFETENSORS_H_
