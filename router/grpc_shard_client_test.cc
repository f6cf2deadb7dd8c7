// GrpcShardClient against a real shard server in this process: the control calls return the
// shard's own answer.

#include "router/grpc_shard_client.h"

#include <algorithm>
#include <map>

#include <gtest/gtest.h>

#include "expert_server/shard_server.h"
#include "services/common/random_checkpoint.h"
#include "tests/reference/test_util.h"

namespace moe::router {
namespace {

constexpr common::ModelConfig kConfig{.num_experts = 4, .d_model = 16, .d_ff = 32, .top_k = 2,
                                      .activation = common::Activation::kSilu, .gated = true};

// expert -> state name, from a shard's status.
std::map<int, std::string> States(const v1::ShardStatus& s) {
  std::map<int, std::string> out;
  for (const v1::ExpertStatus& e : s.experts()) {
    out[e.expert()] = v1::ExpertStatus::State_Name(e.state());
  }
  return out;
}

// The status calls once filled the answer after it had been moved into the result: every
// status came back empty, and the router's control loop then saw every expert as missing on
// every shard and copied them all again each second, over training steps in flight.
TEST(GrpcShardClient, LoadUnloadAndStatusReturnTheShardsAnswer) {
  const std::string path = ::moe::testing::TempPath("grpc_shard_client_test.safetensors");
  ASSERT_TRUE(
      common::SaveCheckpoint(path, common::MakeRandomCheckpoint({kConfig, true, 5})).ok());
  expert::ShardServerOptions o;
  o.checkpoint = path;
  o.initial_experts = std::vector<int>{};
  auto server = expert::ShardServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  GrpcShardClient client((*server)->address(), common::RpcLimits{});

  absl::StatusOr<v1::ShardStatus> loaded = client.LoadExperts({0, 2}, 1, "", absl::Seconds(30));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->num_experts(), 4);
  EXPECT_EQ(loaded->d_model(), 16);
  EXPECT_EQ(loaded->placement_version(), 1u);
  EXPECT_EQ(States(*loaded), (std::map<int, std::string>{{0, "READY"}, {2, "READY"}}));

  absl::StatusOr<v1::ShardStatus> status = client.GetStatus(absl::Seconds(10));
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ(status->num_experts(), 4);
  EXPECT_EQ(States(*status), (std::map<int, std::string>{{0, "READY"}, {2, "READY"}}));

  absl::StatusOr<v1::ShardStatus> unloaded = client.UnloadExperts({0}, 2, absl::Seconds(10));
  ASSERT_TRUE(unloaded.ok()) << unloaded.status();
  EXPECT_EQ(unloaded->placement_version(), 2u);
  EXPECT_EQ(States(*unloaded), (std::map<int, std::string>{{2, "READY"}}));

  // An error still names the shard and keeps the shard's code.
  absl::StatusOr<v1::ShardStatus> stale = client.UnloadExperts({2}, 1, absl::Seconds(10));
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(stale.status().message().find((*server)->address()), std::string::npos)
      << stale.status();
  EXPECT_NE(stale.status().message().find("older than the shard's version"), std::string::npos)
      << stale.status();
  (*server)->Shutdown();
}

}  // namespace
}  // namespace moe::router
