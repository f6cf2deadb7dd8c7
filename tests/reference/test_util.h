#ifndef MOE_TESTS_REFERENCE_TEST_UTIL_H_
#define MOE_TESTS_REFERENCE_TEST_UTIL_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include <gtest/gtest.h>

namespace moe::testing {

// A path in the test temp directory that no other test process uses (ctest runs in parallel).
inline std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/moe_" + std::to_string(getpid()) + "_" + name;
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

}  // namespace moe::testing

#endif  // MOE_TESTS_REFERENCE_TEST_UTIL_H_
