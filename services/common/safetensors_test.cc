#include "services/common/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "tests/reference/test_util.h"

namespace moe::common {
namespace {

// A file from a raw JSON header and data section.
std::string RawFile(const std::string& header, const std::string& data, int64_t len = -1) {
  std::string out;
  const uint64_t n = len >= 0 ? static_cast<uint64_t>(len) : header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out + header + data;
}

absl::Status ParseStatus(const std::string& bytes) {
  return SafetensorsReader::Parse(bytes, "test.safetensors").status();
}

void ExpectInvalid(const std::string& bytes, const std::string& needle) {
  const absl::Status st = ParseStatus(bytes);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find(needle), std::string::npos) << st;
  EXPECT_NE(st.message().find("test.safetensors"), std::string::npos) << st;
}

TEST(Safetensors, RoundTripEveryDtypeAndMetadata) {
  SafetensorsWriter w;
  w.SetMetadata("activation", "gelu");
  ASSERT_TRUE(w.AddF32("a", {2, 3}, std::vector<float>{1, 2, 3, 4, 5, 6}).ok());
  ASSERT_TRUE(w.AddBF16("b", {3}, std::vector<float>{1.f, -0.1f, 100.f}).ok());
  ASSERT_TRUE(w.AddI32("c", {2, 2}, std::vector<int32_t>{-1, 0, 7, 1 << 30}).ok());
  ASSERT_TRUE(w.AddF32("empty", {0, 5}, std::vector<float>{}).ok());
  const std::string bytes = w.Serialize();
  auto r = SafetensorsReader::Parse(bytes, "mem");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->metadata().at("activation"), "gelu");
  EXPECT_EQ(*(*r)->ReadFloat("a"), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  const std::vector<float> b = *(*r)->ReadFloat("b");
  EXPECT_EQ(b[0], 1.f);
  EXPECT_EQ(b[1], -0.10009765625f);  // -0.1 rounded to BF16 (0xBDCD), nearest even
  EXPECT_EQ(b[2], 100.f);
  EXPECT_EQ(*(*r)->ReadInt32("c"), (std::vector<int32_t>{-1, 0, 7, 1 << 30}));
  EXPECT_EQ((*r)->Find("empty")->num_elements, 0);
  EXPECT_EQ((*r)->Find("c")->shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ((*r)->Find("missing"), nullptr);
  EXPECT_EQ((*r)->ReadFloat("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*r)->ReadFloat("c").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*r)->ReadInt32("a").status().code(), absl::StatusCode::kInvalidArgument);
  const std::vector<int64_t> wrong = {3, 2};
  EXPECT_EQ((*r)->ReadFloat("a", &wrong).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Safetensors, HeaderIsPaddedToEightBytes) {
  SafetensorsWriter w;
  ASSERT_TRUE(w.AddF32("x", {1}, std::vector<float>{1}).ok());
  const std::string bytes = w.Serialize();
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + 4);
}

TEST(Safetensors, WriteAndOpenThroughMmap) {
  const std::string path = ::moe::testing::TempPath("st_roundtrip.safetensors");
  SafetensorsWriter w;
  ASSERT_TRUE(w.AddF32("w", {4}, std::vector<float>{0.5f, 1.5f, 2.5f, 3.5f}).ok());
  ASSERT_TRUE(w.Write(path).ok());
  auto r = SafetensorsReader::Open(path);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*(*r)->ReadFloat("w"), (std::vector<float>{0.5f, 1.5f, 2.5f, 3.5f}));
  std::remove(path.c_str());
}

TEST(Safetensors, MissingFileIsNotFound) {
  auto r = SafetensorsReader::Open("/nonexistent/dir/x.safetensors");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(r.status().message().find("/nonexistent/dir/x.safetensors"), std::string::npos);
}

// Shorter than the header length: not a safetensors file (a text file, "hello\n").
TEST(Safetensors, EmptyAndTruncatedFiles) {
  const std::string path = ::moe::testing::TempPath("st_empty.safetensors");
  { std::ofstream f(path); }
  auto r = SafetensorsReader::Open(path);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(),
            path + ": not a safetensors file (0 bytes, shorter than the 8-byte header length)");
  std::remove(path.c_str());
  ExpectInvalid(std::string("\x10\0\0", 3),
                "not a safetensors file (3 bytes, shorter than the 8-byte header length)");
  ExpectInvalid("hello\n",
                "not a safetensors file (6 bytes, shorter than the 8-byte header length)");
}

TEST(Safetensors, DescribeTensorsNamesTheFirstFour) {
  SafetensorsWriter w;
  for (const char* name : {"a", "b", "c", "d", "e"}) {
    ASSERT_TRUE(w.AddF32(name, {1}, std::vector<float>{1}).ok());
  }
  const std::string five = w.Serialize();
  auto r = SafetensorsReader::Parse(five, "mem");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->DescribeTensors(), "5 tensors: a, b, c, d, ...");
  SafetensorsWriter one;
  ASSERT_TRUE(one.AddF32("tokens", {1, 1}, std::vector<float>{1}).ok());
  const std::string bytes = one.Serialize();
  r = SafetensorsReader::Parse(bytes, "mem");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->DescribeTensors(), "1 tensor: tokens");
  const std::string none = SafetensorsWriter().Serialize();
  r = SafetensorsReader::Parse(none, "mem");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->DescribeTensors(), "0 tensors");
}

