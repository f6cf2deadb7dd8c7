#include "router/router_flags.h"

#include <string>
#include <vector>

#include "services/common/status_macros.h"

namespace moe::router {
namespace {

// Whether the flag, checked against `allowed`, holds `value`.
absl::StatusOr<bool> ChoiceIs(const common::Flags& f, const std::string& name,
                              const std::vector<std::string>& allowed, const std::string& def,
                              const std::string& value) {
  absl::StatusOr<std::string> v = f.GetChoice(name, allowed, def);
  if (!v.ok()) return v.status();
  return *v == value;
}

}  // namespace

absl::StatusOr<RouterChoices> ParseRouterChoices(const common::Flags& f) {
  const std::vector<std::string> overflows = {"drop", "spill"};
  const std::vector<std::string> wires = {"fp32", "bf16"};
  RouterChoices c;
  absl::StatusOr<std::string> placement = f.GetChoice("placement", StrategyNames(), "hybrid");
  if (!placement.ok()) return placement.status();
  ASSIGN_OR_RETURN(c.strategy, ParseStrategy(*placement));
  ASSIGN_OR_RETURN(c.spill, ChoiceIs(f, "overflow", overflows, "drop", "spill"));
  ASSIGN_OR_RETURN(c.bf16_rows, ChoiceIs(f, "wire", wires, "fp32", "bf16"));
  ASSIGN_OR_RETURN(c.bf16_allreduce, ChoiceIs(f, "allreduce-wire", wires, "fp32", "bf16"));
  return c;
}

}  // namespace moe::router
