#include "client/cpu_limit.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moe::client {
namespace {

constexpr char kV1[] = "/sys/fs/cgroup/cpu";
constexpr char kV2[] = "/sys/fs/cgroup";
constexpr int kPeriodUs = 10000;  // short periods: a throttled shard waits at most ~10 ms

bool Exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

absl::Status Write(const std::string& path, const std::string& value) {
  std::ofstream f(path);
  f << value;
  f.flush();
  if (!f) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot write ", value, " to ", path, ": ", std::strerror(errno)));
  }
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
  if (!(cpus >= 0.01) || !std::isfinite(cpus)) {
    return absl::InvalidArgumentError("a CPU limit must be at least 0.01 CPUs");
  }
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
  const int quota_us = static_cast<int>(std::lround(cpus * kPeriodUs));
  for (int i = 0; i < count; ++i) {
    const std::string dir = absl::StrCat(base, "/moe-cluster-", getpid(), "-", i);
    if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::PermissionDeniedError(absl::StrCat("cannot make the cgroup ", dir, ": ",
                                                      std::strerror(errno), " (run as root)"));
    }
    out.dirs_.push_back(dir);
    if (out.v2_) {
      absl::Status st = Write(dir + "/cpu.max", absl::StrCat(quota_us, " ", kPeriodUs));
      if (!st.ok()) return st;
    } else {
      absl::Status st = Write(dir + "/cpu.cfs_period_us", std::to_string(kPeriodUs));
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
  for (const std::string& d : dirs_) rmdir(d.c_str());
  dirs_.clear();
}

std::vector<std::string> CpuLimits::Wrapper(int i) const {
  return {"/bin/sh", "-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"", dirs_[i]};
}

}  // namespace moe::client
