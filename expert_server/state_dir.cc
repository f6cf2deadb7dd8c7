#include "expert_server/state_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "services/common/flags.h"
#include "services/common/log.h"
#include "services/common/safetensors.h"
#include "services/common/status_macros.h"

namespace moe::expert {

namespace {

constexpr char kStepKey[] = "moe_trained_step";
constexpr char kBaseKey[] = "moe_checkpoint_fingerprint";

// Takes DIR/.lock for this process (flock: released when the process ends, however it ends),
// and writes its pid there; returns its fd, or -1 (logged) where the filesystem cannot lock.
// FAILED_PRECONDITION, naming the holder's pid, when another process (or another StateDir of
// this one) holds it: two shards writing one directory would each read the other's experts as
// their own at their next start.
absl::StatusOr<int> LockDirectory(const std::string& dir) {
  const std::string path = dir + "/.lock";
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    // A directory the shard can read but not write (read-only mount) started before the lock
    // existed, its writes failing with a line each: it still does.
    common::Log(
        "moe-expert-server: --state-dir %s: cannot open %s (%s); going on unlocked: make "
        "sure no other shard uses this directory\n",
        dir.c_str(), path.c_str(), std::strerror(errno));
    return -1;
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {};
    const ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
    close(fd);
    std::string holder(buf, n > 0 ? static_cast<size_t>(n) : 0);
    holder.erase(holder.find_last_not_of(" \n") + 1);
    if (err != EWOULDBLOCK) {
      // A filesystem without locks (NFS without lockd, some FUSE ones): not refused for it.
      common::Log(
          "moe-expert-server: --state-dir %s: cannot lock %s (%s); going on unlocked: "
          "make sure no other shard uses this directory\n",
          dir.c_str(), path.c_str(), std::strerror(err));
      return -1;
    }
    return absl::FailedPreconditionError(
        absl::StrCat("--state-dir ", dir, " is in use by another moe-expert-server",
                     holder.empty() ? "" : absl::StrCat(" (pid ", holder, ")"),
                     ": give each shard a directory of its own"));
  }
  const std::string pid = absl::StrCat(getpid(), "\n");
  if (ftruncate(fd, 0) != 0 || pwrite(fd, pid.data(), pid.size(), 0) < 0) {
    // The lock holds without the pid: only the message of a second shard lacks it.
  }
  return fd;
}

}  // namespace

absl::StatusOr<std::unique_ptr<StateDir>> StateDir::Open(std::string dir,
                                                         common::ModelConfig config,
                                                         CheckpointReader checkpoint,
                                                         OnWritten on_written) {
  if (dir.empty()) return common::UsageError("--state-dir: empty path");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--state-dir ", dir, ": not a directory, and cannot be created",
        ec ? absl::StrCat(" (", ec.message(), ")") : std::string()));
  }
  ASSIGN_OR_RETURN(const int lock_fd, LockDirectory(dir));
  // A shard killed while writing leaves its write's temporary file: nothing is left behind.
  // Holding the lock, this shard is the directory's only writer, so every such file is an
  // earlier run's, whatever pid it names (a container's shard is PID 1 at every start).
  if (const int removed = common::RemoveUnfinishedWrites(dir, /*all=*/lock_fd >= 0); removed > 0) {
    common::Log(
        "moe-expert-server: --state-dir %s: removed %d temporary file(s) of writes that "
        "did not finish (the shard stopped while writing)\n",
        dir.c_str(), removed);
  }
  auto state = std::unique_ptr<StateDir>(new StateDir(
      std::move(dir), std::move(config), std::move(checkpoint), std::move(on_written)));
  state->lock_fd_ = lock_fd;
  return state;
}

StateDir::StateDir(std::string dir, common::ModelConfig config, CheckpointReader checkpoint,
                   OnWritten on_written)
    : dir_(std::move(dir)),
      config_(std::move(config)),
      checkpoint_(std::move(checkpoint)),
      on_written_(std::move(on_written)) {
  writer_ = std::thread([this] { WriterLoop(); });
}

StateDir::~StateDir() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  writer_.join();
  if (lock_fd_ >= 0) close(lock_fd_);  // the lock goes with it
}

std::string StateDir::PathOf(int expert) const {
  return absl::StrCat(dir_, "/expert-", expert, ".safetensors");
}

void StateDir::Save(std::shared_ptr<const ExpertHandle> handle) {
  if (handle == nullptr || handle->trained_step == 0) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t& newest = newest_[handle->id];
    if (handle->trained_step <= newest) return;  // as new or newer is queued or written
    newest = handle->trained_step;
    queued_[handle->id] = std::move(handle);
  }
  cv_.notify_all();
}

