#ifndef MOE_SERVICES_COMMON_EXPERT_COPY_H_
#define MOE_SERVICES_COMMON_EXPERT_COPY_H_

// The receiving end of an ExpertShard.ExportExpert stream (a peer's copy of an expert, or the
// router reading one for SaveCheckpoint). A sender's sizes are not trusted: every chunk must
// name the same total, no larger than `most`, continue the copy where it stands, and the chunks
// must fill the total exactly.

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "moe/v1/expert_shard.pb.h"

namespace moe::common {

struct ExpertCopy {
  explicit ExpertCopy(uint64_t most_bytes) : most(most_bytes) {}

  // DATA_LOSS for a chunk that does not continue the copy.
  absl::Status Add(const v1::ExpertChunk& chunk) {
    if (!started) {
      started = true;
      total = chunk.total_bytes();
      if (total <= most) bytes.reserve(total);
    }
    if (chunk.total_bytes() != total || total > most || chunk.offset() != bytes.size() ||
        chunk.data().size() > total - bytes.size()) {
      return absl::DataLossError(absl::StrCat(
          "chunk at offset ", chunk.offset(), " of ", chunk.data().size(), " bytes (total ",
          chunk.total_bytes(), ") does not continue the copy at ", bytes.size(), " of ", total,
          " bytes (at most ", most, ")"));
    }
    bytes += chunk.data();
    trained_step = chunk.trained_step();
    return absl::OkStatus();
  }
  // DATA_LOSS unless the chunks filled the total.
  absl::Status Complete() const {
    if (bytes.size() == total) return absl::OkStatus();
    return absl::DataLossError(
        absl::StrCat("the copy ended at ", bytes.size(), " of ", total, " bytes"));
  }

  uint64_t most;
  bool started = false;
  uint64_t total = 0;
  uint64_t trained_step = 0;
  std::string bytes;
};

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_EXPERT_COPY_H_
