#include "client/cli_util.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/string_view.h"


namespace moe::client {

void PrintTable(const std::vector<std::string>& header,
                const std::vector<std::vector<std::string>>& rows,
                const std::vector<size_t>& text_columns) {
  std::vector<size_t> width(header.size());
  for (size_t c = 0; c < header.size(); ++c) width[c] = header[c].size();
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size() && c < width.size(); ++c) {
      width[c] = std::max(width[c], r[c].size());
    }
  }
  // A column of numbers ("-", "- (why)" and "" count as numbers, a trailing x or % is allowed) is
  // right-aligned; the first column and columns of text are left-aligned, so that a long
  // message in one row does not push the others' cells to the right.
  std::vector<bool> numeric(width.size(), true);
  if (!numeric.empty()) numeric[0] = false;
  for (size_t c : text_columns) {
    if (c < numeric.size()) numeric[c] = false;
  }
  for (const auto& r : rows) {
    for (size_t c = 1; c < r.size() && c < width.size(); ++c) {
      absl::string_view v = r[c];
      // "- (drains)": no number, with why (placement's expected load of a shard out of rotation).
      if (v.empty() || v == "-" || absl::StartsWith(v, "- (")) continue;
      if (absl::EndsWith(v, "x") || absl::EndsWith(v, "%")) v.remove_suffix(1);
      double unused;
      numeric[c] = numeric[c] && absl::SimpleAtod(v, &unused);
    }
  }
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (size_t c = 0; c < width.size(); ++c) {
      const std::string cell = c < cells.size() ? cells[c] : "";
      if (c > 0) out += "  ";
      if (numeric[c]) out += std::string(width[c] - cell.size(), ' ') + cell;
      else out += cell + std::string(width[c] - cell.size(), ' ');
    }
    out.erase(out.find_last_not_of(' ') + 1);  // no trailing blanks
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

void Progress::Note(const std::string& line) {
  std::fprintf(stderr, "%s%s\n", tty_ ? "\r\033[K" : "", line.c_str());
  std::fflush(stderr);
}

void Progress::Finish() {
  if (tty_) std::fprintf(stderr, "\n");
}

}  // namespace moe::client