void StateDir::Flush() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return queued_.empty() && !writing_; });
}

void StateDir::WriterLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stopping_ || !queued_.empty(); });
    if (queued_.empty()) return;  // stopping, and everything is written
    auto next = queued_.begin();
    std::shared_ptr<const ExpertHandle> handle = std::move(next->second);
    queued_.erase(next);
    writing_ = true;
    lock.unlock();
    const absl::Status st = Write(*handle);
    if (!st.ok()) {
      common::Log("moe-expert-server: state dir: expert %d at step %llu not saved: %s\n",
                  handle->id, static_cast<unsigned long long>(handle->trained_step),
                  std::string(st.message()).c_str());
    }
    if (on_written_) on_written_(handle->id, handle->trained_step, st);
    handle.reset();
    lock.lock();
    writing_ = false;
    cv_.notify_all();
  }
}

absl::StatusOr<std::string> StateDir::FingerprintOf(int expert,
                                                    const common::ExpertWeights& w) const {
  ASSIGN_OR_RETURN(std::string bytes, common::SerializeExpert(config_, expert, w));
  return common::Fingerprint(bytes);
}

absl::StatusOr<std::string> StateDir::BaseFingerprint(int expert) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = fingerprints_.find(expert);
    if (it != fingerprints_.end()) return it->second;
  }
  ASSIGN_OR_RETURN(common::ExpertWeights w, checkpoint_(expert));
  ASSIGN_OR_RETURN(const std::string print, FingerprintOf(expert, w));
  std::lock_guard<std::mutex> lock(mu_);
  fingerprints_[expert] = print;
  return print;
}

absl::Status StateDir::Write(const ExpertHandle& handle) {
  ASSIGN_OR_RETURN(std::string base, BaseFingerprint(handle.id));
  return common::SaveExpert(PathOf(handle.id), config_, handle.id, handle.ffn->weights(),
                            {{kStepKey, absl::StrCat(handle.trained_step)}, {kBaseKey, base}});
}

std::optional<LoadedExpert> StateDir::Read(int expert) {
  const std::string path = PathOf(expert);
  if (::access(path.c_str(), F_OK) != 0) return std::nullopt;
  auto skip = [&](absl::string_view why) -> std::optional<LoadedExpert> {
    bool first;
    {
      std::lock_guard<std::mutex> lock(mu_);
      first = ignored_why_.insert(std::string(why)).second;
    }
    if (first) {
      common::Log(
          "moe-expert-server: state dir: %s ignored, expert %d read from the "
          "checkpoint: %s (said once: other files ignored for this reason are not "
          "logged)\n",
          path.c_str(), expert, std::string(why).c_str());
    }
    return std::nullopt;
  };
  absl::StatusOr<std::unique_ptr<common::SafetensorsReader>> reader =
      common::SafetensorsReader::Open(path);
  if (!reader.ok()) return skip(reader.status().message());
  const auto& meta = (*reader)->metadata();
  auto step = meta.find(kStepKey);
  auto base = meta.find(kBaseKey);
  uint64_t trained_step = 0;
  if (step == meta.end() || base == meta.end() ||
      !absl::SimpleAtoi(step->second, &trained_step) || trained_step == 0) {
    return skip("no training step or checkpoint fingerprint in its metadata");
  }
  absl::StatusOr<std::string> expected = BaseFingerprint(expert);
  if (!expected.ok()) return skip(expected.status().message());
  absl::StatusOr<common::ExpertWeights> w = common::ReadExpert(**reader, "", config_, expert);
  if (*expected != base->second) {
    // Where the checkpoint was saved from this training (save-checkpoint, then a start from that
    // file with the same --state-dir), it holds these very weights: nothing is lost, nothing said.
    absl::StatusOr<std::string> print = w.ok() ? FingerprintOf(expert, *w) : w.status();
    if (print.ok() && *print == *expected) return std::nullopt;
    return skip(
        "it was trained from other weights than this checkpoint's (another model's, or "
        "steps trained after this checkpoint was saved from it: those are not kept); "
        "delete it to silence this");
  }
  if (!w.ok()) return skip(w.status().message());
  {
    // The file already holds these weights: installing them needs no write.
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t& newest = newest_[expert];
    newest = std::max(newest, trained_step);
  }
  return LoadedExpert{std::move(*w), trained_step};
}

}  // namespace moe::expert
