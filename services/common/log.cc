#include "services/common/log.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <string>

namespace moe::common {

void Log(const char* format, ...) {
  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  tm utc{};
  gmtime_r(&now.tv_sec, &utc);
  char stamp[40];
  const int head = std::snprintf(stamp, sizeof(stamp), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ ",
                                 utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday, utc.tm_hour,
                                 utc.tm_min, utc.tm_sec, now.tv_nsec / 1000000);
  std::string line(stamp, std::clamp<size_t>(head > 0 ? head : 0, 0, sizeof(stamp) - 1));
  va_list args;
  va_start(args, format);
  va_list again;
  va_copy(again, args);
  const int n = std::vsnprintf(nullptr, 0, format, args);
  va_end(args);
  if (n > 0) {
    const size_t at = line.size();
    line.resize(at + static_cast<size_t>(n) + 1);
    std::vsnprintf(&line[at], static_cast<size_t>(n) + 1, format, again);
    line.resize(at + static_cast<size_t>(n));
  }
  va_end(again);
  // The whole line in one write(2), where the pipe or file takes it at once.
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    const ssize_t w = write(STDERR_FILENO, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) break;
    p += w;
    left -= static_cast<size_t>(w);
  }
}

}  // namespace moe::common
