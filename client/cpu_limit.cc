#include "client/cpu_limit.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moe::client {
namespace {

constexpr char kV1[] = "/sys/fs/cgroup/cpu";
constexpr char kV2[] = "/sys/fs/cgroup";
constexpr int64_t kPeriodUs = 10000;  // short periods: a throttled shard waits at most ~10 ms

bool Exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

// The status for a failed cgroup call: permission problems say how to get past them.
absl::Status CgroupError(const std::string& what, int err) {
  const std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  if (err == EACCES || err == EPERM) {
    return absl::PermissionDeniedError(absl::StrCat(msg, " (CPU limits need root)"));
  }
  return absl::FailedPreconditionError(msg);
}

absl::Status Write(const std::string& path, const std::string& value) {
  std::ofstream f(path);
  f << value;
  f.flush();
  if (!f) return CgroupError(absl::StrCat("cannot write ", value, " to ", path), errno);
  return absl::OkStatus();
}

bool V2HasCpu() {
  std::ifstream f(std::string(kV2) + "/cgroup.controllers");
  std::string word;
  while (f >> word) {
    if (word == "cpu") return true;
  }
  return false;
}

}  // namespace

absl::StatusOr<CpuLimits> CpuLimits::Create(int count, double cpus) {
  const double cores = std::max(1u, std::thread::hardware_concurrency());
  if (!std::isfinite(cpus) || cpus < 0.01 || cpus > cores) {
    return absl::InvalidArgumentError(
        absl::StrCat("a CPU limit must be between 0.01 and ", cores, " CPUs (this machine's)"));
  }
  // The kernel takes quotas of at least 1 ms: small limits get a longer period.
  const int64_t period_us = std::max<int64_t>(kPeriodUs, std::llround(std::ceil(1000 / cpus)));
  const int64_t quota_us = std::llround(cpus * static_cast<double>(period_us));
  CpuLimits out;
  std::string base;
  if (Exists(std::string(kV1) + "/cpu.cfs_quota_us")) {
    base = kV1;
  } else if (V2HasCpu()) {
    base = kV2;
    out.v2_ = true;
    absl::Status st = Write(base + "/cgroup.subtree_control", "+cpu");
    if (!st.ok()) return st;
  } else {
    return absl::FailedPreconditionError(
        "no cgroup cpu controller under /sys/fs/cgroup (CPU limits need cgroup v1's cpu or v2's)");
  }
  for (int i = 0; i < count; ++i) {
    const std::string dir = absl::StrCat(base, "/moe-cluster-", getpid(), "-", i);
    // EEXIST: left by an earlier process of the same id; it is ours by name now.
    if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      return CgroupError(absl::StrCat("cannot make the cgroup ", dir), errno);
    }
    out.dirs_.push_back(dir);
    if (out.v2_) {
      absl::Status st = Write(dir + "/cpu.max", absl::StrCat(quota_us, " ", period_us));
      if (!st.ok()) return st;
    } else {
      absl::Status st = Write(dir + "/cpu.cfs_period_us", std::to_string(period_us));
      if (st.ok()) st = Write(dir + "/cpu.cfs_quota_us", std::to_string(quota_us));
      if (!st.ok()) return st;
    }
  }
  return out;
}

CpuLimits::CpuLimits(CpuLimits&& other) noexcept : v2_(other.v2_), dirs_(std::move(other.dirs_)) {
  other.dirs_.clear();
}

CpuLimits& CpuLimits::operator=(CpuLimits&& other) noexcept {
  if (this != &other) {
    Remove();
    v2_ = other.v2_;
    dirs_ = std::move(other.dirs_);
    other.dirs_.clear();
  }
  return *this;
}

CpuLimits::~CpuLimits() { Remove(); }

void CpuLimits::Remove() {
  for (const std::string& d : dirs_) {
    if (rmdir(d.c_str()) != 0) {
      std::fprintf(stderr, "moe-cluster: could not remove the cgroup %s: %s (remove it by hand)\n",
                   d.c_str(), std::strerror(errno));
    }
  }
  dirs_.clear();
}

std::vector<std::string> CgroupWrapper(const std::string& dir) {
  return {"/bin/sh", "-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"", dir};
}

}  // namespace moe::client
