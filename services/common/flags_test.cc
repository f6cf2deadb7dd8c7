// Flags: parsing, typed getters, and the one-line errors they give.

#include "services/common/flags.h"

#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "tests/reference/test_util.h"

namespace moe::common {
namespace {

// Parses `args` (without a program name) against a fixed set of known flags.
absl::StatusOr<Flags> ParseArgs(std::vector<std::string> args) {
  return testing::ParseFlags(std::move(args), {{"n", true},
                                               {"x", true},
                                               {"mode", true},
                                               {"list", true},
                                               {"port", true},
                                               {"path", true},
                                               {"verbose", false}});
}

TEST(Flags, ParsesBothFormsAndTheLastValueCounts) {
  auto f = ParseArgs({"--n", "3", "--x=2.5", "--verbose", "--n=7"});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*f->GetInt("n", 0), 7);
  EXPECT_DOUBLE_EQ(*f->GetDouble("x", 0), 2.5);
  EXPECT_EQ(f->Get("verbose"), "true");
  EXPECT_FALSE(f->Has("mode"));
  EXPECT_EQ(f->Get("mode", "def"), "def");
  EXPECT_EQ(*f->GetInt("port", 42), 42);
}

TEST(Flags, RefusesWhatItDoesNotKnow) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  for (const Case& c : std::vector<Case>{{{"stray"}, "unexpected argument 'stray'"},
                                         {{"--bogus", "1"}, "unknown flag --bogus"},
                                         {{"--n"}, "flag --n needs a value"}}) {
    auto f = ParseArgs(c.args);
    ASSERT_FALSE(f.ok()) << c.message;
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(f.status().message(), c.message);
    EXPECT_TRUE(IsUsageError(f.status())) << "a main would not point to --help";
  }
}

// Usage errors (the command line) are told apart from other INVALID_ARGUMENTs (the data), for
// which a main neither points to --help nor exits 2.
TEST(Flags, UsageErrorsAreMarked) {
  auto f = ParseArgs({"--n", "x"});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE(IsUsageError(f->GetInt("n", 0).status()));
  EXPECT_TRUE(IsUsageError(f->Require("mode").status()));
  EXPECT_TRUE(IsUsageError(UsageError("--a and --b exclude each other")));
  EXPECT_EQ(UsageError("m").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(IsUsageError(absl::InvalidArgumentError("tokens[0, 0] is NaN")));
  EXPECT_FALSE(IsUsageError(absl::OkStatus()));
}

TEST(Flags, CheckTargetTakesHostPortAndGrpcsOwnForms) {
  for (const char* good : {"127.0.0.1:50051", "shard-0.moe:1", "[::1]:65535", "unix:/tmp/s",
                           "dns:///router.moe:50051", "ipv4:127.0.0.1:1"}) {
    EXPECT_TRUE(CheckTarget("shards", good).ok()) << good;
  }
  for (const char* bad : {"127.0.0.1", "127.0.0.1:", ":50051", "127.0.0.1:0", "127.0.0.1:99999",
                          "127.0.0.1:5x", "::1:50051", "h:123456", "h:+1"}) {
    const absl::Status st = CheckTarget("coordinator", bad, "(a hint)");
    EXPECT_TRUE(IsUsageError(st)) << bad;
    EXPECT_EQ(st.message(), absl::StrCat("--coordinator ", bad,
                                         ": give HOST:PORT with a port in [1, 65535], an IPv6 "
                                         "host in brackets ([::1]:PORT) (a hint)"));
  }
}

TEST(Flags, TypedGettersNameTheFlagAndTheValue) {
  auto f =
      ParseArgs({"--n", "three", "--x", "nan", "--port", "70000", "--list", "1,a", "--path", ""});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->GetInt("n", 0).status().message(), "--n must be an integer, got 'three'");
  EXPECT_EQ(f->GetDouble("x", 0).status().message(), "--x must be a finite number, got 'nan'");
  EXPECT_EQ(f->GetPort("port", 0).status().message(),
            "--port must be a port in [0, 65535] (0 picks a free one), got 70000");
  EXPECT_EQ(f->GetIntList("list").status().message(),
            "--list must be a comma-separated list of integers, got '1,a'");
  EXPECT_EQ(f->Require("mode").status().message(), "--mode is required");
  EXPECT_TRUE(IsUsageError(f->Require("path").status()));
  EXPECT_EQ(f->Require("path").status().message(), "--path is empty: give it a value");
}

// Out of range is one message whatever the value, one past int64's range too (which GetInt
// calls not an integer).
TEST(Flags, GetIntInRangeRefusesEveryIntegerOutside) {
  for (const char* out :
       {"0", "65", "-5", "100000", "2147483648", "9223372036854775807", "-9223372036854775808",
        "99999999999999999999", "-99999999999999999999"}) {
    auto f = ParseArgs({"--n", out});
    ASSERT_TRUE(f.ok()) << f.status();
    const absl::Status st = f->GetIntInRange("n", 4, 1, 64).status();
    EXPECT_TRUE(IsUsageError(st)) << out;
    EXPECT_EQ(st.message(), "--n must be in [1, 64]") << out;
  }
  auto f = ParseArgs({"--n", "64", "--x", "1x"});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*f->GetIntInRange("n", 4, 1, 64), 64);
  EXPECT_EQ(*f->GetIntInRange("port", 4, 1, 64), 4);
  EXPECT_EQ(f->GetIntInRange("x", 4, 1, 64).status().message(), "--x must be an integer, got '1x'");
}

TEST(Flags, IntListAndPort) {
  auto f = ParseArgs({"--list", "4,-1,0", "--port", "0"});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*f->GetIntList("list"), (std::vector<int>{4, -1, 0}));
  EXPECT_EQ(*f->GetPort("port", 1), 0);
  EXPECT_TRUE(f->GetIntList("mode")->empty());
}

TEST(Flags, GetChoiceTakesOnlyTheAllowedValues) {
  const std::vector<std::string> modes = {"fast", "safe"};
  auto f = ParseArgs({"--mode", "safe"});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*f->GetChoice("mode", modes, "fast"), "safe");
  auto g = ParseArgs({});
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(*g->GetChoice("mode", modes, "fast"), "fast");
  auto h = ParseArgs({"--mode", "Safe"});
  ASSERT_TRUE(h.ok()) << h.status();
  const absl::Status bad = h->GetChoice("mode", modes, "fast").status();
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.message(), "--mode Safe: use one of fast, safe");
}

}  // namespace
}  // namespace moe::common
