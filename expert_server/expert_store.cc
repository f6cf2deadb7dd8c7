#include "expert_server/expert_store.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "services/common/server_util.h"

namespace moe::expert {

absl::string_view ExpertStateName(ExpertState s) {
  switch (s) {
    case ExpertState::kLoading: return "loading";
    case ExpertState::kReady: return "ready";
    case ExpertState::kDraining: return "draining";
    case ExpertState::kFailed: return "failed";
  }
  return "?";
}

ExpertLease::ExpertLease(ExpertStore* store, std::shared_ptr<ExpertHandle> handle, int64_t rows)
    : store_(store), handle_(std::move(handle)), rows_(rows) {
  handle_->in_flight_rows.fetch_add(rows_);
}

ExpertLease::ExpertLease(ExpertLease&& other) noexcept
    : store_(other.store_), handle_(std::move(other.handle_)), rows_(other.rows_) {
  other.store_ = nullptr;
  other.rows_ = 0;
}

ExpertLease& ExpertLease::operator=(ExpertLease&& other) noexcept {
  if (this != &other) {
    Reset();
    store_ = other.store_;
    handle_ = std::move(other.handle_);
    rows_ = other.rows_;
    other.store_ = nullptr;
    other.rows_ = 0;
  }
  return *this;
}

ExpertLease::~ExpertLease() { Reset(); }

void ExpertLease::Reset() {
  if (handle_ == nullptr) return;
  if (handle_->in_flight_rows.fetch_sub(rows_) == rows_ && store_ != nullptr) {
    store_->Released(handle_.get());
  }
  handle_.reset();
  store_ = nullptr;
}

ExpertStore::ExpertStore(common::ModelConfig config, CheckpointLoader checkpoint, PeerLoader peer)
    : config_(config), checkpoint_(std::move(checkpoint)), peer_(std::move(peer)) {
  loader_ = std::thread([this] { LoaderLoop(); });
}

ExpertStore::~ExpertStore() { StopLoading(); }

void ExpertStore::SetOnChange(std::function<void()> on_change) {
  std::lock_guard<std::mutex> lock(mu_);
  on_change_ = std::move(on_change);
}

void ExpertStore::SetOnWeights(
    std::function<void(std::shared_ptr<const ExpertHandle>)> on_weights) {
  std::lock_guard<std::mutex> lock(mu_);
  on_weights_ = std::move(on_weights);
}

void ExpertStore::NotifyChange(std::shared_ptr<const ExpertHandle> installed) {
  std::function<void()> cb;
  std::function<void(std::shared_ptr<const ExpertHandle>)> weights_cb;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cb = on_change_;
    weights_cb = on_weights_;
  }
  if (cb) cb();
  if (installed != nullptr && weights_cb) weights_cb(std::move(installed));
}

absl::Status ExpertStore::CheckVersion(uint64_t version, uint64_t lease_epoch) {
  // The lease first: a router whose lease went to another may number its versions past the
  // new holder's (it placed longer), so the version alone cannot tell.
  if (lease_epoch >= common::kMaxLeaseEpoch) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement lease epoch ", lease_epoch,
                     " is out of range: a coordinator grants less than ", common::kMaxLeaseEpoch));
  }
  if (lease_epoch != 0 && lease_epoch < lease_epoch_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "placement lease epoch ", lease_epoch, " is older than ", lease_epoch_,
        ", under which this shard was placed since: the sender no longer holds the placement "
        "lease (or its coordinator restarted with its clock behind, and the sender asks it for "
        "a later epoch)"));
  }
  // Fenced from here, also where the version below is refused (the new holder numbers again).
  if (lease_epoch > lease_epoch_) lease_epoch_ = lease_epoch;
  if (version != 0 && version < version_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "placement version ", version, " is older than the shard's version ", version_));
  }
  if (version > version_) version_ = version;
  return absl::OkStatus();
}

