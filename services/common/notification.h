#ifndef MOE_SERVICES_COMMON_NOTIFICATION_H_
#define MOE_SERVICES_COMMON_NOTIFICATION_H_

// A one-shot event, like absl::Notification, on std::mutex and std::condition_variable: Debian's
// Abseil is not built with ThreadSanitizer, so synchronization through absl::Notification is
// invisible to `make test-tsan` and would be reported as races.

#include <condition_variable>
#include <mutex>

#include "absl/time/time.h"

namespace moe::common {

class Notification {
 public:
  // Notifies under the lock: a waiter may destroy the object as soon as it sees notified_.
  void Notify() {
    std::lock_guard<std::mutex> lock(mu_);
    notified_ = true;
    cv_.notify_all();
  }
  bool HasBeenNotified() const {
    std::lock_guard<std::mutex> lock(mu_);
    return notified_;
  }
  void WaitForNotification() const {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return notified_; });
  }
  bool WaitForNotificationWithTimeout(absl::Duration timeout) const {
    std::unique_lock<std::mutex> lock(mu_);
    if (timeout >= absl::Hours(24 * 365)) {  // "forever": now + the largest duration overflows
      cv_.wait(lock, [this] { return notified_; });
      return true;
    }
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [this] { return notified_; });
  }

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  bool notified_ = false;
};

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_NOTIFICATION_H_
