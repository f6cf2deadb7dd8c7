#ifndef MOE_SERVICES_COMMON_THREAD_POOL_H_
#define MOE_SERVICES_COMMON_THREAD_POOL_H_

// A fixed pool of worker threads for work handed off from gRPC callbacks (which must not block).

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moe::common {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();  // runs what is queued, then joins
  // False after shutdown began (the task is dropped).
  bool Submit(std::function<void()> task);
  void Shutdown();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_THREAD_POOL_H_
