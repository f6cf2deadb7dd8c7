#include "expert_server/compute_pool.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "services/common/clock.h"

namespace moe::expert {

int64_t DispatchTask::total_rows() const {
  int64_t n = 0;
  for (const Part& p : parts) n += static_cast<int64_t>(p.row_index.size());
  return n;
}

ComputePool::ComputePool(int d_model, const ComputePoolOptions& options, ShardMetrics* metrics)
    : d_model_(d_model), options_(options), metrics_(metrics) {
  for (int i = 0; i < std::max(1, options_.threads); ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
}

ComputePool::~ComputePool() { Shutdown(); }

absl::Status ComputePool::Submit(std::shared_ptr<DispatchTask> task) {
  const int64_t rows = task->total_rows();
  const absl::Time now = common::MonotonicNow();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return absl::UnavailableError("shard is shutting down");
    if (queued_rows_ + rows > options_.max_queue_rows) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "shard queue is full: ", queued_rows_, " rows queued, batch of ", rows,
          " rows exceeds the limit of ", options_.max_queue_rows, "; retry later"));
    }
    int parts = 0;
    for (size_t p = 0; p < task->parts.size(); ++p) {
      if (task->parts[p].row_index.empty()) continue;
      ExpertHandle* h = task->parts[p].lease.handle().get();
      auto& q = queues_[h];
      if (q.empty() && !taken_.count(h)) ready_.push_back(h);
      q.push_back(Item{task, static_cast<int>(p), now});
      ++parts;
    }
    task->remaining_.store(parts);
    if (parts > 0) {
      queued_tasks_[task.get()] = parts;
      queued_rows_ += rows;
      if (metrics_) metrics_->SetQueue(queued_rows_, static_cast<int64_t>(queued_tasks_.size()));
    }
    if (parts == 0) {
      // Nothing to compute (every expert had no rows): answer now, off the caller's thread.
      cv_.notify_all();
    }
  }
  if (task->remaining_.load() == 0) {
    Finish(*task, absl::OkStatus());
    return absl::OkStatus();
  }
  cv_.notify_all();
  return absl::OkStatus();
}

bool ComputePool::HasRoom(int64_t rows) const {
  std::lock_guard<std::mutex> lock(mu_);
  return !stopping_ && queued_rows_ + rows <= options_.max_queue_rows;
}

int64_t ComputePool::queued_rows() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queued_rows_;
}

int64_t ComputePool::queued_batches() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(queued_tasks_.size());
}

void ComputePool::Finish(DispatchTask& task, const absl::Status& status) {
  if (task.finished_.exchange(true)) return;
  if (task.done) task.done(task, status);
}

void ComputePool::Shutdown() {
  std::vector<std::shared_ptr<DispatchTask>> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
    for (auto& [h, q] : queues_) {
      for (Item& it : q) dropped.push_back(std::move(it.task));
    }
    queues_.clear();
    ready_.clear();
    queued_tasks_.clear();
    queued_rows_ = 0;
  }
  cv_.notify_all();
  for (auto& t : dropped) Finish(*t, absl::UnavailableError("shard is shutting down"));
  dropped.clear();
  for (std::thread& w : workers_) w.join();
  workers_.clear();
}

void ComputePool::WorkerLoop() {
  // Parallelism comes from the workers; each expert matmul runs on its worker's thread.
  omp_set_num_threads(1);
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stopping_ || !ready_.empty(); });
    if (stopping_) return;
    ExpertHandle* h = ready_.front();
    ready_.pop_front();
    taken_[h] = true;
    auto rows_queued = [&] {
      int64_t n = 0;
      for (const Item& it : queues_[h]) {
        n += static_cast<int64_t>(it.task->parts[it.part].row_index.size());
      }
      return n;
    };
    if (options_.batch_delay > absl::ZeroDuration()) {
      // Wait for more rows until the oldest item has waited batch_delay or the matmul is full.
      const absl::Time until = queues_[h].front().enqueued + options_.batch_delay;
      while (!stopping_ && rows_queued() < options_.max_coalesced_rows &&
             common::MonotonicNow() < until) {
        cv_.wait_for(lock, common::TimeLeft(until));
      }
      if (stopping_) return;
    }
    std::vector<Item> items;
    int64_t rows = 0;
    auto& q = queues_[h];
    while (!q.empty()) {
      const int64_t r = static_cast<int64_t>(q.front().task->parts[q.front().part].row_index.size());
      if (!items.empty() && rows + r > options_.max_coalesced_rows) break;
      rows += r;
      items.push_back(std::move(q.front()));
      q.pop_front();
    }
    queued_rows_ -= rows;
    for (const Item& it : items) {
      if (--queued_tasks_[it.task.get()] == 0) queued_tasks_.erase(it.task.get());
    }
    if (metrics_) metrics_->SetQueue(queued_rows_, static_cast<int64_t>(queued_tasks_.size()));
    lock.unlock();
    Compute(h, items);
    items.clear();  // drop task references outside the lock
    lock.lock();
    taken_.erase(h);
    auto qit = queues_.find(h);
    if (qit != queues_.end()) {
      if (qit->second.empty()) {
        queues_.erase(qit);
      } else {
        ready_.push_back(h);
        cv_.notify_one();
      }
    }
  }
}

