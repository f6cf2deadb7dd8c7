#include "router/kept_gate.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "services/common/clock.h"
#include "services/common/log.h"
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
    // Made by a router of another user: flock takes a descriptor opened for reading too.
    if (fd_ < 0) fd_ = open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) return Unlocked(errno);
    const absl::Time until = common::MonotonicNow() + wait;
    while (flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      if (errno == EINTR) continue;
      if (errno != EWOULDBLOCK) return Unlocked(errno);  // no locks here
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
  // Goes on without the lock, said once per process.
  absl::Status Unlocked(int err) {
    static std::atomic<bool> said{false};
    if (!said.exchange(true)) {
      common::Log(
          "moe-router: cannot lock %s (%s): the gate is kept without the lock; make sure "
          "routers sharing this --state-dir can (a local filesystem, one user)\n",
          path_.c_str(), std::strerror(err));
    }
    return absl::OkStatus();
  }

  const std::string path_;
  int fd_ = -1;
};

}  // namespace

KeptGateMark ReadKeptGateMark(const std::string& path) {
  absl::StatusOr<std::unique_ptr<common::SafetensorsReader>> r =
      common::SafetensorsReader::Open(path);
  return r.ok() ? KeptGateMarkOf((*r)->metadata()) : KeptGateMark();
}

KeptGateMark KeptGateMarkOf(const std::map<std::string, std::string>& meta) {
  KeptGateMark mark;
  if (const auto by = meta.find(kKeptGateByKey); by != meta.end()) mark.kept_by = by->second;
  const auto it = meta.find(kKeptGateEpochKey);
  // The coordinator's bound on min_epoch (a claim past it could never be asked past).
  constexpr uint64_t kMaxKept = common::kMaxLeaseEpoch - (uint64_t{1} << 32);
  if (it == meta.end() || !absl::SimpleAtoi(it->second, &mark.epoch) || mark.epoch >= kMaxKept) {
    mark.epoch = 0;
  }
  return mark;
}

absl::Status WriteKeptGate(const std::string& path, common::SafetensorsWriter gate, uint64_t epoch,
                           const std::string& router_id, uint64_t last_seen,
                           absl::Duration lock_wait, uint64_t* later) {
  GateLock lock(std::filesystem::path(path).parent_path().string());
  if (absl::Status st = lock.Take(lock_wait); !st.ok()) return st;
  if (epoch != 0) {
    std::error_code ec;
    const KeptGateMark kept =
        std::filesystem::exists(path, ec) ? ReadKeptGateMark(path) : KeptGateMark();
    if (kept.kept_by != router_id && kept.epoch > last_seen) {
      return absl::AbortedError(absl::StrCat(
          "router ", kept.kept_by.empty() ? "(unnamed)" : kept.kept_by,
          " kept its gate there under placement lease epoch ", kept.epoch,
          ", later than the one this router last read or wrote (", last_seen,
          "): it has held the placement lease since, and this router's gate is not the one "
          "trained last"));
    }
    if (kept.epoch > epoch) {
      if (later != nullptr) *later = kept.epoch;
      return absl::FailedPreconditionError(
          absl::StrCat("the gate there was kept under placement lease epoch ", kept.epoch,
                       ", later than this router's ", epoch));
    }
  }
  gate.SetMetadata(kKeptGateEpochKey, absl::StrCat(epoch));
  gate.SetMetadata(kKeptGateByKey, router_id);
  return gate.Write(path);
}

int RemoveUnfinishedGateWrites(const std::string& dir, absl::Duration lock_wait) {
  GateLock lock(dir);
  if (!lock.Take(lock_wait).ok()) return 0;
  return common::RemoveUnfinishedWrites(dir);
}

}  // namespace moe::router
