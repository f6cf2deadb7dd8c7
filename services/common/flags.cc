#include "services/common/flags.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace moe::common {

namespace {
constexpr char kUsagePayload[] = "moe.dev/usage";
}  // namespace

absl::Status CheckTarget(absl::string_view flag, absl::string_view a, absl::string_view hint) {
  for (const char* s : {"unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:", "xds:"}) {
    if (absl::StartsWith(a, s)) return absl::OkStatus();
  }
  const size_t colon = a.rfind(':');
  const absl::string_view host = colon == absl::string_view::npos ? a : a.substr(0, colon);
  const absl::string_view port =
      colon == absl::string_view::npos ? absl::string_view() : a.substr(colon + 1);
  const bool bracketed = host.size() > 2 && host.front() == '[' && host.back() == ']';
  int value = 0;
  if (host.empty() || (absl::StrContains(host, ":") && !bracketed) || port.empty() ||
      port.size() > 5 || !absl::SimpleAtoi(port, &value) ||
      !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      value < 1 || value > 65535) {
    return UsageError(absl::StrCat("--", flag, " ", a,
                                   ": give HOST:PORT with a port in [1, 65535], an IPv6 host in "
                                   "brackets ([::1]:PORT)",
                                   hint.empty() ? "" : " ", hint));
  }
  return absl::OkStatus();
}

absl::Status UsageError(absl::string_view message) {
  absl::Status st = absl::InvalidArgumentError(message);
  st.SetPayload(kUsagePayload, absl::Cord("1"));
  return st;
}

bool IsUsageError(const absl::Status& status) {
  return status.code() == absl::StatusCode::kInvalidArgument &&
         status.GetPayload(kUsagePayload).has_value();
}

absl::StatusOr<Flags> Flags::Parse(int argc, char** argv, int first,
                                   const std::map<std::string, bool>& known) {
  Flags flags;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      return UsageError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    auto it = known.find(name);
    if (it == known.end()) {
      return UsageError(absl::StrCat("unknown flag --", name));
    }
    if (it->second && !has_value) {
      if (i + 1 >= argc) {
        return UsageError(absl::StrCat("flag --", name, " needs a value"));
      }
      value = argv[++i];
    } else if (!it->second && !has_value) {
      value = "true";
    }
    flags.values_[name] = value;  // given twice, the last one counts (as an override)
  }
  return flags;
}

std::string Flags::Get(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second;
}

absl::StatusOr<int64_t> Flags::GetInt(const std::string& name, int64_t def) const {
  if (!Has(name)) return def;
  int64_t v;
  if (!absl::SimpleAtoi(Get(name), &v)) {
    return UsageError(
        absl::StrCat("--", name, " must be an integer, got '", Get(name), "'"));
  }
  return v;
}

absl::StatusOr<int64_t> Flags::GetIntInRange(const std::string& name, int64_t def, int64_t min,
                                             int64_t max) const {
  absl::StatusOr<int64_t> v = GetInt(name, def);
  if (v.ok() && *v >= min && *v <= max) return v;
  // An integer that SimpleAtoi refused (a sign, then digits) is one past int64's range.
  const std::string text = Get(name);
  absl::string_view digits = text;
  if (!digits.empty() && (digits.front() == '-' || digits.front() == '+')) digits.remove_prefix(1);
  const bool integer = !digits.empty() && std::all_of(digits.begin(), digits.end(),
                                                      [](char c) { return c >= '0' && c <= '9'; });
  if (!v.ok() && !integer) return v;
  return UsageError(absl::StrCat("--", name, " must be in [", min, ", ", max, "]"));
}

absl::StatusOr<double> Flags::GetDouble(const std::string& name, double def) const {
  if (!Has(name)) return def;
  double v;
  if (!absl::SimpleAtod(Get(name), &v) || !std::isfinite(v)) {
    return UsageError(
        absl::StrCat("--", name, " must be a finite number, got '", Get(name), "'"));
  }
  return v;
}

absl::StatusOr<int64_t> Flags::GetPort(const std::string& name, int64_t def) const {
  absl::StatusOr<int64_t> v = GetInt(name, def);
  if (v.ok() && (*v < 0 || *v > 65535)) {
    return UsageError(
        absl::StrCat("--", name, " must be a port in [0, 65535] (0 picks a free one), got ", *v));
  }
  return v;
}

absl::StatusOr<std::string> Flags::Require(const std::string& name) const {
  if (!Has(name)) return UsageError(absl::StrCat("--", name, " is required"));
  if (Get(name).empty()) return UsageError(absl::StrCat("--", name, " is empty: give it a value"));
  return Get(name);
}

absl::StatusOr<std::string> Flags::GetChoice(const std::string& name,
                                             const std::vector<std::string>& allowed,
                                             const std::string& def) const {
  const std::string v = Get(name, def);
  if (std::find(allowed.begin(), allowed.end(), v) == allowed.end()) {
    return UsageError(
        absl::StrCat("--", name, " ", v, ": use one of ", absl::StrJoin(allowed, ", ")));
  }
  return v;
}

absl::Status Flags::ListenAddresses(int64_t default_port, std::string* address,
                                    std::string* metrics_address) const {
  const std::string host = Get("host", "0.0.0.0");
  absl::StatusOr<int64_t> port = GetPort("port", default_port);
  if (!port.ok()) return port.status();
  *address = absl::StrCat(host, ":", *port);
  if (Has("metrics-port")) {
    absl::StatusOr<int64_t> mp = GetPort("metrics-port", 0);
    if (!mp.ok()) return mp.status();
    *metrics_address = absl::StrCat(host, ":", *mp);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int>> Flags::GetIntList(const std::string& name) const {
  std::vector<int> out;
  const std::string v = Get(name);
  if (v.empty()) return out;
  for (absl::string_view part : absl::StrSplit(v, ',')) {
    int x;
    if (!absl::SimpleAtoi(part, &x)) {
      return UsageError(
          absl::StrCat("--", name, " must be a comma-separated list of integers, got '", v, "'"));
    }
    out.push_back(x);
  }
  return out;
}

}  // namespace moe::common
