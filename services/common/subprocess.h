#ifndef MOE_SERVICES_COMMON_SUBPROCESS_H_
#define MOE_SERVICES_COMMON_SUBPROCESS_H_

// Child processes for the cluster launcher and the multi-process tests: spawn with stdout piped,
// read the line a service prints when it listens, signal, wait. Children get SIGTERM when the
// parent dies.

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace moe::common {

class Subprocess {
 public:
  // Starts `argv[0]` (searched in PATH when it has no slash) with `argv`; stdout is piped
  // (stderr inherited).
  static absl::StatusOr<Subprocess> Spawn(const std::vector<std::string>& argv);
  Subprocess() = default;
  Subprocess(Subprocess&& other) noexcept;
  Subprocess& operator=(Subprocess&& other) noexcept;
  ~Subprocess();  // SIGKILLs and reaps a child still running

  // Reads stdout until a line containing `needle`; returns that line.
  absl::StatusOr<std::string> ReadLineWith(const std::string& needle, absl::Duration timeout);
  // The port in "... listening on HOST:PORT ..." printed by the moe services.
  absl::StatusOr<int> ReadListeningPort(absl::Duration timeout);

  void Signal(int sig) const;
  // Waits for exit; returns the wait status (also when reaped before), or DEADLINE_EXCEEDED.
  absl::StatusOr<int> Wait(absl::Duration timeout);
  // True when the child has exited (reaps it and keeps its wait status for Wait).
  bool Exited();
  pid_t pid() const { return pid_; }

 private:
  void Release();  // SIGKILLs and reaps a child still running, closes the pipe
  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string buffer_;
  bool reaped_ = false;
  int wait_status_ = 0;
};

// "exited with status 1", "killed by signal 9 (SIGKILL)".
std::string DescribeWaitStatus(int wait_status);

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_SUBPROCESS_H_
