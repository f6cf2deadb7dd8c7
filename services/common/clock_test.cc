#include "services/common/clock.h"

#include <chrono>

#include <gtest/gtest.h>

namespace moe::common {
namespace {

TEST(Clock, NoWallDeadlineIsNoDeadline) {
  EXPECT_EQ(FromWallDeadline(std::chrono::system_clock::time_point::max()),
            absl::InfiniteFuture());
  EXPECT_EQ(ToWallDeadline(absl::InfiniteFuture()), std::chrono::system_clock::time_point::max());
  // A deadline centuries away does not overflow the wall clock's time point.
  EXPECT_EQ(ToWallDeadline(MonotonicNow() + absl::Hours(24 * 365 * 300)),
            std::chrono::system_clock::time_point::max());
}

TEST(Clock, AWallDeadlineKeepsTheTimeItLeaves) {
  const auto wall = std::chrono::system_clock::now() + std::chrono::seconds(5);
  const absl::Duration left = FromWallDeadline(wall) - MonotonicNow();
  EXPECT_GT(left, absl::Milliseconds(4900));
  EXPECT_LE(left, absl::Seconds(5));
  // A passed one stays passed.
  EXPECT_LT(FromWallDeadline(std::chrono::system_clock::now() - std::chrono::seconds(1)),
            MonotonicNow());
  // And back to the wall clock, within the time the conversions take.
  const absl::Time mono = MonotonicNow() + absl::Seconds(3);
  const auto back = ToWallDeadline(mono) - std::chrono::system_clock::now();
  EXPECT_GT(back, std::chrono::milliseconds(2900));
  EXPECT_LE(back, std::chrono::seconds(3));
}

TEST(Clock, TimeLeftIsNeverNegativeNorEndless) {
  EXPECT_EQ(TimeLeft(MonotonicNow() - absl::Seconds(1)), std::chrono::nanoseconds(0));
  EXPECT_EQ(TimeLeft(absl::InfinitePast()), std::chrono::nanoseconds(0));
  const auto left = TimeLeft(MonotonicNow() + absl::Seconds(2));
  EXPECT_GT(left, std::chrono::milliseconds(1900));
  EXPECT_LE(left, std::chrono::seconds(2));
  // No deadline waits a year at most, which a steady_clock time point holds.
  EXPECT_EQ(TimeLeft(absl::InfiniteFuture()), std::chrono::hours(24 * 365));
  EXPECT_GT(std::chrono::steady_clock::now() + TimeLeft(absl::InfiniteFuture()),
            std::chrono::steady_clock::now());
  // Long passed converts without overflowing, to a time gRPC still reads as passed.
  EXPECT_EQ(ToWallDeadline(absl::InfinitePast()), std::chrono::system_clock::time_point{});
}

TEST(Clock, MonotonicNowNeverGoesBack) {
  absl::Time last = MonotonicNow();
  for (int i = 0; i < 100000; ++i) {
    const absl::Time now = MonotonicNow();
    ASSERT_GE(now, last);
    last = now;
  }
}

}  // namespace
}  // namespace moe::common
