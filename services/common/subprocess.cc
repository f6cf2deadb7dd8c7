#include "services/common/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <pthread.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moe::common {

absl::StatusOr<Subprocess> Subprocess::Spawn(const std::vector<std::string>& argv) {
  if (argv.empty()) return absl::InvalidArgumentError("no command");
  // Everything the child needs is built here, before fork: between fork and exec the child of a
  // multi-threaded parent may only make async-signal-safe calls. An allocation there can wait
  // forever on an allocator lock that another thread of the parent held at the fork (seen under
  // ASan: a restarted shard that never started, with the parent waiting for its port).
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const std::string exec_failed = absl::StrCat("cannot run ", argv[0], ": ");
  sigset_t unblocked;
  sigemptyset(&unblocked);
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return absl::InternalError("pipe failed");
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    const int err = errno;
    close(fds[0]);
    close(fds[1]);
    return absl::InternalError(absl::StrCat("fork failed: ", std::strerror(err)));
  }
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    dup2(fds[1], 1);
    // Unblock the signals a launcher may have blocked for sigwait.
    pthread_sigmask(SIG_SETMASK, &unblocked, nullptr);
    execvp(args[0], args.data());
    // strerrordesc_np reads a constant table: no locale, no allocation.
    const char* why = strerrordesc_np(errno);
    const struct iovec parts[] = {{const_cast<char*>(exec_failed.data()), exec_failed.size()},
                                  {const_cast<char*>(why), why ? std::strlen(why) : 0},
                                  {const_cast<char*>("\n"), 1}};
    [[maybe_unused]] const ssize_t written = writev(2, parts, 3);
    _exit(127);
  }
  close(fds[1]);
  Subprocess p;
  p.pid_ = pid;
  p.out_fd_ = fds[0];
  return p;
}

Subprocess::Subprocess(Subprocess&& o) noexcept
    : pid_(o.pid_),
      out_fd_(o.out_fd_),
      buffer_(std::move(o.buffer_)),
      reaped_(o.reaped_),
      wait_status_(o.wait_status_) {
  o.pid_ = -1;
  o.out_fd_ = -1;
}

Subprocess& Subprocess::operator=(Subprocess&& o) noexcept {
  if (this != &o) {
    Release();
    pid_ = o.pid_;
    out_fd_ = o.out_fd_;
    buffer_ = std::move(o.buffer_);
    reaped_ = o.reaped_;
    wait_status_ = o.wait_status_;
    o.pid_ = -1;
    o.out_fd_ = -1;
  }
  return *this;
}

Subprocess::~Subprocess() { Release(); }

void Subprocess::Release() {
  if (pid_ > 0 && !reaped_) {
    kill(pid_, SIGKILL);
    kill(pid_, SIGCONT);
    int st;
    waitpid(pid_, &st, 0);
  }
  if (out_fd_ >= 0) close(out_fd_);
  pid_ = -1;
  out_fd_ = -1;
}

absl::StatusOr<std::string> Subprocess::ReadLineWith(const std::string& needle,
                                                     absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    size_t nl;
    while ((nl = buffer_.find('\n')) != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      if (line.find(needle) != std::string::npos) return line;
    }
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) {
      return absl::DeadlineExceededError(absl::StrCat("no line with '", needle, "' in time"));
    }
    pollfd pfd{out_fd_, POLLIN, 0};
    if (poll(&pfd, 1, static_cast<int>(ms)) <= 0) continue;
    char buf[4096];
    const ssize_t n = read(out_fd_, buf, sizeof(buf));
    if (n <= 0) {
      return absl::UnavailableError(absl::StrCat("process ", pid_, " closed its output before '",
                                                 needle, "' (did it fail to start?)"));
    }
    buffer_.append(buf, static_cast<size_t>(n));
  }
}

absl::StatusOr<int> Subprocess::ReadListeningPort(absl::Duration timeout) {
  absl::StatusOr<std::string> line = ReadLineWith("listening on", timeout);
  if (!line.ok()) return line.status();
  const size_t at = line->find("listening on ");
  const size_t colon = line->find(':', at);
  if (colon == std::string::npos) return absl::InternalError("no port in: " + *line);
  return std::atoi(line->c_str() + colon + 1);
}

void Subprocess::Signal(int sig) const {
  if (pid_ > 0 && !reaped_) kill(pid_, sig);
}

bool Subprocess::Exited() {
  if (reaped_ || pid_ <= 0) return true;
  int st = 0;
  if (waitpid(pid_, &st, WNOHANG) == pid_) {
    reaped_ = true;
    wait_status_ = st;
  }
  return reaped_;
}

absl::StatusOr<int> Subprocess::Wait(absl::Duration timeout) {
  if (pid_ <= 0) return absl::FailedPreconditionError("no process was started");
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    if (Exited()) return wait_status_;
    if (absl::Now() > deadline) return absl::DeadlineExceededError("process still running");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::string DescribeWaitStatus(int wait_status) {
  if (WIFEXITED(wait_status)) return absl::StrCat("exited with status ", WEXITSTATUS(wait_status));
  if (WIFSIGNALED(wait_status)) {
    const int sig = WTERMSIG(wait_status);
    const char* name = sigabbrev_np(sig);  // "SEGV"; thread-safe, unlike strsignal
    return absl::StrCat("killed by signal ", sig,
                        name != nullptr ? absl::StrCat(" (SIG", name, ")") : "");
  }
  return absl::StrCat("ended with wait status ", wait_status);
}

}  // namespace moe::common
