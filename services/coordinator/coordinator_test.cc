#include "services/coordinator/coordinator_server.h"

#include <chrono>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "moe/v1/coordinator.grpc.pb.h"
#include "services/common/security.h"

namespace moe::coordinator {
namespace {

// CommitStep with a call deadline `seconds` away, for a step of no replica groups.
grpc::Status Commit(v1::Coordinator::Stub* stub, int seconds, v1::CommitStepResponse* resp) {
  v1::CommitStepRequest req;
  req.set_train_step(1);
  req.set_learning_rate(0.1f);
  req.set_timeout_ms(1000);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  return stub->CommitStep(&ctx, req, resp);
}

// The router's call ends 8 s after the step's timeout, and it settles the verdict itself from
// 1.5 s before that: a step that can no longer be decided and confirmed within its wait is
// aborted, never committed behind the router's back.
TEST(Coordinator, AStepThatCannotBeDecidedWithinTheRoutersWaitIsAbortedNotCommitted) {
  auto server = CoordinatorServer::Start(CoordinatorOptions{});
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Coordinator::NewStub(
      grpc::CreateChannel((*server)->address(), common::ChannelCredentials()));
  v1::CommitStepResponse in_time;
  ASSERT_TRUE(Commit(stub.get(), 30, &in_time).ok());
  EXPECT_TRUE(in_time.committed()) << in_time.reason();
  v1::CommitStepResponse late;
  ASSERT_TRUE(Commit(stub.get(), 6, &late).ok());  // 6 s: under the 7 s a commit needs
  EXPECT_FALSE(late.committed());
  EXPECT_NE(late.reason().find("too late to commit"), std::string::npos) << late.reason();
}

}  // namespace
}  // namespace moe::coordinator
