#ifndef MOE_CLIENT_CLI_UTIL_H_
#define MOE_CLIENT_CLI_UTIL_H_

// Small pieces the command-line tools share: flag parsing, tables, progress, errors.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moe::client {

// --name value / --name=value / --flag. Unknown flags are an error naming them.
class Flags {
 public:
  // `known` maps each accepted flag to whether it takes a value.
  static absl::StatusOr<Flags> Parse(int argc, char** argv, int first,
                                     const std::map<std::string, bool>& known);
  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::string Get(const std::string& name, const std::string& def = "") const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t def) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double def) const;
  absl::StatusOr<std::string> Require(const std::string& name) const;

 private:
  std::map<std::string, std::string> values_;
};

// Prints rows as an aligned text table with a header rule.
void PrintTable(const std::vector<std::string>& header,
                const std::vector<std::vector<std::string>>& rows);

// A one-line progress bar on stderr, redrawn in place when stderr is a terminal.
class Progress {
 public:
  Progress(std::string label, int64_t total);
  void Update(int64_t done, const std::string& extra = "");
  void Finish();

 private:
  std::string label_;
  int64_t total_;
  bool tty_;
  int64_t last_percent_ = -1;
};

}  // namespace moe::client

#endif  // MOE_CLIENT_CLI_UTIL_H_
