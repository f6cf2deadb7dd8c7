#include "services/common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "services/common/bf16.h"
#include "services/common/status_macros.h"

namespace moe::common {
namespace {

using Json = nlohmann::json;

size_t DTypeSize(StDType d) { return d == StDType::kBF16 ? 2 : 4; }

bool ParseDType(const std::string& s, StDType* out) {
  if (s == "F32") *out = StDType::kF32;
  else if (s == "BF16") *out = StDType::kBF16;
  else if (s == "I32") *out = StDType::kI32;
  else return false;
  return true;
}

uint64_t ReadLe64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

absl::string_view StDTypeName(StDType dtype) {
  switch (dtype) {
    case StDType::kF32: return "F32";
    case StDType::kBF16: return "BF16";
    case StDType::kI32: return "I32";
  }
  return "?";
}

SafetensorsReader::~SafetensorsReader() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsReader>> SafetensorsReader::Open(
    const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    std::string msg = absl::StrCat(path, ": cannot open: ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(msg) : absl::PermissionDeniedError(msg);
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  auto reader = std::unique_ptr<SafetensorsReader>(new SafetensorsReader());
  reader->origin_ = path;
  const size_t size = static_cast<size_t>(st.st_size);
  if (size > 0) {
    void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": mmap failed: ", std::strerror(err)));
    }
    reader->map_ = map;
    reader->map_size_ = size;
  }
  ::close(fd);
  RETURN_IF_ERROR(reader->ParseHeader(
      absl::string_view(static_cast<const char*>(reader->map_), reader->map_size_)));
  return reader;
}

std::string SafetensorsReader::DescribeTensors() const {
  constexpr size_t kShown = 4;
  std::string out = absl::StrCat(tensors_.size(), tensors_.size() == 1 ? " tensor" : " tensors");
  for (size_t i = 0; i < tensors_.size() && i < kShown; ++i) {
    absl::StrAppend(&out, i == 0 ? ": " : ", ", tensors_[i].name);
  }
  if (tensors_.size() > kShown) absl::StrAppend(&out, ", ...");
  return out;
}

absl::StatusOr<std::unique_ptr<SafetensorsReader>> SafetensorsReader::Parse(
    absl::string_view bytes, absl::string_view origin) {
  auto reader = std::unique_ptr<SafetensorsReader>(new SafetensorsReader());
  reader->origin_ = std::string(origin);
  RETURN_IF_ERROR(reader->ParseHeader(bytes));
  return reader;
}

