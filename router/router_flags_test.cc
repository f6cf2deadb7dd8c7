// The router's fixed-choice flags, as moe-router and moe-cluster read them.

#include "router/router_flags.h"

#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "tests/reference/test_util.h"

namespace moe::router {
namespace {

absl::StatusOr<RouterChoices> Choices(std::vector<std::string> args) {
  auto f = testing::ParseFlags(std::move(args), {{"placement", true}, {"overflow", true},
                                                 {"wire", true}, {"allreduce-wire", true}});
  if (!f.ok()) return f.status();
  return ParseRouterChoices(*f);
}

TEST(RouterFlags, Defaults) {
  auto c = Choices({});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->strategy, Strategy::kHybrid);
  EXPECT_FALSE(c->spill);
  EXPECT_FALSE(c->bf16_rows);
  EXPECT_FALSE(c->bf16_allreduce);
}

TEST(RouterFlags, EveryValueIsRead) {
  auto c = Choices({"--placement", "dynamic", "--overflow", "spill", "--wire", "bf16",
                    "--allreduce-wire", "bf16"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->strategy, Strategy::kDynamic);
  EXPECT_TRUE(c->spill);
  EXPECT_TRUE(c->bf16_rows);
  EXPECT_TRUE(c->bf16_allreduce);
  for (Strategy s : {Strategy::kReplicated, Strategy::kSharded, Strategy::kHybrid}) {
    auto d = Choices({"--placement", std::string(StrategyName(s))});
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->strategy, s);
  }
}

TEST(RouterFlags, AWrongValueIsToldWithTheAllowedOnes) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  for (const Case& c : std::vector<Case>{
           {{"--placement", "random"},
            "--placement random: use one of replicated, sharded, hybrid, dynamic"},
           {{"--overflow", "queue"}, "--overflow queue: use one of drop, spill"},
           {{"--wire", "fp16"}, "--wire fp16: use one of fp32, bf16"},
           {{"--allreduce-wire", "int8"}, "--allreduce-wire int8: use one of fp32, bf16"}}) {
    auto r = Choices(c.args);
    ASSERT_FALSE(r.ok()) << c.message;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(r.status().message(), c.message);
  }
}

}  // namespace
}  // namespace moe::router