absl::Status ExpertStore::Load(const std::vector<int>& experts, uint64_t version,
                               const std::string& peer, std::function<void(absl::Status)> done,
                               bool replace_newer, uint64_t lease_epoch) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int e : experts) {
      if (e < 0 || e >= config_.num_experts) {
        return absl::InvalidArgumentError(absl::StrCat("expert ", e, " is out of range [0, ",
                                                       config_.num_experts, ")"));
      }
    }
    if (stopping_) return absl::UnavailableError("shard is shutting down");
    absl::Status st = CheckVersion(version, lease_epoch);
    if (!st.ok()) return st;
    std::vector<int> todo;
    for (int e : experts) {
      auto it = entries_.find(e);
      const bool have = it != entries_.end() && (it->second.state == ExpertState::kReady ||
                                                 it->second.state == ExpertState::kDraining);
      if (have) it->second.state = ExpertState::kReady;  // wanted again: cancels a drain
      if (!have) entries_[e] = Entry{ExpertState::kLoading, nullptr, "", 0};
      uint64_t& asked = entries_[e].lease_epoch;
      asked = std::max(asked, lease_epoch);
      if (have && peer.empty()) continue;
      todo.push_back(e);
    }
    jobs_.push_back(Job{std::move(todo), peer, std::move(done), replace_newer, lease_epoch});
  }
  jobs_cv_.notify_all();
  NotifyChange();
  return absl::OkStatus();
}

void ExpertStore::StopLoading() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !loader_.joinable()) return;
    stopping_ = true;
  }
  jobs_cv_.notify_all();
  if (loader_.joinable()) loader_.join();
}

void ExpertStore::LoaderLoop() {
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      jobs_cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (stopping_) break;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    absl::Status first_error;
    for (int e : job.experts) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) {
          first_error = absl::UnavailableError("shard is shutting down");
          break;
        }
      }
      absl::StatusOr<LoadedExpert> w = job.peer.empty() ? checkpoint_(e) : peer_(job.peer, e);
      absl::StatusOr<std::unique_ptr<ExpertFfn>> ffn =
          w.ok() ? ExpertFfn::Create(config_, std::move(w->weights)) : w.status();
      std::shared_ptr<const ExpertHandle> installed;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto found = entries_.find(e);
        if (found == entries_.end()) {  // unloaded while it was loading
          if (first_error.ok()) {
            first_error =
                absl::AbortedError(absl::StrCat("expert ", e, " was unloaded while it loaded"));
          }
          continue;
        }
        Entry& entry = found->second;
        // Queued by a router whose placement lease has gone to another since (a copy or a
        // roll-back waiting behind a slow load): it installs nothing over weights (they may be
        // the new holder's training), nor into an entry the new holder asked for (its own job
        // loads that). A first load of an expert nobody asked for since goes ahead: at worst an
        // extra, which the new holder unloads.
        const bool superseded =
            job.lease_epoch != 0 && (job.lease_epoch < entry.lease_epoch ||
                                     (entry.handle != nullptr && job.lease_epoch < lease_epoch_));
        if (superseded) {  // nor does it change the entry's state: the new holder's to set
          if (first_error.ok()) {
            first_error = absl::FailedPreconditionError(absl::StrCat(
                "expert ", e, ": not installed: placement lease epoch ", job.lease_epoch,
                " is older than ", std::max(entry.lease_epoch, lease_epoch_),
                ", under which this shard was placed while the load waited"));
          }
        } else if (ffn.ok() && !job.replace_newer && entry.handle != nullptr &&
                   entry.handle->trained_step > w->trained_step) {
          // A copy older than the weights it would replace (trained meanwhile): keep these.
          entry.state = ExpertState::kReady;
        } else if (ffn.ok()) {
          auto handle = std::make_shared<ExpertHandle>();
          handle->id = e;
          handle->ffn = std::move(*ffn);
          handle->trained_step = w->trained_step;
          installed = handle;
          entry = Entry{ExpertState::kReady, std::move(handle), "", entry.lease_epoch};
        } else {
          const std::string msg = absl::StrCat("expert ", e, ": ", ffn.status().message());
          if (first_error.ok()) first_error = absl::Status(ffn.status().code(), msg);
          // A failed reload keeps the weights it had.
          if (entry.handle == nullptr) {
            entry = Entry{ExpertState::kFailed, nullptr, msg, entry.lease_epoch};
          }
        }
      }
      NotifyChange(std::move(installed));
    }
    if (job.done) job.done(first_error);
  }
  // Shutting down: answer every job still queued.
  std::deque<Job> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(jobs_);
  }
  for (Job& j : left) {
    if (j.done) j.done(absl::UnavailableError("shard is shutting down"));
  }
}

