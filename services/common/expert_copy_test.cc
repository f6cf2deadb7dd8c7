#include "services/common/expert_copy.h"

#include <gtest/gtest.h>

namespace moe::common {
namespace {

v1::ExpertChunk Chunk(uint64_t total, uint64_t offset, const std::string& data) {
  v1::ExpertChunk c;
  c.set_total_bytes(total);
  c.set_offset(offset);
  c.set_data(data);
  c.set_trained_step(7);
  return c;
}

TEST(ExpertCopy, ChunksThatContinueTheCopyFillIt) {
  ExpertCopy copy(100);
  ASSERT_TRUE(copy.Add(Chunk(6, 0, "abc")).ok());
  EXPECT_EQ(copy.Complete().code(), absl::StatusCode::kDataLoss);  // half of it
  ASSERT_TRUE(copy.Add(Chunk(6, 3, "def")).ok());
  EXPECT_TRUE(copy.Complete().ok());
  EXPECT_EQ(copy.bytes, "abcdef");
  EXPECT_EQ(copy.trained_step, 7u);
}

TEST(ExpertCopy, ASenderIsNotTrustedWithSizesOrOffsets) {
  struct Case {
    const char* what;
    std::vector<v1::ExpertChunk> chunks;
  };
  const std::vector<Case> cases = {
      {"a total over the most", {Chunk(101, 0, "a")}},
      {"a gap", {Chunk(6, 0, "abc"), Chunk(6, 4, "ef")}},
      {"an overlap", {Chunk(6, 0, "abc"), Chunk(6, 2, "cdef")}},
      {"past the total", {Chunk(6, 0, "abc"), Chunk(6, 3, "defg")}},
      {"a total that changes", {Chunk(6, 0, "abc"), Chunk(9, 3, "def")}},
      {"an empty first chunk, then another total", {Chunk(6, 0, ""), Chunk(3, 0, "abc")}},
  };
  for (const Case& c : cases) {
    ExpertCopy copy(100);
    absl::Status st;
    for (const auto& chunk : c.chunks) {
      st = copy.Add(chunk);
      if (!st.ok()) break;
    }
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << c.what;
    EXPECT_NE(st.message().find("does not continue the copy"), std::string::npos) << st;
  }
}

}  // namespace
}  // namespace moe::common
