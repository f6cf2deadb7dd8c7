#include "services/common/log.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <ctime>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>

#include "tests/reference/test_util.h"

namespace moe::common {
namespace {

// What `write` sends to stderr, read back from a file that stands in for it meanwhile.
template <typename Write>
std::string CapturedStderr(const Write& write) {
  const std::string path = testing::TempPath("log_test.stderr");
  const int file = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600);
  EXPECT_GE(file, 0);
  const int saved = dup(STDERR_FILENO);
  dup2(file, STDERR_FILENO);
  close(file);
  write();
  dup2(saved, STDERR_FILENO);
  close(saved);
  std::ifstream in(path);
  std::stringstream out;
  out << in.rdbuf();
  return out.str();
}

// A line is the UTC time to the millisecond (now, within the test's own run), a space, and the
// formatted text; lines written one after the other come whole and in order.
TEST(Log, ALineBeginsWithTheUtcTimeToTheMillisecond) {
  // CLOCK_REALTIME as Log reads it (std::time may lag it by a tick).
  auto now = [] {
    timespec t{};
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec;
  };
  const std::time_t before = now();
  const std::string out = CapturedStderr([] {
    Log("moe-test: shard %s left rotation (%d)\n", "127.0.0.1:5", 7);
    Log("moe-test: %s\n", std::string(5000, 'x').c_str());
  });
  const std::time_t after = now();
  // "2026-12-07T23:35:01.123Z " is 25 characters.
  const std::regex stamp("(\\d{4})-(\\d{2})-(\\d{2})T(\\d{2}):(\\d{2}):(\\d{2})\\.\\d{3}Z ");
  const size_t first_end = out.find('\n');
  ASSERT_NE(first_end, std::string::npos) << out.substr(0, 200);
  const std::string first = out.substr(0, first_end + 1);
  const std::string second = out.substr(first_end + 1);
  std::smatch m;
  ASSERT_GE(first.size(), 25u) << first;
  const std::string first_stamp = first.substr(0, 25);
  ASSERT_TRUE(std::regex_match(first_stamp, m, stamp)) << first;
  EXPECT_EQ(first.substr(25), "moe-test: shard 127.0.0.1:5 left rotation (7)\n");
  ASSERT_GE(second.size(), 25u) << second.substr(0, 200);
  EXPECT_TRUE(std::regex_match(second.substr(0, 25), stamp)) << second.substr(0, 200);
  EXPECT_EQ(second.substr(25), "moe-test: " + std::string(5000, 'x') + "\n");
  std::tm utc{};
  utc.tm_year = std::stoi(m[1]) - 1900;
  utc.tm_mon = std::stoi(m[2]) - 1;
  utc.tm_mday = std::stoi(m[3]);
  utc.tm_hour = std::stoi(m[4]);
  utc.tm_min = std::stoi(m[5]);
  utc.tm_sec = std::stoi(m[6]);
  const std::time_t written = timegm(&utc);
  EXPECT_GE(written, before);
  EXPECT_LE(written, after);
}

}  // namespace
}  // namespace moe::common
