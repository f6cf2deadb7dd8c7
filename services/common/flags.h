#ifndef MOE_SERVICES_COMMON_FLAGS_H_
#define MOE_SERVICES_COMMON_FLAGS_H_

// Command-line flags for every binary: --name value, --name=value, or --flag for booleans.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moe::common {

// An error in the command line itself (an unknown flag, a missing or malformed value, flags that
// exclude each other): INVALID_ARGUMENT, marked so that a main can tell it from an error about
// the data or the cluster, point to --help and exit 2 (RunMain; moe-client).
absl::Status UsageError(absl::string_view message);
bool IsUsageError(const absl::Status& status);
// `r`, with an INVALID_ARGUMENT made a UsageError (other errors pass): for a parser shared with
// data (an activation name read from a flag here, from a checkpoint's metadata elsewhere).
template <typename T>
absl::StatusOr<T> AsUsage(absl::StatusOr<T> r) {
  if (r.ok() || r.status().code() != absl::StatusCode::kInvalidArgument) return r;
  return UsageError(r.status().message());
}

// `value` of --`flag` as a gRPC target: HOST:PORT with a port in [1, 65535] and an IPv6 host in
// brackets ([::1]:PORT). gRPC took `127.0.0.1` without a port to mean another port, wrapped
// 99999 round to another port, and read `::1:50051` as a host without a port. Targets in
// gRPC's other forms (unix:PATH, dns:///HOST:PORT, ipv4:..., and so on) pass as they are. A
// usage error otherwise, ending with `hint` (where the right value can be found).
absl::Status CheckTarget(absl::string_view flag, absl::string_view value,
                         absl::string_view hint = "");

class Flags {
 public:
  // `known` maps each accepted flag to whether it takes a value. Unknown flags and stray
  // arguments are INVALID_ARGUMENT naming them. A flag given twice takes the last value, so that
  // a launcher (or a manifest) can append an override to its defaults.
  static absl::StatusOr<Flags> Parse(int argc, char** argv, int first,
                                     const std::map<std::string, bool>& known);
  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::string Get(const std::string& name, const std::string& def = "") const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t def) const;
  // An integer in [min, max] (`def` when absent); any other integer, one past int64's range too,
  // is the usage error "--NAME must be in [MIN, MAX]".
  absl::StatusOr<int64_t> GetIntInRange(const std::string& name, int64_t def, int64_t min,
                                        int64_t max) const;
  // A finite number: "nan" and "inf" are refused.
  absl::StatusOr<double> GetDouble(const std::string& name, double def) const;
  // An integer in [0, 65535].
  absl::StatusOr<int64_t> GetPort(const std::string& name, int64_t def) const;
  absl::StatusOr<std::string> Require(const std::string& name) const;
  // One of `allowed` (`def` when absent); anything else is INVALID_ARGUMENT listing them.
  absl::StatusOr<std::string> GetChoice(const std::string& name,
                                        const std::vector<std::string>& allowed,
                                        const std::string& def) const;
  // --host (default 0.0.0.0) with --port (default `default_port`) as `address`, and, when
  // --metrics-port is given, --host with it as `metrics_address`.
  absl::Status ListenAddresses(int64_t default_port, std::string* address,
                               std::string* metrics_address) const;
  // A comma-separated list of integers; "" is empty.
  absl::StatusOr<std::vector<int>> GetIntList(const std::string& name) const;

 private:
  std::map<std::string, std::string> values_;
};

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_FLAGS_H_
