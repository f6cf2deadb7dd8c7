#include "router/placement.h"

#include <numeric>

#include <gtest/gtest.h>

#include "router/load_stats.h"

namespace moe::router {
namespace {

std::vector<double> Uniform(int e) { return std::vector<double>(e, 1.0); }

// The live load is an exponential moving average: the first batch as it is, then
// ema = 0.9 ema + 0.1 x per expert, against the same recurrence written out.
TEST(LoadStats, IsAnExponentialMovingAverageOfEachExpertsAssignments) {
  LoadStats stats(3);
  EXPECT_EQ(stats.batches(), 0);
  EXPECT_EQ(stats.Load(), (std::vector<double>{0, 0, 0}));
  const std::vector<std::vector<int64_t>> batches = {{10, 0, 4}, {0, 20, 4}, {5, 5, 4}, {7}};
  std::vector<double> want(3, 0.0);
  for (size_t b = 0; b < batches.size(); ++b) {
    stats.Record(batches[b]);
    for (size_t e = 0; e < batches[b].size(); ++e) {
      const double x = static_cast<double>(batches[b][e]);
      want[e] = b == 0 ? x : 0.9 * want[e] + 0.1 * x;
    }
    const std::vector<double> got = stats.Load();
    for (size_t e = 0; e < 3; ++e) EXPECT_NEAR(got[e], want[e], 1e-12) << b << " " << e;
  }
  EXPECT_EQ(stats.batches(), 4);
  EXPECT_NEAR(stats.Load()[2], 4.0, 1e-12);  // a steady load stays where it is
}

TEST(Placement, Replicated) {
  auto p = ComputePlacement(Strategy::kReplicated, 5, 3, Uniform(5));
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(p->replicas.size(), 5u);
  for (const auto& r : p->replicas) EXPECT_EQ(r, (std::vector<int>{0, 1, 2}));
}

TEST(Placement, ShardedIsContiguousBlocks) {
  // E = 10, S = 4: ceil(10/4) = 3 -> shards 0,0,0,1,1,1,2,2,2,3.
  auto p = ComputePlacement(Strategy::kSharded, 10, 4, Uniform(10));
  ASSERT_TRUE(p.ok());
  const std::vector<int> want = {0, 0, 0, 1, 1, 1, 2, 2, 2, 3};
  for (int e = 0; e < 10; ++e) EXPECT_EQ(p->replicas[e], std::vector<int>{want[e]}) << e;
  EXPECT_EQ(p->ExpertsOn(1), (std::vector<int>{3, 4, 5}));
}

TEST(Placement, HybridReplicatesTheFirstHalf) {
  // E = 9: experts 0..3 everywhere; the other 5 block-sharded over 2 shards (block 3).
  auto p = ComputePlacement(Strategy::kHybrid, 9, 2, Uniform(9));
  ASSERT_TRUE(p.ok());
  for (int e = 0; e < 4; ++e) EXPECT_EQ(p->replicas[e], (std::vector<int>{0, 1}));
  const std::vector<int> want = {0, 0, 0, 1, 1};
  for (int e = 4; e < 9; ++e) EXPECT_EQ(p->replicas[e], std::vector<int>{want[e - 4]}) << e;
}

TEST(Placement, MoreShardsThanExperts) {
  auto p = ComputePlacement(Strategy::kSharded, 2, 5, Uniform(2));
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->replicas[0], std::vector<int>{0});
  EXPECT_EQ(p->replicas[1], std::vector<int>{1});
  EXPECT_TRUE(p->ExpertsOn(4).empty());
}

TEST(Placement, DynamicReplicatesHotExpertsWithinBudget) {
  // Zipf-like load over 16 experts, 4 shards, 6 slots each.
  std::vector<double> load(16);
  for (int e = 0; e < 16; ++e) load[e] = 100.0 / (e + 1);
  auto p = ComputePlacement(Strategy::kDynamic, 16, 4, load, 6);
  ASSERT_TRUE(p.ok());
  int total = 0;
  for (int e = 0; e < 16; ++e) {
    EXPECT_GE(p->replicas[e].size(), 1u) << e;
    total += static_cast<int>(p->replicas[e].size());
  }
  EXPECT_LE(total, 24);
  for (int s = 0; s < 4; ++s) EXPECT_LE(p->ExpertsOn(s).size(), 6u);
  EXPECT_GE(p->replicas[0].size(), p->replicas[15].size());
  EXPECT_GT(p->replicas[0].size(), 1u);
  // Much better balanced than hybrid under the same load.
  auto hybrid = ComputePlacement(Strategy::kHybrid, 16, 4, load);
  EXPECT_LT(Imbalance(*p, load), 0.2);
  EXPECT_GT(Imbalance(*hybrid, load), Imbalance(*p, load));
}

TEST(Placement, DynamicWithNoLoadIsStillComplete) {
  auto p = ComputePlacement(Strategy::kDynamic, 7, 3, std::vector<double>(7, 0.0));
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(p->replicas.size(), 7u);
  for (const auto& r : p->replicas) EXPECT_FALSE(r.empty());
}

// A shard out of rotation gets no replica from dynamic placement: every expert lands on the
// shards in rotation, within the slot budget they have between them.
TEST(Placement, DynamicPlacesNothingOnShardsOutOfRotation) {
  std::vector<double> load(16);
  for (int e = 0; e < 16; ++e) load[e] = 100.0 / (e + 1);
  const std::vector<bool> usable = {true, false, true, true};
  auto p = ComputePlacement(Strategy::kDynamic, 16, 4, load, 7, usable);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->num_shards, 4);
  EXPECT_TRUE(p->ExpertsOn(1).empty());
  int total = 0;
  for (int e = 0; e < 16; ++e) {
    EXPECT_GE(p->replicas[e].size(), 1u) << e;
    EXPECT_LE(p->replicas[e].size(), 3u) << e;
    total += static_cast<int>(p->replicas[e].size());
  }
  EXPECT_LE(total, 3 * 7);
  for (int s : {0, 2, 3}) EXPECT_LE(p->ExpertsOn(s).size(), 7u) << s;
  EXPECT_GT(p->replicas[0].size(), 1u);  // the hot expert is still replicated
  // The default budget counts the usable shards: ceil(5 * 16 / (4 * 3)) = 7 each.
  auto d = ComputePlacement(Strategy::kDynamic, 16, 4, load, 0, usable);
  ASSERT_TRUE(d.ok());
  EXPECT_TRUE(d->ExpertsOn(1).empty());
  for (int s : {0, 2, 3}) EXPECT_LE(d->ExpertsOn(s).size(), 7u) << s;
  // No shard usable: placed over all of them (nothing better is known); the fixed strategies
  // ignore the flags; a wrong number of flags is refused.
  auto none = ComputePlacement(Strategy::kDynamic, 16, 4, load, 0, {false, false, false, false});
  ASSERT_TRUE(none.ok());
  for (int s = 0; s < 4; ++s) EXPECT_FALSE(none->ExpertsOn(s).empty()) << s;
  auto sharded = ComputePlacement(Strategy::kSharded, 16, 4, load, 0, usable);
  ASSERT_TRUE(sharded.ok());
  EXPECT_EQ(sharded->ExpertsOn(1), (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(ComputePlacement(Strategy::kDynamic, 16, 4, load, 0, {true}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A shard that drains (and holds nothing) will not serve again: the fixed formulas run over
// the others, position i on the i-th shard that does not drain. Where every shard drains, over
// all of them.
TEST(Placement, FixedFormulasRunOverTheShardsThatDoNotDrain) {
  const std::vector<bool> one = {false, true, false};
  auto h = ComputePlacement(Strategy::kHybrid, 8, 3, Uniform(8), 0, {}, one);
  ASSERT_TRUE(h.ok()) << h.status();
  // Experts 0-3 on shards 0 and 2; 4-7 in blocks of 2 over them.
  const std::vector<std::vector<int>> want_h = {{0, 2}, {0, 2}, {0, 2}, {0, 2}, {0}, {0}, {2}, {2}};
  EXPECT_EQ(h->replicas, want_h);
  EXPECT_TRUE(h->ExpertsOn(1).empty());
  auto s = ComputePlacement(Strategy::kSharded, 5, 3, Uniform(5), 0, {}, one);
  ASSERT_TRUE(s.ok());
  const std::vector<std::vector<int>> want_s = {{0}, {0}, {0}, {2}, {2}};
  EXPECT_EQ(s->replicas, want_s);
  auto r = ComputePlacement(Strategy::kReplicated, 2, 3, Uniform(2), 0, {}, one);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->replicas, (std::vector<std::vector<int>>{{0, 2}, {0, 2}}));
  // Every shard drains: over all of them, as with none.
  auto all = ComputePlacement(Strategy::kSharded, 4, 2, Uniform(4), 0, {}, {true, true});
  auto none = ComputePlacement(Strategy::kSharded, 4, 2, Uniform(4));
  ASSERT_TRUE(all.ok() && none.ok());
  EXPECT_EQ(all->replicas, none->replicas);
  EXPECT_EQ(ComputePlacement(Strategy::kSharded, 4, 2, Uniform(4), 0, {}, {true}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Placement, ImbalanceAndErrors) {
  auto p = ComputePlacement(Strategy::kSharded, 4, 2, Uniform(4));
  EXPECT_DOUBLE_EQ(Imbalance(*p, {1, 1, 1, 1}), 0.0);
  EXPECT_DOUBLE_EQ(Imbalance(*p, {3, 1, 0, 0}), 1.0);  // loads 4 and 0: max/mean - 1 = 1
  EXPECT_EQ(ComputePlacement(Strategy::kSharded, 4, 0, Uniform(4)).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(ComputePlacement(Strategy::kSharded, 4, 2, Uniform(3)).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A shard out of rotation is left out of the mean. Shard 1 is down and holds nothing; the two
  // others share the load evenly. Counted as an idle shard it read 3 / 2 - 1 = 0.5.
  Placement live;
  live.num_shards = 3;
  live.replicas = {{0}, {2}, {0, 2}, {0, 2}};
  const std::vector<double> load = {1, 1, 2, 2};
  EXPECT_DOUBLE_EQ(Imbalance(live, load), 0.5);
  EXPECT_DOUBLE_EQ(Imbalance(live, load, {true, false, true}), 0.0);
  // An expert's load goes to its usable replicas only, and is counted nowhere without one.
  EXPECT_EQ(ShardLoads(live, load, {true, false, false}), (std::vector<double>{5, 0, 0}));
  EXPECT_DOUBLE_EQ(Imbalance(live, load, {false, false, false}), 0.0);
  EXPECT_EQ(ParseStrategy("random").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseStrategy("random").status().message(),
            "placement strategy 'random' is not one of replicated, sharded, hybrid, dynamic");
  EXPECT_EQ(*ParseStrategy("dynamic"), Strategy::kDynamic);
}

}  // namespace
}  // namespace moe::router
