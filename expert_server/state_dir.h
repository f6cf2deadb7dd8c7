#ifndef MOE_EXPERT_SERVER_STATE_DIR_H_
#define MOE_EXPERT_SERVER_STATE_DIR_H_

// A shard's trained experts on disk (`moe-expert-server --state-dir DIR`), so that a shard that
// restarts comes back with its training instead of the checkpoint's weights. Whenever an
// expert's weights past the checkpoint's are installed (a committed training step, a copy from
// a trained peer), a background thread writes them to DIR/expert-E.safetensors (checkpoint
// tensor names, F32), with their training step and a fingerprint of the checkpoint's weights
// for that expert in the file's metadata. Only each expert's latest weights are written: a
// version still queued when a newer one arrives is skipped. A file is written to a temporary
// name, flushed to disk and renamed, so a reader sees a whole file or the previous one.
//
// Loading prefers the file to the checkpoint when its fingerprint matches the checkpoint's
// expert (a state dir left over from another model is ignored, with a log line). A shard killed
// before the last write finished comes back a step or so behind; the router then copies the
// expert from a current replica if there is one, or reports the lost steps.

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "expert_server/expert_store.h"
#include "services/common/checkpoint.h"

namespace moe::expert {

class StateDir {
 public:
  // Reads expert e's weights as the checkpoint holds them.
  using CheckpointReader = std::function<absl::StatusOr<common::ExpertWeights>(int expert)>;
  // Runs after each write, with its result.
  using OnWritten = std::function<void(int expert, uint64_t step, const absl::Status&)>;

  // Creates `dir` if missing, locks it for this object (DIR/.lock), and removes the temporary
  // files of writes that did not finish (common::RemoveUnfinishedWrites). INVALID_ARGUMENT when
  // it cannot be created or is not a directory; FAILED_PRECONDITION when another shard (or
  // another StateDir) has it locked.
  static absl::StatusOr<std::unique_ptr<StateDir>> Open(std::string dir,
                                                        common::ModelConfig config,
                                                        CheckpointReader checkpoint,
                                                        OnWritten on_written = nullptr);
  ~StateDir();  // writes what is queued, then stops

  // Queues `handle`'s weights to be written; nothing when trained_step is 0 or not newer than
  // what was queued before (the file keeps an expert's newest training).
  void Save(std::shared_ptr<const ExpertHandle> handle);
  // Expert e's saved weights and step; nullopt when there is no usable file (none, unreadable,
  // or saved over another checkpoint's weights: logged).
  std::optional<LoadedExpert> Read(int expert);
  // Blocks until everything queued so far is written.
  void Flush();

  std::string PathOf(int expert) const;

 private:
  StateDir(std::string dir, common::ModelConfig config, CheckpointReader checkpoint,
           OnWritten on_written);
  void WriterLoop();
  absl::Status Write(const ExpertHandle& handle);
  // The fingerprint of the checkpoint's weights of expert e (computed once per expert).
  absl::StatusOr<std::string> BaseFingerprint(int expert);
  // The fingerprint of expert `expert` holding `w` (of its serialized bytes), as a kept file's
  // base is told: the checkpoint's weights (BaseFingerprint), or a file's own (Read).
  absl::StatusOr<std::string> FingerprintOf(int expert, const common::ExpertWeights& w) const;

  const std::string dir_;
  const common::ModelConfig config_;
  const CheckpointReader checkpoint_;
  const OnWritten on_written_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int, std::shared_ptr<const ExpertHandle>> queued_;
  std::map<int, uint64_t> newest_;  // per expert, the newest step queued or written
  bool writing_ = false;
  bool stopping_ = false;
  std::map<int, std::string> fingerprints_;
  // Why files were ignored (Read), each said once: a directory of another model's training
  // would otherwise log the same line for every expert the shard loads.
  std::set<std::string> ignored_why_;
  std::thread writer_;
  int lock_fd_ = -1;  // DIR/.lock, held (flock) while this object lives
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVER_STATE_DIR_H_
