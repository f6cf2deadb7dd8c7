#include "router/placement.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace moe::router {

absl::string_view StrategyName(Strategy s) {
  switch (s) {
    case Strategy::kReplicated: return "replicated";
    case Strategy::kSharded: return "sharded";
    case Strategy::kHybrid: return "hybrid";
    case Strategy::kDynamic: return "dynamic";
  }
  return "?";
}

const std::vector<std::string>& StrategyNames() {
  static const auto* names = new std::vector<std::string>{
      std::string(StrategyName(Strategy::kReplicated)), std::string(StrategyName(Strategy::kSharded)),
      std::string(StrategyName(Strategy::kHybrid)), std::string(StrategyName(Strategy::kDynamic))};
  return *names;
}

absl::StatusOr<Strategy> ParseStrategy(absl::string_view name) {
  for (Strategy s : {Strategy::kReplicated, Strategy::kSharded, Strategy::kHybrid, Strategy::kDynamic}) {
    if (name == StrategyName(s)) return s;
  }
  return absl::InvalidArgumentError(absl::StrCat("placement strategy '", name, "' is not one of ",
                                                 absl::StrJoin(StrategyNames(), ", ")));
}

std::vector<int> Placement::ExpertsOn(int shard) const {
  std::vector<int> out;
  for (size_t e = 0; e < replicas.size(); ++e) {
    if (Holds(shard, static_cast<int>(e))) out.push_back(static_cast<int>(e));
  }
  return out;
}

bool Placement::Holds(int shard, int expert) const {
  const auto& r = replicas[expert];
  return std::binary_search(r.begin(), r.end(), shard);
}

namespace {

int CeilDiv(int a, int b) { return (a + b - 1) / b; }

// `usable[s]`: whether shard s may hold replicas; U of the S shards are (U >= 1).
void Dynamic(Placement* p, int E, int S, const std::vector<double>& raw, int slots,
             const std::vector<bool>& usable, int U) {
  std::vector<double> load(raw.begin(), raw.end());
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  if (total <= 0) std::fill(load.begin(), load.end(), 1.0);
  const double sum = std::accumulate(load.begin(), load.end(), 0.0);
  const int budget = std::max(slots * U, E);
  // Replica counts proportional to load, at least 1 and at most U each.
  std::vector<int> count(E);
  for (int e = 0; e < E; ++e) {
    count[e] = std::clamp(static_cast<int>(std::lround(load[e] / sum * budget)), 1, U);
  }
  int used = std::accumulate(count.begin(), count.end(), 0);
  while (used > budget) {
    // Take a replica from the expert whose replicas carry the least load each.
    int best = -1;
    for (int e = 0; e < E; ++e) {
      if (count[e] > 1 && (best < 0 || load[e] / count[e] < load[best] / count[best])) best = e;
    }
    if (best < 0) break;
    --count[best];
    --used;
  }
  // Heaviest replica first onto the least-loaded shard without that expert and with a slot free.
  struct Rep {
    int expert;
    double load;
  };
  std::vector<Rep> reps;
  for (int e = 0; e < E; ++e) {
    for (int r = 0; r < count[e]; ++r) reps.push_back({e, load[e] / count[e]});
  }
  std::stable_sort(reps.begin(), reps.end(),
                   [](const Rep& a, const Rep& b) { return a.load > b.load; });
  std::vector<double> shard_load(S, 0.0);
  std::vector<int> shard_slots(S, 0);
  const int cap = std::max(slots, CeilDiv(E, U));
  for (const Rep& rep : reps) {
    int best = -1;
    for (int s = 0; s < S; ++s) {
      if (!usable[s] || p->Holds(s, rep.expert)) continue;
      const bool room = shard_slots[s] < cap;
      if (best < 0) {
        best = s;
        continue;
      }
      const bool best_room = shard_slots[best] < cap;
      if (room != best_room) {
        if (room) best = s;
      } else if (shard_load[s] < shard_load[best]) {
        best = s;
      }
    }
    if (best < 0) continue;  // every shard already holds it
    auto& r = p->replicas[rep.expert];
    r.insert(std::upper_bound(r.begin(), r.end(), best), best);
    shard_load[best] += rep.load;
    ++shard_slots[best];
  }
}

}  // namespace