absl::Status ExpertStore::Unload(const std::vector<int>& experts, uint64_t version,
                                 uint64_t lease_epoch) {
  std::vector<std::shared_ptr<ExpertHandle>> idle;
  {
    std::lock_guard<std::mutex> lock(mu_);
    absl::Status st = CheckVersion(version, lease_epoch);
    if (!st.ok()) return st;
    for (int e : experts) {
      auto it = entries_.find(e);
      if (it == entries_.end()) continue;
      if (it->second.handle == nullptr || it->second.handle->in_flight_rows.load() == 0) {
        idle.push_back(std::move(it->second.handle));
        entries_.erase(it);
      } else {
        it->second.state = ExpertState::kDraining;
      }
    }
  }
  NotifyChange();
  return absl::OkStatus();
}

void ExpertStore::Released(ExpertHandle* handle) {
  bool removed = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(handle->id);
    if (it != entries_.end() && it->second.handle.get() == handle &&
        it->second.state == ExpertState::kDraining && handle->in_flight_rows.load() == 0) {
      entries_.erase(it);
      removed = true;
    }
  }
  if (removed) NotifyChange();
}

absl::StatusOr<ExpertLease> ExpertStore::Acquire(int expert, int64_t rows) {
  std::lock_guard<std::mutex> lock(mu_);
  if (expert < 0 || expert >= config_.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("unknown expert ", expert, " (the model has ",
                                                   config_.num_experts, " experts)"));
  }
  auto it = entries_.find(expert);
  if (it == entries_.end() || it->second.handle == nullptr) {
    const char* why = it == entries_.end()                          ? "not loaded"
                      : it->second.state == ExpertState::kLoading ? "still loading"
                                                                    : "failed to load";
    return absl::FailedPreconditionError(absl::StrCat("expert ", expert, " is ", why,
                                                      " on this shard (placement version ",
                                                      version_, ")"));
  }
  return ExpertLease(this, it->second.handle, rows);
}

absl::Status ExpertStore::ReplaceExpert(int expert, std::unique_ptr<ExpertFfn> ffn,
                                        uint64_t trained_step, const ExpertHandle* expected) {
  std::shared_ptr<const ExpertHandle> installed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(expert);
    if (it == entries_.end() || it->second.handle == nullptr ||
        it->second.state != ExpertState::kReady) {
      return absl::FailedPreconditionError(
          absl::StrCat("expert ", expert, " is not ready on this shard"));
    }
    if (expected != nullptr && it->second.handle.get() != expected) {
      return absl::AbortedError(
          absl::StrCat("expert ", expert, "'s weights were replaced while its update was computed"));
    }
    auto handle = std::make_shared<ExpertHandle>();
    handle->id = expert;
    handle->ffn = std::move(ffn);
    handle->trained_step = trained_step;
    installed = handle;
    it->second.handle = std::move(handle);
  }
  NotifyChange(std::move(installed));
  return absl::OkStatus();
}

std::shared_ptr<ExpertHandle> ExpertStore::Find(int expert) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(expert);
  return it == entries_.end() ? nullptr : it->second.handle;
}

std::vector<ExpertInfo> ExpertStore::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<ExpertInfo> out;
  for (const auto& [e, entry] : entries_) {
    out.push_back(ExpertInfo{e, entry.state, entry.error,
                             entry.handle ? entry.handle->in_flight_rows.load() : 0,
                             entry.handle ? entry.handle->trained_step : 0});
  }
  return out;
}

uint64_t ExpertStore::placement_version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return version_;
}

uint64_t ExpertStore::lease_epoch() const {
  std::lock_guard<std::mutex> lock(mu_);
  return lease_epoch_;
}

int ExpertStore::ready_count() const { return CountInState(ExpertState::kReady); }

int ExpertStore::loading_count() const { return CountInState(ExpertState::kLoading); }

int ExpertStore::CountInState(ExpertState state) const {
  std::lock_guard<std::mutex> lock(mu_);
  int n = 0;
  for (const auto& [e, entry] : entries_) n += entry.state == state;
  return n;
}

}  // namespace moe::expert
