#ifndef MOE_TESTS_REFERENCE_TEST_UTIL_H_
#define MOE_TESTS_REFERENCE_TEST_UTIL_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "services/common/flags.h"

namespace moe::testing {

// A directory of this test process's own in the test temp directory (ctest runs tests in
// parallel, one process each), removed with everything in it when the process exits normally,
// so test runs leave no checkpoints, certificates or peer files behind.
inline const std::string& TestTempDir() {
  struct Dir {
    const pid_t owner = getpid();
    const std::string path = ::testing::TempDir() + "/moe_" + std::to_string(owner);
    Dir() { mkdir(path.c_str(), 0700); }
    ~Dir() {
      std::error_code ec;  // a forked child that exits must not take its parent's files along
      if (getpid() == owner) std::filesystem::remove_all(path, ec);
    }
  };
  static const Dir dir;
  return dir.path;
}

// A path in this test process's temp directory.
inline std::string TempPath(const std::string& name) { return TestTempDir() + "/" + name; }

// The first of `n` consecutive loopback ports that nothing uses now, for services a test starts
// on fixed ports (metrics endpoints, which the test then scrapes). Below Linux's ephemeral range
// (32768 and up), where outgoing connections take their local ports, and chosen at random, so
// tests that ctest runs in parallel rarely try the same block; each port is checked by binding
// it. -1 if no free block turns up.
inline int FreePortBlock(int n) {
  unsigned seed = static_cast<unsigned>(getpid()) * 2654435761u ^
                  static_cast<unsigned>(time(nullptr));
  for (int attempt = 0; attempt < 200; ++attempt) {
    seed = seed * 1103515245u + 12345u;
    const int base = 10000 + static_cast<int>((seed >> 8) % 22000u);
    bool free = true;
    for (int p = base; free && p < base + n; ++p) {
      const int fd = socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(static_cast<uint16_t>(p));
      inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
      free = fd >= 0 && bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
      if (fd >= 0) close(fd);
    }
    if (free) return base;
  }
  return -1;
}

// The sockets the kernel lists on local TCP port `port` (/proc/net/tcp and tcp6), one line each
// with its state and inode: for a test that found a port in use to say what held it. "" if none.
inline std::string SocketsOnPort(int port) {
  static const char* const kStates[] = {"",           "ESTABLISHED", "SYN_SENT",  "SYN_RECV",
                                        "FIN_WAIT1",  "FIN_WAIT2",   "TIME_WAIT", "CLOSE",
                                        "CLOSE_WAIT", "LAST_ACK",    "LISTEN",    "CLOSING"};
  std::string found;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // the header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state, queues, timer, retr, uid, timeout, inode;
      fields >> slot >> local >> remote >> state >> queues >> timer >> retr >> uid >> timeout >>
          inode;
      const size_t colon = local.rfind(':');
      if (colon == std::string::npos || std::stoi(local.substr(colon + 1), nullptr, 16) != port) {
        continue;
      }
      const int s = std::stoi(state, nullptr, 16);
      found += std::string(table) + " " + local + " -> " + remote + " " +
               (s > 0 && s < 12 ? kStates[s] : state) + " uid " + uid + " inode " + inode + "\n";
    }
  }
  return found;
}

// The body of http://127.0.0.1:port/metrics (headers included), "" when nothing listens.
inline std::string ScrapeMetrics(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string req = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string body;
  char buf[8192];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) body.append(buf, static_cast<size_t>(n));
  close(fd);
  return body;
}

// Polls `done` every 5 ms for up to 30 s; returns its last value. For tests that wait on what a
// server does instead of sleeping for a time that a loaded or instrumented machine may overrun.
template <typename Done>
bool Eventually(Done done) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!done() && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return done();
}

// common::Flags::Parse over `args` (without a program name), as a main would call it.
inline absl::StatusOr<common::Flags> ParseFlags(std::vector<std::string> args,
                                                const std::map<std::string, bool>& known) {
  std::string prog = "prog";
  std::vector<char*> argv{prog.data()};
  for (auto& a : args) argv.push_back(a.data());
  return common::Flags::Parse(static_cast<int>(argv.size()), argv.data(), 1, known);
}

}  // namespace moe::testing

#endif  // MOE_TESTS_REFERENCE_TEST_UTIL_H_
