#include "router/kept_gate.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "services/common/clock.h"
#include "services/common/server_util.h"

namespace moe::router {
namespace {

// DIR/gate.lock, held (flock) while this object lives.
class GateLock {
 public:
  explicit GateLock(const std::string& dir)
      : path_((std::filesystem::path(dir) / "gate.lock").string()) {}
  ~GateLock() {
    if (fd_ >= 0) close(fd_);  // the lock goes with it
  }
  GateLock(const GateLock&) = delete;
  GateLock& operator=(const GateLock&) = delete;

  // OK once held, or where the lock file cannot be opened or locked at all (the write then goes
  // on without it: a read-only directory fails the write itself, and a filesystem without locks
  // is one that a single router uses, or that cannot do better). DEADLINE_EXCEEDED when another
  // process holds it for `wait`.
  absl::Status Take(absl::Duration wait) {
    fd_ = open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) return absl::OkStatus();
    const absl::Time until = common::MonotonicNow() + wait;
    while (flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      if (errno == EINTR) continue;
      if (errno != EWOULDBLOCK) return absl::OkStatus();  // no locks here
      if (common::MonotonicNow() >= until) {
        return absl::DeadlineExceededError(
            absl::StrCat(path_, " is held by another process (a router sharing --state-dir) for ",
                         absl::FormatDuration(wait)));
      }
      // flock has no timed wait: a router holds the lock for one file write (milliseconds), so
      // it is asked again shortly.
      usleep(5000);
    }
    return absl::OkStatus();
  }

 private:
  const std::string path_;
  int fd_ = -1;
};

}  // namespace

uint64_t KeptGateEpoch(const std::string& path) {
  absl::StatusOr<std::unique_ptr<common::SafetensorsReader>> r =
      common::SafetensorsReader::Open(path);
  if (!r.ok()) return 0;
  const auto& meta = (*r)->metadata();
  const auto it = meta.find(kKeptGateEpochKey);
  uint64_t epoch = 0;
  if (it == meta.end() || !absl::SimpleAtoi(it->second, &epoch) ||
      epoch >= common::kMaxLeaseEpoch) {
    return 0;
  }
  return epoch;
}

absl::Status WriteKeptGate(const std::string& path, common::SafetensorsWriter gate, uint64_t epoch,
                           absl::Duration lock_wait, uint64_t* kept_epoch) {
  GateLock lock(std::filesystem::path(path).parent_path().string());
  if (absl::Status st = lock.Take(lock_wait); !st.ok()) return st;
  if (epoch != 0) {
    std::error_code ec;
    const uint64_t kept = std::filesystem::exists(path, ec) ? KeptGateEpoch(path) : 0;
    if (kept > epoch) {
      if (kept_epoch != nullptr) *kept_epoch = kept;
      return absl::FailedPreconditionError(
          absl::StrCat("the gate there was kept under placement lease epoch ", kept,
                       ", later than this router's ", epoch,
                       ": another router has taken the placement lease over since"));
    }
  }
  gate.SetMetadata(kKeptGateEpochKey, absl::StrCat(epoch));
  return gate.Write(path);
}

int RemoveUnfinishedGateWrites(const std::string& dir, absl::Duration lock_wait) {
  GateLock lock(dir);
  if (!lock.Take(lock_wait).ok()) return 0;
  return common::RemoveUnfinishedWrites(dir);
}

}  // namespace moe::router
