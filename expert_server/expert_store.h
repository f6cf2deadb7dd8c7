#ifndef MOE_EXPERT_SERVER_EXPERT_STORE_H_
#define MOE_EXPERT_SERVER_EXPERT_STORE_H_

// The experts a shard hosts, their lifecycle (loading, ready, draining, failed) and the shard's
// placement version. Loading runs on a background thread; draining experts keep serving until
// their in-flight work is done, then go. No gRPC here: weights come from injected loaders.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include <mutex>
#include "expert_server/expert_ffn.h"
#include "services/common/checkpoint.h"

namespace moe::expert {

enum class ExpertState { kLoading, kReady, kDraining, kFailed };

// A loaded expert. Shared: in-flight work keeps it alive after it leaves the store.
struct ExpertHandle {
  int id = 0;
  std::unique_ptr<ExpertFfn> ffn;
  uint64_t trained_step = 0;  // the last training step applied to ffn's weights (0: checkpoint)
  std::atomic<int64_t> in_flight_rows{0};
};

class ExpertStore;

// Counts `rows` of in-flight work against an expert until destroyed.
class ExpertLease {
 public:
  ExpertLease() = default;
  ExpertLease(ExpertStore* store, std::shared_ptr<ExpertHandle> handle, int64_t rows);
  ExpertLease(ExpertLease&& other) noexcept;
  ExpertLease& operator=(ExpertLease&& other) noexcept;
  ~ExpertLease();
  const std::shared_ptr<ExpertHandle>& handle() const { return handle_; }

 private:
  void Reset();
  ExpertStore* store_ = nullptr;
  std::shared_ptr<ExpertHandle> handle_;
  int64_t rows_ = 0;
};

struct ExpertInfo {
  int expert = 0;
  ExpertState state = ExpertState::kLoading;
  std::string error;
  int64_t in_flight_rows = 0;
  uint64_t trained_step = 0;
};

// An expert's weights as read, and the last training step applied to them (0: the checkpoint's).
struct LoadedExpert {
  common::ExpertWeights weights;
  uint64_t trained_step = 0;
};

class ExpertStore {
 public:
  // Reads expert e's weights: from the shard's own storage (the checkpoint, or trained weights
  // kept on disk), or from a peer shard at `peer`.
  using CheckpointLoader = std::function<absl::StatusOr<LoadedExpert>(int expert)>;
  using PeerLoader =
      std::function<absl::StatusOr<LoadedExpert>(const std::string& peer, int expert)>;

  ExpertStore(common::ModelConfig config, CheckpointLoader checkpoint, PeerLoader peer);
  ~ExpertStore();

  // Schedules `experts` for loading under `version` (from `peer` when not empty). `done` runs on
  // the loader thread once all finished, with the first failure if any. An expert already ready
  // is reloaded only when copying from a peer. Errors now: INVALID_ARGUMENT for an expert out of
  // range, FAILED_PRECONDITION for a version older than the shard's, or a `lease_epoch` older
  // than the highest sent (the sender's placement lease went to another router; 0: not
  // checked). A loaded expert keeps its weights where they are of a later training step than
  // the copy's, unless `replace_newer`.
  absl::Status Load(const std::vector<int>& experts, uint64_t version, const std::string& peer,
                    std::function<void(absl::Status)> done, bool replace_newer = false,
                    uint64_t lease_epoch = 0);

  // Swaps in new weights for a loaded expert (after training step `trained_step`); work in
  // flight keeps the old ones. FAILED_PRECONDITION when the expert is not loaded; ABORTED when
  // `expected` is given and the expert's weights are no longer those (a copy landed meanwhile).
  absl::Status ReplaceExpert(int expert, std::unique_ptr<ExpertFfn> ffn, uint64_t trained_step,
                             const ExpertHandle* expected = nullptr);

  // Stops the loader: the expert being read finishes, queued jobs are answered UNAVAILABLE.
  void StopLoading();

  // Marks `experts` draining; each leaves once its in-flight work is done.
  // FAILED_PRECONDITION for a version or a lease epoch as Load refuses.
  absl::Status Unload(const std::vector<int>& experts, uint64_t version, uint64_t lease_epoch = 0);

  // A ready or draining expert, leased for `rows` of work. INVALID_ARGUMENT when out of range,
  // FAILED_PRECONDITION naming the expert and the placement version when not loaded here.
  absl::StatusOr<ExpertLease> Acquire(int expert, int64_t rows);

  // The handle of a ready or draining expert, or null.
  std::shared_ptr<ExpertHandle> Find(int expert) const;

  std::vector<ExpertInfo> Snapshot() const;
  uint64_t placement_version() const;
  uint64_t lease_epoch() const;  // the highest sent; 0 before any
  int ready_count() const;
  int loading_count() const;
  const common::ModelConfig& config() const { return config_; }

  // Called (without locks held) whenever an expert changes state.
  void SetOnChange(std::function<void()> on_change);
  // Called (without locks held) with an expert's new weights whenever some are installed (a load
  // or ReplaceExpert).
  void SetOnWeights(std::function<void(std::shared_ptr<const ExpertHandle>)> on_weights);

 private:
  friend class ExpertLease;
  struct Entry {
    ExpertState state = ExpertState::kLoading;
    std::shared_ptr<ExpertHandle> handle;
    std::string error;
    // The highest lease epoch of a Load that asked for this expert: a queued job of an older one
    // installs nothing here.
    uint64_t lease_epoch = 0;
  };
  struct Job {
    std::vector<int> experts;
    std::string peer;
    std::function<void(absl::Status)> done;
    bool replace_newer = false;
    uint64_t lease_epoch = 0;  // the sender's: checked again before weights are replaced
  };

  void LoaderLoop();
  int CountInState(ExpertState state) const;
  void Released(ExpertHandle* handle);
  // Runs on_change_, and on_weights_ with `installed` when given.
  void NotifyChange(std::shared_ptr<const ExpertHandle> installed = nullptr);
  absl::Status CheckVersion(uint64_t version, uint64_t lease_epoch);  // mu_ held

  const common::ModelConfig config_;
  const CheckpointLoader checkpoint_;
  const PeerLoader peer_;

  // std::mutex rather than absl::Mutex: Debian's Abseil is not built with ThreadSanitizer, which
  // then could not see this lock (make test-tsan).
  mutable std::mutex mu_;
  std::condition_variable jobs_cv_;  // a job was queued, or stopping
  std::map<int, Entry> entries_;
  uint64_t version_ = 0;
  uint64_t lease_epoch_ = 0;
  std::deque<Job> jobs_;
  bool stopping_ = false;
  std::function<void()> on_change_;
  std::function<void(std::shared_ptr<const ExpertHandle>)> on_weights_;
  std::thread loader_;
};

absl::string_view ExpertStateName(ExpertState s);

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVER_EXPERT_STORE_H_
