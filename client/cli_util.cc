#include "client/cli_util.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moe::client {

absl::StatusOr<Flags> Flags::Parse(int argc, char** argv, int first,
                                   const std::map<std::string, bool>& known) {
  Flags flags;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
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
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    if (it->second && !has_value) {
      if (i + 1 >= argc) {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      }
      value = argv[++i];
    } else if (!it->second && !has_value) {
      value = "true";
    }
    flags.values_[name] = value;
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
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be an integer, got '", Get(name), "'"));
  }
  return v;
}

absl::StatusOr<double> Flags::GetDouble(const std::string& name, double def) const {
  if (!Has(name)) return def;
  double v;
  if (!absl::SimpleAtod(Get(name), &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be a number, got '", Get(name), "'"));
  }
  return v;
}

absl::StatusOr<std::string> Flags::Require(const std::string& name) const {
  if (!Has(name)) return absl::InvalidArgumentError(absl::StrCat("--", name, " is required"));
  return Get(name);
}

void PrintTable(const std::vector<std::string>& header,
                const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width(header.size());
  for (size_t c = 0; c < header.size(); ++c) width[c] = header[c].size();
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size() && c < width.size(); ++c) {
      width[c] = std::max(width[c], r[c].size());
    }
  }
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (size_t c = 0; c < width.size(); ++c) {
      const std::string cell = c < cells.size() ? cells[c] : "";
      if (c > 0) out += "  ";
      // First column left-aligned, numbers right-aligned.
      if (c == 0) out += cell + std::string(width[c] - cell.size(), ' ');
      else out += std::string(width[c] - cell.size(), ' ') + cell;
    }
    std::printf("%s\n", out.c_str());
  };
  line(header);
  size_t total = 0;
  for (size_t w : width) total += w;
  std::printf("%s\n", std::string(total + 2 * (width.size() - 1), '-').c_str());
  for (const auto& r : rows) line(r);
  std::fflush(stdout);
}

Progress::Progress(std::string label, int64_t total)
    : label_(std::move(label)), total_(std::max<int64_t>(total, 1)), tty_(isatty(2) != 0) {}

void Progress::Update(int64_t done, const std::string& extra) {
  const int64_t percent = std::min<int64_t>(100, done * 100 / total_);
  if (!tty_ && percent / 10 == last_percent_ / 10) return;
  last_percent_ = percent;
  constexpr int kWidth = 30;
  const int filled = static_cast<int>(percent * kWidth / 100);
  std::fprintf(stderr, "%s%s [%s%s] %3lld%% %s%s", tty_ ? "\r" : "", label_.c_str(),
               std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
               static_cast<long long>(percent), extra.c_str(), tty_ ? "\033[K" : "\n");
  std::fflush(stderr);
}

void Progress::Finish() {
  if (tty_) std::fprintf(stderr, "\n");
}

}  // namespace moe::client
