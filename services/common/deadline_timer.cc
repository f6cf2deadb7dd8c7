#include "services/common/deadline_timer.h"

#include <vector>

#include "services/common/clock.h"

namespace moe::common {

DeadlineTimer::DeadlineTimer(absl::Duration tick) : tick_(tick) {
  thread_ = std::thread([this] { Loop(); });
}

DeadlineTimer& DeadlineTimer::Process() {
  static DeadlineTimer* const timer = new DeadlineTimer();
  return *timer;
}

DeadlineTimer::~DeadlineTimer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

uint64_t DeadlineTimer::Schedule(absl::Time when, std::function<void()> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t id = next_id_++;
  timers_.emplace(std::make_pair(when, id), std::move(fn));
  when_[id] = when;
  if (when < next_look_) {
    next_look_ = when;
    cv_.notify_one();
  }
  return id;
}

bool DeadlineTimer::Cancel(uint64_t id) {
  std::function<void()> dropped;  // destroyed outside the lock
  std::lock_guard<std::mutex> lock(mu_);
  auto it = when_.find(id);
  if (it == when_.end()) return false;
  auto t = timers_.find({it->second, id});
  dropped = std::move(t->second);
  timers_.erase(t);
  when_.erase(it);
  return true;
}

size_t DeadlineTimer::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return timers_.size();
}

void DeadlineTimer::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    const absl::Time now = MonotonicNow();
    std::vector<std::function<void()>> due;
    while (!timers_.empty() && timers_.begin()->first.first <= now) {
      when_.erase(timers_.begin()->first.second);
      due.push_back(std::move(timers_.begin()->second));
      timers_.erase(timers_.begin());
    }
    if (!due.empty()) {
      lock.unlock();
      for (auto& fn : due) fn();
      due.clear();
      lock.lock();
      continue;
    }
    // Sleep until the earliest deadline, but no longer than a tick: a deadline scheduled later
    // than next_look_ does not wake the thread, so it must look again by itself.
    next_look_ = now + tick_;
    if (!timers_.empty()) next_look_ = std::min(next_look_, timers_.begin()->first.first);
    cv_.wait_for(lock, absl::ToChronoNanoseconds(next_look_ - now));
  }
}

}  // namespace moe::common
