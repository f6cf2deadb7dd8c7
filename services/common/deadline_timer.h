#ifndef MOE_SERVICES_COMMON_DEADLINE_TIMER_H_
#define MOE_SERVICES_COMMON_DEADLINE_TIMER_H_

// Runs callbacks at deadlines on one thread of its own, for work that waits on other threads'
// callbacks rather than blocking (the router's asynchronous fan-out). Cancelling is cheap and
// the usual case: most deadlines never fire. To keep the usual case free of wake-ups, the thread
// sleeps at most `tick` at a time and is woken only when a new deadline comes before the time it
// will look next.

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/time/time.h"

namespace moe::common {

class DeadlineTimer {
 public:
  explicit DeadlineTimer(absl::Duration tick = absl::Seconds(1));
  ~DeadlineTimer();  // drops what has not fired
  DeadlineTimer(const DeadlineTimer&) = delete;
  DeadlineTimer& operator=(const DeadlineTimer&) = delete;

  // One timer for the whole process, never destroyed (so a callback may drop the last reference
  // to anything without ever joining the timer's own thread).
  static DeadlineTimer& Process();

  // `fn` runs on the timer's thread at `when`, a time on MonotonicNow's clock (clock.h), at once
  // if it has passed, unless cancelled first.
  // Returns an id for Cancel.
  uint64_t Schedule(absl::Time when, std::function<void()> fn);
  // True when `fn` was removed before it ran; false when it ran, is running or is unknown.
  bool Cancel(uint64_t id);
  size_t pending() const;

 private:
  void Loop();

  const absl::Duration tick_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::pair<absl::Time, uint64_t>, std::function<void()>> timers_;
  std::map<uint64_t, absl::Time> when_;  // id -> its deadline, to find it in timers_
  uint64_t next_id_ = 1;
  absl::Time next_look_ = absl::InfiniteFuture();  // when the thread will next look
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_DEADLINE_TIMER_H_