void ComputePool::Compute(ExpertHandle* expert, std::vector<Item>& items) {
  // Drop work nobody waits for any more.
  const absl::Time now = common::MonotonicNow();
  std::vector<Item*> live;
  for (Item& it : items) {
    DispatchTask& t = *it.task;
    if (t.finished_.load()) continue;
    if ((t.cancelled && t.cancelled->load()) || t.batch_cancelled.load()) {
      if (metrics_) metrics_->Rejected("cancelled");
      Finish(t, absl::CancelledError(absl::StrCat("the caller cancelled batch ", t.batch_id)));
      continue;
    }
    if (now > t.deadline) {
      if (metrics_) metrics_->Rejected("deadline");
      Finish(t, absl::DeadlineExceededError(absl::StrCat(
                    "batch ", t.batch_id, " passed its deadline while queued on the shard")));
      continue;
    }
    live.push_back(&it);
  }
  // Training forwards run one by one, keeping their activations for Backward.
  const int64_t d = d_model_;
  std::vector<Item*> infer;
  for (Item* it : live) {
    DispatchTask& t = *it->task;
    if (t.train_step == 0) {
      infer.push_back(it);
      continue;
    }
    DispatchTask::Part& part = t.parts[it->part];
    const int64_t n = static_cast<int64_t>(part.row_index.size());
    part.input.resize(n * d);
    for (int64_t r = 0; r < n; ++r) {
      std::memcpy(&part.input[r * d], &t.rows[static_cast<int64_t>(part.row_index[r]) * d],
                  sizeof(float) * d);
    }
    part.output.resize(n * d);
    part.cache = std::make_shared<ForwardCache>();
    const auto start = std::chrono::steady_clock::now();
    absl::Status st = expert->ffn->ForwardTrain(part.input.data(), n, part.output.data(),
                                                part.cache.get());
    if (metrics_ && st.ok()) {
      metrics_->ObserveCompute(expert->id, 1, n,
                               std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                             start).count());
    }
    if (!st.ok()) {
      Finish(t, st);
    } else if (t.remaining_.fetch_sub(1) == 1) {
      Finish(t, absl::OkStatus());
    }
  }
  live.swap(infer);
  if (live.empty()) return;
  int64_t rows = 0;
  for (Item* it : live) rows += static_cast<int64_t>(it->task->parts[it->part].row_index.size());
  // Gather every item's rows into one matrix.
  std::vector<float> in(rows * d), out(rows * d);
  int64_t r = 0;
  for (Item* it : live) {
    const DispatchTask& t = *it->task;
    for (int32_t idx : t.parts[it->part].row_index) {
      std::memcpy(&in[r * d], &t.rows[static_cast<int64_t>(idx) * d], sizeof(float) * d);
      ++r;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  absl::Status st = expert->ffn->Forward(in.data(), rows, out.data());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (metrics_ && st.ok()) {
    metrics_->ObserveCompute(expert->id, static_cast<int>(live.size()), rows, seconds);
  }
  r = 0;
  for (Item* it : live) {
    DispatchTask& t = *it->task;
    DispatchTask::Part& part = t.parts[it->part];
    const int64_t n = static_cast<int64_t>(part.row_index.size());
    if (!st.ok()) {
      if (metrics_) metrics_->Rejected("internal");
      Finish(t, st);
    } else {
      part.output.assign(out.begin() + r * d, out.begin() + (r + n) * d);
      if (t.remaining_.fetch_sub(1) == 1) Finish(t, absl::OkStatus());
    }
    r += n;
  }
}

}  // namespace moe::expert
