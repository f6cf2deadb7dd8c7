#ifndef MOE_EXPERT_SERVER_COMPUTE_POOL_H_
#define MOE_EXPERT_SERVER_COMPUTE_POOL_H_

// The shard's compute pool with dynamic batching. Dispatched batches are split into per-expert
// work items; a worker takes an expert's queued items (from any batches) up to a row limit and
// computes them in one matmul, waiting up to `batch_delay` for more rows when asked to. The queue
// is bounded in rows: a batch that does not fit is refused at once. Items of a cancelled batch or
// one past its deadline are dropped before they are computed. No gRPC here.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "expert_server/expert_store.h"
#include "expert_server/shard_metrics.h"

namespace moe::expert {

// One dispatched batch on its way through the pool.
struct DispatchTask {
  uint64_t batch_id = 0;
  std::vector<float> rows;  // [num_rows, d_model]
  int64_t num_rows = 0;
  struct Part {
    int expert = 0;
    ExpertLease lease;
    std::vector<int32_t> row_index;
    std::vector<float> output;  // [row_index.size(), d_model] once computed
    // Training forwards only: the gathered input rows and what Backward needs.
    std::vector<float> input;
    std::shared_ptr<ForwardCache> cache;
  };
  std::vector<Part> parts;
  absl::Time deadline = absl::InfiniteFuture();  // on common::MonotonicNow's clock
  // Non-zero: a training forward (computed per batch, not coalesced, keeping its cache).
  uint64_t train_step = 0;
  // Set by the owner (e.g. when its stream is cancelled); pending items are then dropped.
  std::shared_ptr<std::atomic<bool>> cancelled;
  // Set when the batch alone is cancelled (DispatchRequest.cancel); pending items are dropped.
  std::atomic<bool> batch_cancelled{false};
  // Runs exactly once, on a pool thread, with OK and every Part's output filled, or an error.
  std::function<void(DispatchTask& task, const absl::Status& status)> done;

  int64_t total_rows() const;

 private:
  friend class ComputePool;
  std::atomic<int> remaining_{0};
  std::atomic<bool> finished_{false};
};

struct ComputePoolOptions {
  int threads = 1;
  int64_t max_coalesced_rows = 256;
  absl::Duration batch_delay = absl::ZeroDuration();
  int64_t max_queue_rows = 1 << 16;
};

class ComputePool {
 public:
  ComputePool(int d_model, const ComputePoolOptions& options, ShardMetrics* metrics);
  ~ComputePool();

  // Queues the task; RESOURCE_EXHAUSTED at once when its rows do not fit the queue, UNAVAILABLE
  // after Shutdown. On error `done` is not called.
  absl::Status Submit(std::shared_ptr<DispatchTask> task);

  // Fails everything queued with UNAVAILABLE and joins the workers. Idempotent.
  void Shutdown();

  // Whether `rows` more rows fit the queue now (a cheap check before decoding a batch; Submit
  // decides).
  bool HasRoom(int64_t rows) const;
  int64_t queued_rows() const;
  int64_t queued_batches() const;
  int threads() const { return options_.threads; }

 private:
  struct Item {
    std::shared_ptr<DispatchTask> task;
    int part = 0;
    absl::Time enqueued;
  };
  void WorkerLoop();
  void Finish(DispatchTask& task, const absl::Status& status);
  void Compute(ExpertHandle* expert, std::vector<Item>& items);

  const int d_model_;
  const ComputePoolOptions options_;
  ShardMetrics* const metrics_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<ExpertHandle*, std::deque<Item>> queues_;
  std::deque<ExpertHandle*> ready_;      // experts with queued items that no worker holds
  std::map<ExpertHandle*, bool> taken_;  // experts a worker is working on
  int64_t queued_rows_ = 0;
  std::map<DispatchTask*, int> queued_tasks_;  // tasks with items still queued
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVER_COMPUTE_POOL_H_