absl::Status SafetensorsReader::ParseHeader(absl::string_view file) {
  auto bad = [this](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(origin_, ": ", parts...));
  };
  if (file.size() < 8) {
    return bad("not a safetensors file (", file.size(),
               " bytes, shorter than the 8-byte header length)");
  }
  const auto* base = reinterpret_cast<const unsigned char*>(file.data());
  const uint64_t header_len = ReadLe64(base);
  if (header_len > kMaxSafetensorsHeader) {
    // A safetensors file starts with its JSON header's length; so large a length means this is
    // most likely some other kind of file.
    return bad("not a safetensors file (its first 8 bytes give a header length of ", header_len,
               ", over the limit of ", kMaxSafetensorsHeader, " bytes)");
  }
  if (header_len > file.size() - 8) {
    return bad("header length ", header_len, " runs past the end of the ", file.size(),
               "-byte file (truncated?)");
  }
  const absl::string_view header = file.substr(8, header_len);
  const unsigned char* data = base + 8 + header_len;
  const uint64_t data_size = file.size() - 8 - header_len;

  Json json = Json::parse(header.begin(), header.end(), nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return bad("not a safetensors file (its header is not valid JSON)");
  if (!json.is_object()) return bad("header must be a JSON object");

  struct Range {
    uint64_t begin, end;
    size_t index;
  };
  std::vector<Range> ranges;
  for (auto it = json.begin(); it != json.end(); ++it) {
    const std::string& name = it.key();
    const Json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return bad("__metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          return bad("__metadata__ value for '", m.key(), "' must be a string");
        }
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object()) return bad("tensor '", name, "': entry must be an object");
    auto dt = v.find("dtype");
    auto sh = v.find("shape");
    auto off = v.find("data_offsets");
    if (dt == v.end() || sh == v.end() || off == v.end()) {
      return bad("tensor '", name, "': needs dtype, shape and data_offsets");
    }
    StTensor t;
    t.name = name;
    if (!dt->is_string()) return bad("tensor '", name, "': dtype must be a string");
    if (!ParseDType(dt->get<std::string>(), &t.dtype)) {
      return bad("tensor '", name, "': unknown or unsupported dtype '", dt->get<std::string>(),
                 "' (supported: F32, BF16, I32)");
    }
    if (!sh->is_array() || sh->size() > 8) {
      return bad("tensor '", name, "': shape must be an array of at most 8 dimensions");
    }
    uint64_t count = 1;
    for (const Json& d : *sh) {
      if (!d.is_number_unsigned()) {
        return bad("tensor '", name, "': shape entries must be non-negative integers");
      }
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && count > (uint64_t{1} << 62) / dim) {
        return bad("tensor '", name, "': shape is too large");
      }
      count *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned()) {
      return bad("tensor '", name, "': data_offsets must be [begin, end]");
    }
    const uint64_t begin = (*off)[0].get<uint64_t>();
    const uint64_t end = (*off)[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      return bad("tensor '", name, "': data_offsets [", begin, ", ", end,
                 "] out of range of the ", data_size, "-byte data section");
    }
    if (end - begin != count * DTypeSize(t.dtype)) {
      return bad("tensor '", name, "': data_offsets span ", end - begin, " bytes but shape [",
                 absl::StrJoin(t.shape, ", "), "] of ", StDTypeName(t.dtype), " needs ",
                 count * DTypeSize(t.dtype));
    }
    t.num_elements = static_cast<int64_t>(count);
    t.data = data + begin;
    t.size = end - begin;
    ranges.push_back({begin, end, tensors_.size()});
    index_[name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].begin < ranges[i - 1].end) {
      return bad("tensors '", tensors_[ranges[i - 1].index].name, "' and '",
                 tensors_[ranges[i].index].name, "' overlap in the data section");
    }
  }
  return absl::OkStatus();
}

const StTensor* SafetensorsReader::Find(absl::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<std::vector<float>> SafetensorsReader::ReadFloat(
    absl::string_view name, const std::vector<int64_t>* expected_shape) const {
  const StTensor* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat(origin_, ": tensor '", name, "' is missing"));
  }
  if (expected_shape != nullptr && t->shape != *expected_shape) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin_, ": tensor '", name, "' has shape [", absl::StrJoin(t->shape, ", "),
                     "], expected [", absl::StrJoin(*expected_shape, ", "), "]"));
  }
  std::vector<float> out(static_cast<size_t>(t->num_elements));
  switch (t->dtype) {
    case StDType::kF32:
      if (t->size > 0) std::memcpy(out.data(), t->data, t->size);
      break;
    case StDType::kBF16:
      for (int64_t i = 0; i < t->num_elements; ++i) {
        uint16_t h;
        std::memcpy(&h, t->data + 2 * i, 2);
        out[i] = Bf16ToFloat(h);
      }
      break;
    case StDType::kI32:
      return absl::InvalidArgumentError(
          absl::StrCat(origin_, ": tensor '", name, "' is I32, expected F32 or BF16"));
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> SafetensorsReader::ReadInt32(absl::string_view name) const {
  const StTensor* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat(origin_, ": tensor '", name, "' is missing"));
  }
  if (t->dtype != StDType::kI32) {
    return absl::InvalidArgumentError(absl::StrCat(origin_, ": tensor '", name, "' is ",
                                                   StDTypeName(t->dtype), ", expected I32"));
  }
  std::vector<int32_t> out(static_cast<size_t>(t->num_elements));
  if (t->size > 0) std::memcpy(out.data(), t->data, t->size);
  return out;
}

void SafetensorsWriter::SetMetadata(std::string key, std::string value) {
  metadata_[std::move(key)] = std::move(value);
}

