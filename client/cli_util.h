#ifndef MOE_CLIENT_CLI_UTIL_H_
#define MOE_CLIENT_CLI_UTIL_H_

// Small pieces the command-line tools share: tables and progress.

#include <cstdint>
#include <string>
#include <vector>


namespace moe::client {

// Prints rows as an aligned text table with a header rule. Columns of numbers are
// right-aligned, others left-aligned; `text_columns` are left-aligned whatever they hold (a
// list such as "0,2" that may happen to be one number in every row).
void PrintTable(const std::vector<std::string>& header,
                const std::vector<std::vector<std::string>>& rows,
                const std::vector<size_t>& text_columns = {});

// A one-line progress bar on stderr, redrawn in place when stderr is a terminal.
class Progress {
 public:
  Progress(std::string label, int64_t total);
  void Update(int64_t done, const std::string& extra = "");
  // A line of its own above the bar (which is drawn again at the next Update).
  void Note(const std::string& line);
  void Finish();

 private:
  std::string label_;
  int64_t total_;
  bool tty_;
  int64_t last_percent_ = -10;  // so that the first Update draws (0 %), also when not a terminal
};

}  // namespace moe::client

#endif  // MOE_CLIENT_CLI_UTIL_H_
