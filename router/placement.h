#ifndef MOE_ROUTER_PLACEMENT_H_
#define MOE_ROUTER_PLACEMENT_H_

// Expert placement over S shards (DESIGN.md "Placement"). Pure logic, no gRPC.
//   replicated: every expert on every shard.
//   sharded:    expert e on shard floor(e / ceil(E/S)).
//   hybrid:     experts 0 .. floor(E/2)-1 on every shard, the rest block-sharded.
//   dynamic:    replica counts proportional to load within a per-shard slot budget (every expert
//               at least one), then replicas placed heaviest-first onto the least-loaded shard
//               that does not hold that expert and has a free slot.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moe::router {

enum class Strategy { kReplicated, kSharded, kHybrid, kDynamic };

absl::string_view StrategyName(Strategy s);
// The strategies' names, in the order of `Strategy`.
const std::vector<std::string>& StrategyNames();
absl::StatusOr<Strategy> ParseStrategy(absl::string_view name);

struct Placement {
  uint64_t version = 0;
  Strategy strategy = Strategy::kHybrid;
  int num_shards = 0;
  std::vector<std::vector<int>> replicas;  // per expert: shard indexes, ascending

  // Experts hosted by `shard`.
  std::vector<int> ExpertsOn(int shard) const;
  bool Holds(int shard, int expert) const;
};

// `slots_per_shard` bounds how many experts one shard may host under `dynamic`; 0 picks
// ceil(5 E / 4 S): one replica of every expert and a quarter more for the hot ones. `load` is
// per-expert tokens per batch (any scale; all zero means uniform). `usable` (empty: every
// shard) marks the shards `dynamic` may place on: those in rotation, so that a rebalance never
// moves load onto a shard that is down, and moves it off one. The fixed strategies ignore it.
// ceil(5 E / 4 S) then counts the usable shards only. `drains` (empty: none) marks shards that
// drain and hold nothing: they will not serve again, so the fixed strategies' formula runs over
// the others (position i on the i-th shard that does not drain; over every shard where all
// drain). A shard that is down keeps its position: it comes back.
absl::StatusOr<Placement> ComputePlacement(Strategy strategy, int num_experts, int num_shards,
                                           const std::vector<double>& load, int slots_per_shard = 0,
                                           const std::vector<bool>& usable = {},
                                           const std::vector<bool>& drains = {});

// Expected load per shard when each expert's load is split evenly over its replicas on the
// `usable` shards (empty: every shard): a shard out of rotation carries none, and an expert
// with no usable replica is counted nowhere.
std::vector<double> ShardLoads(const Placement& p, const std::vector<double>& load,
                               const std::vector<bool>& usable = {});

// max/mean - 1 of ShardLoads over the usable shards; 0 when there is no load. A shard that is
// down is left out of the mean: counted as an idle shard, it made a balanced cluster look
// imbalanced, and `dynamic` rebalanced for nothing.
double Imbalance(const Placement& p, const std::vector<double>& load,
                 const std::vector<bool>& usable = {});

}  // namespace moe::router

#endif  // MOE_ROUTER_PLACEMENT_H_
