#ifndef MOE_CLIENT_CPU_LIMIT_H_
#define MOE_CLIENT_CPU_LIMIT_H_

// CPU quotas for the processes of a local cluster: each limit is a cgroup of its own (the cpu
// controller of cgroup v1, or cgroup v2 where the cpu controller is there) whose CFS bandwidth is
// `cpus` CPUs, so a shard behaves like a machine of that size: it cannot borrow a neighbour's
// idle time, as shards pinned two to a core can. Needs root (or a delegated cgroup).

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moe::client {

// Prefix for a command line that runs it in the cgroup directory `dir` (any controller): the
// shell moves itself into the cgroup, then execs the command.
std::vector<std::string> CgroupWrapper(const std::string& dir);

class CpuLimits {
 public:
  // Makes `count` cgroups of `cpus` CPUs each (0.01 up to the machine's CPUs; CFS period 10 ms,
  // longer under 0.1 CPUs since quotas start at 1 ms), named after this process.
  static absl::StatusOr<CpuLimits> Create(int count, double cpus);
  CpuLimits() = default;
  CpuLimits(CpuLimits&& other) noexcept;
  CpuLimits& operator=(CpuLimits&& other) noexcept;
  ~CpuLimits();  // removes the cgroups (they must be empty by then: stop the processes first)

  // CgroupWrapper of limit i.
  std::vector<std::string> Wrapper(int i) const { return CgroupWrapper(dirs_[i]); }

 private:
  void Remove();
  bool v2_ = false;
  std::vector<std::string> dirs_;
};

}  // namespace moe::client

#endif  // MOE_CLIENT_CPU_LIMIT_H_
