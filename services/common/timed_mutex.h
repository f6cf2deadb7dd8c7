#ifndef MOE_SERVICES_COMMON_TIMED_MUTEX_H_
#define MOE_SERVICES_COMMON_TIMED_MUTEX_H_

// A timed mutex (Lockable and TimedLockable, for std::unique_lock) built on std::mutex and
// std::condition_variable. std::timed_mutex's timed lock is pthread_mutex_clocklock, which GCC
// 12's ThreadSanitizer does not intercept: it then reports every later unlock as "unlock of an
// unlocked mutex". This one is seen whole by the sanitizer.

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace moe::common {

class TimedMutex {
 public:
  void lock() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [this] { return !held_; });
    held_ = true;
  }
  bool try_lock() {
    std::lock_guard<std::mutex> l(mu_);
    if (held_) return false;
    held_ = true;
    return true;
  }
  template <typename Rep, typename Period>
  bool try_lock_for(const std::chrono::duration<Rep, Period>& timeout) {
    return try_lock_until(std::chrono::steady_clock::now() + timeout);
  }
  template <typename Clock, typename Duration>
  bool try_lock_until(const std::chrono::time_point<Clock, Duration>& deadline) {
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_until(l, deadline, [this] { return !held_; })) return false;
    held_ = true;
    return true;
  }
  void unlock() {
    {
      std::lock_guard<std::mutex> l(mu_);
      held_ = false;
    }
    cv_.notify_one();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool held_ = false;
};

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_TIMED_MUTEX_H_