TEST(Safetensors, HeaderLengthPastTheEnd) {
  ExpectInvalid(RawFile("{}", "", 100), "runs past the end");
  // A full file cut short inside its header.
  SafetensorsWriter w;
  ASSERT_TRUE(w.AddF32("x", {2}, std::vector<float>{1, 2}).ok());
  const std::string bytes = w.Serialize();
  ExpectInvalid(bytes.substr(0, 20), "runs past the end");
}

TEST(Safetensors, AbsurdHeaderLength) {
  ExpectInvalid(RawFile("{}", "", int64_t{1} << 40), "not a safetensors file (its first 8 bytes");
  std::string all_ones(8, '\xff');
  ExpectInvalid(all_ones + "{}", "over the limit of");
}

TEST(Safetensors, BadJson) {
  ExpectInvalid(RawFile("{\"a\": ", ""), "not valid JSON");
  ExpectInvalid(RawFile("[1, 2]", ""), "must be a JSON object");
  ExpectInvalid(RawFile("{\"a\": 5}", ""), "entry must be an object");
  ExpectInvalid(RawFile("{\"a\": {\"dtype\": \"F32\"}}", ""), "needs dtype, shape and data_offsets");
  ExpectInvalid(RawFile("{\"__metadata__\": {\"k\": 1}}", ""), "must be a string");
  ExpectInvalid(RawFile("{\"__metadata__\": [1]}", ""), "__metadata__ must be an object");
}

TEST(Safetensors, UnknownDtype) {
  ExpectInvalid(RawFile(R"({"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}})",
                        std::string(2, '\0')),
                "unknown or unsupported dtype 'F16'");
  ExpectInvalid(RawFile(R"({"a": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}})",
                        std::string(4, '\0')),
                "dtype must be a string");
}

TEST(Safetensors, BadShapes) {
  ExpectInvalid(RawFile(R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})",
                        std::string(4, '\0')),
                "non-negative integers");
  ExpectInvalid(RawFile(R"({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})",
                        std::string(4, '\0')),
                "non-negative integers");
  ExpectInvalid(
      RawFile(R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})",
              std::string(4, '\0')),
      "shape is too large");
}

TEST(Safetensors, OffsetsOutOfRange) {
  ExpectInvalid(RawFile(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
                        std::string(4, '\0')),
                "out of range");
  ExpectInvalid(RawFile(R"({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}})",
                        std::string(4, '\0')),
                "out of range");
  ExpectInvalid(RawFile(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})",
                        std::string(4, '\0')),
                "data_offsets must be [begin, end]");
}

TEST(Safetensors, OffsetsNotMatchingShape) {
  ExpectInvalid(RawFile(R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})",
                        std::string(12, '\0')),
                "span 8 bytes but shape [3] of F32 needs 12");
  ExpectInvalid(RawFile(R"({"a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 12]}})",
                        std::string(12, '\0')),
                "needs 6");
}

TEST(Safetensors, OverlappingOffsets) {
  ExpectInvalid(RawFile(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                        std::string(12, '\0')),
                "overlap");
}

TEST(Safetensors, WriterRejectsMismatchAndDuplicates) {
  SafetensorsWriter w;
  EXPECT_EQ(w.AddF32("a", {2, 2}, std::vector<float>{1, 2, 3}).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(w.AddF32("a", {1}, std::vector<float>{1}).ok());
  EXPECT_EQ(w.AddF32("a", {1}, std::vector<float>{1}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddF32("__metadata__", {1}, std::vector<float>{1}).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Safetensors, WriteToUnwritablePathFails) {
  SafetensorsWriter w;
  ASSERT_TRUE(w.AddF32("a", {1}, std::vector<float>{1}).ok());
  const absl::Status st = w.Write("/nonexistent/dir/out.safetensors");
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_EQ(st.message(),
            "/nonexistent/dir/out.safetensors: cannot open for writing: No such file or directory");
}

}  // namespace
}  // namespace moe::common
