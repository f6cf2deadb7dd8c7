#ifndef MOE_TESTS_FAULT_DELAY_PROXY_H_
#define MOE_TESTS_FAULT_DELAY_PROXY_H_

// A TCP proxy on 127.0.0.1 that delays every byte by a fixed time in each direction: the delayed
// link of the fault tests (this kernel has no tc netem). Each connection gets a reader and a
// writer thread per direction; bytes are forwarded once `delay` has passed since they were read.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace moe::testing {

class DelayProxy {
 public:
  DelayProxy(int upstream_port, std::chrono::milliseconds delay)
      : upstream_port_(upstream_port), delay_(delay) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        listen(listen_fd_, 16) != 0) {
      return;
    }
    socklen_t len = sizeof(a);
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }

  ~DelayProxy() {
    stop_ = true;
    shutdown(listen_fd_, SHUT_RDWR);
    if (acceptor_.joinable()) acceptor_.join();  // no connection is added after this
    close(listen_fd_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int fd : fds_) shutdown(fd, SHUT_RDWR);
      for (auto& d : directions_) {
        std::lock_guard<std::mutex> l(d->mu);
        d->closed = true;
        d->cv.notify_all();
      }
    }
    for (auto& t : threads_) t.join();
    for (int fd : fds_) close(fd);
  }

  int port() const { return port_; }  // 0: could not listen
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  struct Direction {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::pair<std::chrono::steady_clock::time_point, std::string>> queue;
    bool closed = false;
  };

  void AcceptLoop() {
    while (!stop_) {
      const int client = accept(listen_fd_, nullptr, nullptr);
      if (client < 0) return;
      const int server = socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      a.sin_port = htons(static_cast<uint16_t>(upstream_port_));
      if (connect(server, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
        close(client);
        close(server);
        continue;
      }
      int one = 1;
      setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) {
        close(client);
        close(server);
        return;
      }
      fds_.push_back(client);
      fds_.push_back(server);
      Forward(client, server);
      Forward(server, client);
    }
  }

  // Bytes read from `from` are written to `to` `delay_` later. Called with mu_ held.
  void Forward(int from, int to) {
    directions_.push_back(std::make_unique<Direction>());
    Direction* d = directions_.back().get();
    threads_.emplace_back([this, from, to, d] {
      char buf[1 << 16];
      while (true) {
        const ssize_t n = read(from, buf, sizeof(buf));
        std::lock_guard<std::mutex> l(d->mu);
        if (n <= 0) {
          d->closed = true;
          d->cv.notify_all();
          return;
        }
        d->queue.emplace_back(std::chrono::steady_clock::now() + delay_, std::string(buf, n));
        d->cv.notify_all();
      }
    });
    threads_.emplace_back([from, to, d] {
      std::unique_lock<std::mutex> l(d->mu);
      while (true) {
        d->cv.wait(l, [d] { return d->closed || !d->queue.empty(); });
        if (d->queue.empty()) break;
        const auto due = d->queue.front().first;
        if (std::chrono::steady_clock::now() < due) {
          d->cv.wait_until(l, due);
          continue;
        }
        std::string chunk = std::move(d->queue.front().second);
        d->queue.pop_front();
        l.unlock();
        size_t off = 0;
        while (off < chunk.size()) {
          const ssize_t w = send(to, chunk.data() + off, chunk.size() - off, MSG_NOSIGNAL);
          if (w <= 0) break;
          off += static_cast<size_t>(w);
        }
        l.lock();
      }
      shutdown(to, SHUT_WR);
      shutdown(from, SHUT_RD);
    });
  }

  const int upstream_port_;
  const std::chrono::milliseconds delay_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::unique_ptr<Direction>> directions_;
  std::thread acceptor_;
  std::vector<std::thread> threads_;
};

}  // namespace moe::testing

#endif  // MOE_TESTS_FAULT_DELAY_PROXY_H_
