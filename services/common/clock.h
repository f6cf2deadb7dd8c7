#ifndef MOE_SERVICES_COMMON_CLOCK_H_
#define MOE_SERVICES_COMMON_CLOCK_H_

// The clock that deadlines inside a process are kept on. A request's deadline arrives as a
// wall-clock time (gRPC's), but what it means is the time left; measured against the wall
// clock, a step of that clock (NTP setting it, an operator's `date -s`, a VM set right after a
// pause) would expire every request in flight at once, or let one run on past its time.
// Debian's Abseil also interpolates absl::Now() from the CPU's cycle counter. So deadlines are
// converted once, where they come in, to MonotonicNow's clock, and back where a wall-clock
// time point must go out (a gRPC deadline, a standard wait).

#include <algorithm>
#include <chrono>

#include "absl/time/time.h"

namespace moe::common {

// An absl::Time that advances with the monotonic clock (std::chrono::steady_clock): the wall
// clock's time when the process first asked, plus the monotonic time since. It prints as a
// plausible time, but it is for deadlines and intervals, not for dates.
inline absl::Time MonotonicNow() {
  using std::chrono::steady_clock;
  using std::chrono::system_clock;
  static const system_clock::time_point wall0 = system_clock::now();
  static const steady_clock::time_point mono0 = steady_clock::now();
  return absl::FromChrono(wall0) + absl::FromChrono(steady_clock::now() - mono0);
}

// A wall-clock deadline (a gRPC context's) on MonotonicNow's clock: now plus the time it
// leaves. No deadline (time_point::max()) stays none.
inline absl::Time FromWallDeadline(std::chrono::system_clock::time_point deadline) {
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  // Read in this order, the time between the two reads shortens the deadline, never extends it.
  const absl::Time now = MonotonicNow();
  return now + (absl::FromChrono(deadline) - absl::FromChrono(std::chrono::system_clock::now()));
}

// And back: a MonotonicNow deadline as a wall-clock time point, for what must take one (a gRPC
// deadline, which gRPC turns into time left at once). Not for a standard wait_until: that
// watches the wall clock, and a step of it would end the wait early or late; wait for TimeLeft.
inline std::chrono::system_clock::time_point ToWallDeadline(absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) return std::chrono::system_clock::time_point::max();
  const auto wall = std::chrono::system_clock::now();  // read first, for the same reason
  const absl::Duration left = deadline - MonotonicNow();
  // Far deadlines stay far without overflowing the time point.
  if (left > absl::Hours(24 * 365)) return std::chrono::system_clock::time_point::max();
  // Long passed: the epoch, since gRPC reads a time point before it as no deadline at all.
  if (left < -absl::Hours(24 * 365)) return std::chrono::system_clock::time_point{};
  return wall + std::chrono::duration_cast<std::chrono::system_clock::duration>(
             absl::ToChronoNanoseconds(left));
}

// The time left until a MonotonicNow deadline, for a relative wait (wait_for, try_lock_for, both
// on the steady clock): none once it has passed, and at most a year (no deadline).
inline std::chrono::nanoseconds TimeLeft(absl::Time deadline) {
  const absl::Duration left = deadline - MonotonicNow();
  if (left <= absl::ZeroDuration()) return std::chrono::nanoseconds(0);
  return absl::ToChronoNanoseconds(std::min(left, absl::Hours(24 * 365)));
}

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_CLOCK_H_
