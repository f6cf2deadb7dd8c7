#include "services/common/deadline_timer.h"

#include <atomic>
#include <vector>

#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "services/common/clock.h"
#include "services/common/notification.h"

namespace moe::common {
namespace {

TEST(DeadlineTimer, FiresAtTheDeadlineInOrder) {
  DeadlineTimer timer(absl::Milliseconds(500));
  std::mutex mu;
  std::vector<int> order;
  Notification last;
  const absl::Time start = MonotonicNow();
  absl::Time fired_second;
  timer.Schedule(start + absl::Milliseconds(60), [&] {
    std::lock_guard<std::mutex> lock(mu);
    order.push_back(2);
    fired_second = MonotonicNow();
    last.Notify();
  });
  timer.Schedule(start + absl::Milliseconds(20), [&] {
    std::lock_guard<std::mutex> lock(mu);
    order.push_back(1);
  });
  ASSERT_TRUE(last.WaitForNotificationWithTimeout(absl::Seconds(5)));
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
  EXPECT_GE(fired_second - start, absl::Milliseconds(60));
  EXPECT_LT(fired_second - start, absl::Milliseconds(400));
  EXPECT_EQ(timer.pending(), 0u);
}

TEST(DeadlineTimer, ALaterDeadlineBeyondTheTickStillFiresOnTime) {
  // The thread sleeps a tick (500 ms) without being woken for deadlines after it; one 600 ms
  // out must still fire at 600 ms, not at the next tick boundary after it (about 990 ms here:
  // far enough apart for the check to tell them on a loaded machine).
  DeadlineTimer timer(absl::Milliseconds(500));
  absl::SleepFor(absl::Milliseconds(10));
  Notification fired;
  const absl::Time start = MonotonicNow();
  absl::Time at;
  timer.Schedule(start + absl::Milliseconds(600), [&] {
    at = MonotonicNow();
    fired.Notify();
  });
  ASSERT_TRUE(fired.WaitForNotificationWithTimeout(absl::Seconds(5)));
  EXPECT_GE(at - start, absl::Milliseconds(600));
  EXPECT_LT(at - start, absl::Milliseconds(850));
}

TEST(DeadlineTimer, CancelledCallbacksNeverRun) {
  DeadlineTimer timer;
  std::atomic<int> ran{0};
  const uint64_t a = timer.Schedule(MonotonicNow() + absl::Milliseconds(30), [&] { ++ran; });
  EXPECT_TRUE(timer.Cancel(a));
  EXPECT_FALSE(timer.Cancel(a));  // already gone
  Notification fired;
  const uint64_t b = timer.Schedule(MonotonicNow(), [&] { fired.Notify(); });  // already due
  ASSERT_TRUE(fired.WaitForNotificationWithTimeout(absl::Seconds(5)));
  EXPECT_FALSE(timer.Cancel(b));  // ran
  absl::SleepFor(absl::Milliseconds(60));
  EXPECT_EQ(ran.load(), 0);
}

}  // namespace
}  // namespace moe::common