absl::Status SafetensorsWriter::Add(std::string name, StDType dtype, std::vector<int64_t> shape,
                                    int64_t count, const void* data, size_t bytes) {
  int64_t expected = 1;
  for (int64_t d : shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat(name, ": negative dimension"));
    expected *= d;
  }
  if (expected != count) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": shape [", absl::StrJoin(shape, ", "),
                                                   "] does not hold ", count, " elements"));
  }
  if (name == "__metadata__" ||
      std::any_of(entries_.begin(), entries_.end(),
                  [&](const Entry& e) { return e.name == name; })) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": duplicate or reserved name"));
  }
  entries_.push_back(Entry{std::move(name), dtype, std::move(shape),
                           std::string(static_cast<const char*>(data), bytes)});
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::AddF32(std::string name, std::vector<int64_t> shape,
                                       absl::Span<const float> data) {
  return Add(std::move(name), StDType::kF32, std::move(shape), static_cast<int64_t>(data.size()),
             data.data(), data.size() * 4);
}

absl::Status SafetensorsWriter::AddBF16(std::string name, std::vector<int64_t> shape,
                                        absl::Span<const float> data) {
  std::vector<uint16_t> half(data.size());
  FloatToBf16(data.data(), data.size(), half.data());
  return Add(std::move(name), StDType::kBF16, std::move(shape),
             static_cast<int64_t>(data.size()), half.data(), half.size() * 2);
}

absl::Status SafetensorsWriter::AddI32(std::string name, std::vector<int64_t> shape,
                                       absl::Span<const int32_t> data) {
  return Add(std::move(name), StDType::kI32, std::move(shape), static_cast<int64_t>(data.size()),
             data.data(), data.size() * 4);
}

std::string SafetensorsWriter::Serialize() const {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata_) meta[k] = v;
    header["__metadata__"] = meta;
  }
  uint64_t offset = 0;
  for (const Entry& e : entries_) {
    header[e.name] = {{"dtype", std::string(StDTypeName(e.dtype))},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + e.bytes.size()}}};
    offset += e.bytes.size();
  }
  std::string json = header.dump();
  while ((json.size() + 8) % 8 != 0) json.push_back(' ');
  std::string out;
  out.reserve(8 + json.size() + offset);
  uint64_t len = json.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((len >> (8 * i)) & 0xff));
  out += json;
  for (const Entry& e : entries_) out += e.bytes;
  return out;
}

namespace {

// PERMISSION_DENIED for a file system that refuses the write; FAILED_PRECONDITION otherwise (a
// directory that does not exist, a path that is a directory).
absl::Status WriteError(int err, std::string why) {
  if (err == EACCES || err == EPERM || err == EROFS) {
    return absl::PermissionDeniedError(std::move(why));
  }
  return absl::FailedPreconditionError(std::move(why));
}

}  // namespace

int RemoveUnfinishedWrites(const std::string& dir, bool all) {
  const std::string temp = ".safetensors.tmp.";  // as Write names its temporary files
  int removed = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    const size_t at = name.find(temp);
    if (at == std::string::npos) continue;
    const std::string rest = name.substr(at + temp.size());
    int pid = 0;
    if (!absl::SimpleAtoi(rest.substr(0, rest.find('.')), &pid) || pid <= 0) continue;
    if (!all && (pid == getpid() || std::filesystem::exists(absl::StrCat("/proc/", pid), ec))) {
      continue;
    }
    if (std::filesystem::remove(entry.path(), ec)) ++removed;
  }
  return removed;
}

absl::Status SafetensorsWriter::Write(const std::string& path) const {
  // A temporary name of our own, so concurrent writers of one path cannot collide; flushed to
  // disk before it is renamed into place, so a reader (or a restart) sees a whole file.
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid(), ".", counter.fetch_add(1));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int err = errno;
    return WriteError(err, absl::StrCat(path, ": cannot open for writing: ", std::strerror(err)));
  }
  const std::string bytes = Serialize();
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  const bool written = done == bytes.size() && ::fsync(fd) == 0;
  if (::close(fd) != 0 || !written) {
    std::remove(tmp.c_str());
    return absl::DataLossError(absl::StrCat(path, ": write failed (disk full?)"));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return WriteError(err, absl::StrCat(path, ": cannot rename into place: ", std::strerror(err)));
  }
  return absl::OkStatus();
}

}  // namespace moe::common