absl::StatusOr<Placement> ComputePlacement(Strategy strategy, int E, int S,
                                           const std::vector<double>& load, int slots_per_shard,
                                           const std::vector<bool>& usable,
                                           const std::vector<bool>& drains) {
  if (E < 1) return absl::InvalidArgumentError("placement needs at least one expert");
  if (S < 1) return absl::UnavailableError("placement needs at least one shard");
  if (static_cast<int>(load.size()) != E) {
    return absl::InvalidArgumentError("placement: one load value per expert is needed");
  }
  if (!usable.empty() && static_cast<int>(usable.size()) != S) {
    return absl::InvalidArgumentError("placement: one usable flag per shard is needed");
  }
  if (!drains.empty() && static_cast<int>(drains.size()) != S) {
    return absl::InvalidArgumentError("placement: one drains flag per shard is needed");
  }
  Placement p;
  p.strategy = strategy;
  p.num_shards = S;
  p.replicas.assign(E, {});
  // The formula's positions: the shards that do not drain (all, where every one drains).
  std::vector<int> all;
  for (int s = 0; s < S; ++s) {
    if (drains.empty() || !drains[s]) all.push_back(s);
  }
  if (all.empty()) {
    all.resize(S);
    std::iota(all.begin(), all.end(), 0);
  }
  const int F = static_cast<int>(all.size());
  switch (strategy) {
    case Strategy::kReplicated:
      for (int e = 0; e < E; ++e) p.replicas[e] = all;
      break;
    case Strategy::kSharded: {
      const int block = CeilDiv(E, F);
      for (int e = 0; e < E; ++e) p.replicas[e] = {all[e / block]};
      break;
    }
    case Strategy::kHybrid: {
      const int h = E / 2, rest = E - h;
      const int block = CeilDiv(rest, F);
      for (int e = 0; e < h; ++e) p.replicas[e] = all;
      for (int e = h; e < E; ++e) p.replicas[e] = {all[(e - h) / block]};
      break;
    }
    case Strategy::kDynamic:
    {
      // With no shard usable (all down), place as if all were: nothing better is known.
      std::vector<bool> use = usable;
      int U = static_cast<int>(std::count(use.begin(), use.end(), true));
      if (use.empty() || U == 0) {
        use.assign(S, true);
        U = S;
      }
      Dynamic(&p, E, S, load, slots_per_shard > 0 ? slots_per_shard : CeilDiv(5 * E, 4 * U), use,
              U);
      break;
    }
  }
  return p;
}

namespace {
bool IsUsable(const std::vector<bool>& usable, int s) {
  return usable.empty() || (s < static_cast<int>(usable.size()) && usable[s]);
}
}  // namespace

std::vector<double> ShardLoads(const Placement& p, const std::vector<double>& load,
                               const std::vector<bool>& usable) {
  std::vector<double> out(p.num_shards, 0.0);
  for (size_t e = 0; e < p.replicas.size() && e < load.size(); ++e) {
    const auto& r = p.replicas[e];
    const auto live = std::count_if(r.begin(), r.end(), [&](int s) { return IsUsable(usable, s); });
    for (int s : r) {
      if (IsUsable(usable, s)) out[s] += load[e] / static_cast<double>(live);
    }
  }
  return out;
}

double Imbalance(const Placement& p, const std::vector<double>& load,
                 const std::vector<bool>& usable) {
  const std::vector<double> loads = ShardLoads(p, load, usable);
  double total = 0, most = 0;
  int counted = 0;
  for (int s = 0; s < static_cast<int>(loads.size()); ++s) {
    if (!IsUsable(usable, s)) continue;
    total += loads[s];
    most = std::max(most, loads[s]);
    ++counted;
  }
  if (counted == 0 || total <= 0) return 0.0;
  const double imbalance = most / (total / counted) - 1.0;
  // Equal loads come out as a rounding error (2.2e-16), not 0, which a gauge would show.
  return imbalance < 1e-9 ? 0.0 : imbalance;
}

}  // namespace moe::router
