#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "moe/v1/coordinator.grpc.pb.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "services/common/security.h"
#include "services/coordinator/coordinator_server.h"
#include "tests/reference/loopback_server.h"
#include "tests/reference/registry_value.h"
#include "tests/reference/test_util.h"

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
  EXPECT_EQ(
      testing::RegistryValue(*(*server)->registry(), "moe_coordinator_allreduce_failures_total",
                             {{"code", "DEADLINE_EXCEEDED"}}),
      1);
}

// A shard whose gradient reduction answers, successfully, only after `hold` (or once released);
// every FinishStep (the coordinator's abort) is counted.
class SlowReduceShard final : public v1::ExpertShard::Service {
 public:
  explicit SlowReduceShard(std::chrono::milliseconds hold) : hold_(hold) {}
  ~SlowReduceShard() override {  // the held reductions end before the server does
    {
      std::lock_guard<std::mutex> lock(mu_);
      released_ = true;
    }
    cv_.notify_all();
  }
  std::string address() const { return server_.address(); }
  int aborts() {
    std::lock_guard<std::mutex> lock(mu_);
    return aborts_;
  }

  float rate() {
    std::lock_guard<std::mutex> lock(mu_);
    return rate_;
  }
  // What its reductions answer, after the hold (OK unless set).
  void Answer(grpc::Status st) {
    std::lock_guard<std::mutex> lock(mu_);
    answer_ = std::move(st);
  }

  grpc::Status ReduceGradients(grpc::ServerContext*, const v1::ReduceGradientsRequest* req,
                               v1::ReduceGradientsResponse* resp) override {
    std::unique_lock<std::mutex> lock(mu_);
    rate_ = req->learning_rate();
    cv_.wait_for(lock, hold_, [this] { return released_; });
    resp->set_elements(1);
    resp->set_seconds(0.001);
    return answer_;
  }
  grpc::Status FinishStep(grpc::ServerContext*, const v1::FinishStepRequest* req,
                          v1::FinishStepResponse*) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!req->commit()) ++aborts_;
    return grpc::Status::OK;
  }

 private:
  const std::chrono::milliseconds hold_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool released_ = false;
  int aborts_ = 0;
  float rate_ = -1;  // the last reduction's learning rate
  grpc::Status answer_;
  moe::testing::LoopbackServer server_{this, common::ServerCredentials()};  // last: it serves them
};

// Step `step` at learning rate 0.1 over one replica group of expert 0 on `shards`, each of
// which computed rows of it.
v1::CommitStepRequest StepOf(uint64_t step, std::initializer_list<const SlowReduceShard*> shards) {
  v1::CommitStepRequest req;
  req.set_train_step(step);
  req.set_learning_rate(0.1f);
  req.set_timeout_ms(5000);
  v1::ReplicaGroup* group = req.add_groups();
  group->add_experts(0);
  for (const SlowReduceShard* s : shards) {
    group->add_shards(s->address());
    req.add_shards(s->address());
    req.add_computed_shards(s->address());
  }
  return req;
}

// Reductions that succeed, but only after the moment the step had to be decided by, abort the
// step on every shard; the abort is counted as a reduction past its deadline.
TEST(Coordinator, ReductionsThatEndAfterTheDecisionAbortTheStepAndAreCounted) {
  auto server = CoordinatorServer::Start(CoordinatorOptions{});
  ASSERT_TRUE(server.ok()) << server.status();
  // The call's deadline is 9 s away: the step must be decided within 2 s (a commit's 5 s, the
  // router's 1.5 s to settle a verdict and 0.5 s for messages are kept back). The reductions
  // answer after 3 s, inside their own 6 s.
  SlowReduceShard a(std::chrono::seconds(3)), b(std::chrono::seconds(3));
  const v1::CommitStepRequest req = StepOf(7, {&a, &b});
  auto channel = grpc::CreateChannel((*server)->address(), common::ChannelCredentials());
  // Connected first: a slow connection (a sanitizer build on a busy machine) must not make the
  // step start past its decision time, which is another abort.
  ASSERT_TRUE(
      channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(30)));
  auto stub = v1::Coordinator::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(9));
  v1::CommitStepResponse resp;
  ASSERT_TRUE(stub->CommitStep(&ctx, req, &resp).ok());
  EXPECT_FALSE(resp.committed());
  EXPECT_NE(resp.reason().find("reductions ended too late to commit"), std::string::npos)
      << resp.reason();
  // Each shard gets the abort (sent with 0.5 s to arrive; on a busy machine it may be counted
  // after the answer).
  EXPECT_TRUE(::moe::testing::Eventually([&] { return a.aborts() == 1 && b.aborts() == 1; }))
      << a.aborts() << " and " << b.aborts() << " aborts";
  prometheus::Registry& reg = *(*server)->registry();
  EXPECT_EQ(testing::RegistryValue(reg, "moe_coordinator_allreduce_failures_total",
                                   {{"code", "DEADLINE_EXCEEDED"}}),
            1);
  EXPECT_EQ(testing::RegistryValue(reg, "moe_coordinator_steps_total", {{"outcome", "abort"}}), 1);
}

// A member whose reduction refuses the step because the sum, or its update at the step's
// learning rate (sent with each reduction), is not finite: the step is aborted, and the answer
// carries OUT_OF_RANGE, which the router passes on (not to be retried) rather than ABORTED.
TEST(Coordinator, AReductionRefusedAsNotFiniteAbortsTheStepWithItsCode) {
  auto server = CoordinatorServer::Start(CoordinatorOptions{});
  ASSERT_TRUE(server.ok()) << server.status();
  SlowReduceShard a(std::chrono::milliseconds(0)), b(std::chrono::milliseconds(0));
  b.Answer(
      grpc::Status(grpc::StatusCode::OUT_OF_RANGE,
                   "the summed gradient of expert 0 is not finite (w1.weight[3] is infinite)"));
  const v1::CommitStepRequest req = StepOf(9, {&a, &b});
  auto stub = v1::Coordinator::NewStub(
      grpc::CreateChannel((*server)->address(), common::ChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  v1::CommitStepResponse resp;
  ASSERT_TRUE(stub->CommitStep(&ctx, req, &resp).ok());
  EXPECT_FALSE(resp.committed());
  EXPECT_EQ(resp.code(), grpc::StatusCode::OUT_OF_RANGE) << resp.reason();
  EXPECT_NE(resp.reason().find(absl::StrCat("rank 1 (", b.address(),
                                            "): the summed gradient of expert 0 is not finite")),
            std::string::npos)
      << resp.reason();
  EXPECT_EQ(a.rate(), 0.1f);
  EXPECT_EQ(b.rate(), 0.1f);
}

// AcquirePlacementLease as router `id` (defer: PlacementLeaseRequest.defer_while_settling).
v1::PlacementLeaseResponse AskLease(v1::Coordinator::Stub* stub, const std::string& id,
                                    bool defer = false, uint64_t min_epoch = 0) {
  v1::PlacementLeaseRequest req;
  req.set_min_epoch(min_epoch);
  req.set_router_id(id);
  req.set_router_address(id + "-host:50051");
  req.set_defer_while_settling(defer);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::PlacementLeaseResponse resp;
  const grpc::Status st = stub->AcquirePlacementLease(&ctx, req, &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return resp;
}

void ReleaseLease(v1::Coordinator::Stub* stub, const std::string& id) {
  v1::PlacementLeaseRequest req;
  req.set_router_id(id);
  v1::PlacementLeaseResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  const grpc::Status st = stub->ReleasePlacementLease(&ctx, req, &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
}

bool Settling(v1::Coordinator::Stub* stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::Membership m;
  EXPECT_TRUE(stub->ListMembers(&ctx, v1::ListMembersRequest(), &m).ok());
  return m.settling();
}

// One router at a time holds the placement lease: a second is refused and told which router
// holds it, until the holder gives it up or stops renewing it for a lease. A holder that asks
// again after another router took over is refused too (the router then stops). While the
// coordinator settles (it may have restarted, and knows no holder), a router that knows of
// another holder is refused, so that the holder from before the restart keeps the lease; a
// router that knows of none (a cluster starting) gets it at once. Once the coordinator has
// granted the lease, it knows the holder, and one given up goes to the next router to ask.
TEST(Coordinator, OneRouterAtATimeHoldsThePlacementLease) {
  // A lease long enough that the settling window (the first lease here) outlasts the asks made
  // in it on a loaded machine.
  CoordinatorOptions o;
  o.lease = absl::Seconds(4);
  auto server = CoordinatorServer::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Coordinator::NewStub(
      grpc::CreateChannel((*server)->address(), common::ChannelCredentials()));
  auto grants = [&](const std::string& previous) {
    return testing::RegistryValue(*(*server)->registry(),
                                  "moe_coordinator_placement_lease_grants_total",
                                  {{"previous", previous}});
  };
  {
    grpc::ClientContext ctx;
    v1::PlacementLeaseResponse resp;
    const grpc::Status st = stub->AcquirePlacementLease(&ctx, v1::PlacementLeaseRequest(), &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(st.error_message(), "router_id is empty");
  }
  ASSERT_TRUE(Settling(stub.get()));
  v1::PlacementLeaseResponse r = AskLease(stub.get(), "standby", /*defer=*/true);
  EXPECT_FALSE(r.granted());
  EXPECT_TRUE(r.settling());
  EXPECT_EQ(r.holder_id(), "");
  r = AskLease(stub.get(), "old-holder");
  EXPECT_TRUE(r.granted());
  EXPECT_EQ(r.lease_ms(), 4000);
  r = AskLease(stub.get(), "standby", true);
  EXPECT_FALSE(r.granted());
  EXPECT_FALSE(r.settling());
  EXPECT_EQ(r.holder_id(), "old-holder");
  EXPECT_EQ(r.holder_address(), "old-holder-host:50051");
  EXPECT_GT(r.holder_expires_in_ms(), 0);
  EXPECT_LE(r.holder_expires_in_ms(), 4000);
  EXPECT_EQ(grants("none"), 1);

  // Given up while the coordinator still settles: it knows no other holder.
  ReleaseLease(stub.get(), "old-holder");
  ASSERT_TRUE(Settling(stub.get()));
  EXPECT_TRUE(AskLease(stub.get(), "standby", true).granted());
  ReleaseLease(stub.get(), "standby");
  ASSERT_TRUE(AskLease(stub.get(), "old-holder").granted());
  EXPECT_EQ(grants("released"), 2);

  // Renewed every quarter lease and more until the settling window has passed: the holder keeps
  // it.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  do {
    ASSERT_TRUE(AskLease(stub.get(), "old-holder").granted());
    ASSERT_EQ(AskLease(stub.get(), "standby", true).holder_id(), "old-holder");
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  } while (Settling(stub.get()) && std::chrono::steady_clock::now() < until);
  ASSERT_FALSE(Settling(stub.get()));
  // Given up: the next router to ask gets it.
  ReleaseLease(stub.get(), "standby");  // not the holder: changes nothing
  EXPECT_EQ(AskLease(stub.get(), "standby").holder_id(), "old-holder");
  ReleaseLease(stub.get(), "old-holder");
  EXPECT_TRUE(AskLease(stub.get(), "standby").granted());
  EXPECT_EQ(grants("released"), 3);
  r = AskLease(stub.get(), "old-holder");
  EXPECT_FALSE(r.granted());
  EXPECT_EQ(r.holder_id(), "standby");

  // Not renewed for a lease: it lapses, and the router asking gets it; the old holder asking
  // again is refused and told who holds it now.
  EXPECT_FALSE(AskLease(stub.get(), "third").granted());
  std::this_thread::sleep_for(std::chrono::milliseconds(4200));
  EXPECT_TRUE(AskLease(stub.get(), "third").granted());
  EXPECT_EQ(grants("lapsed"), 1);
  r = AskLease(stub.get(), "standby");
  EXPECT_FALSE(r.granted());
  EXPECT_EQ(r.holder_id(), "third");
  EXPECT_EQ(grants("none"), 1);
  EXPECT_EQ(grants("released"), 3);
}

// Each new holder of the placement lease gets a higher epoch, which renewals keep; a holder
// whose shards were placed under a later epoch (min_epoch) has its epoch raised past it, a
// router refused the lease changes nothing; and a restarted coordinator's epochs are above its
// last life's (they start from its clock).
TEST(Coordinator, EachNewHolderOfThePlacementLeaseGetsAHigherEpoch) {
  // A coordinator, a stub of it, and router a's first ask there.
  struct Started {
    std::unique_ptr<CoordinatorServer> server;
    std::unique_ptr<v1::Coordinator::Stub> stub;
    v1::PlacementLeaseResponse a;
  };
  auto start = [] {
    Started s;
    auto server = CoordinatorServer::Start(CoordinatorOptions{});
    EXPECT_TRUE(server.ok()) << server.status();
    if (!server.ok()) return s;
    s.server = *std::move(server);
    s.stub = v1::Coordinator::NewStub(
        grpc::CreateChannel(s.server->address(), common::ChannelCredentials()));
    s.a = AskLease(s.stub.get(), "a");
    return s;
  };
  Started one = start();
  ASSERT_TRUE(one.a.granted());
  v1::Coordinator::Stub* stub = one.stub.get();
  const uint64_t a = one.a.epoch();
  EXPECT_GT(a, 0u);
  EXPECT_EQ(AskLease(stub, "a").epoch(), a);  // renewed: the same
  v1::PlacementLeaseResponse refused = AskLease(stub, "b", false, a + 1000);
  EXPECT_FALSE(refused.granted());
  EXPECT_EQ(refused.epoch(), 0u);
  EXPECT_EQ(AskLease(stub, "a").epoch(), a);  // b's min_epoch changed nothing
  ReleaseLease(stub, "a");
  v1::PlacementLeaseResponse b = AskLease(stub, "b");
  ASSERT_TRUE(b.granted());
  EXPECT_GT(b.epoch(), a);
  // b's shards report an epoch past b's: b's goes on past it, and stays there.
  v1::PlacementLeaseResponse raised = AskLease(stub, "b", false, b.epoch() + 1000);
  ASSERT_TRUE(raised.granted());
  EXPECT_EQ(raised.epoch(), b.epoch() + 1001);
  EXPECT_EQ(AskLease(stub, "b", false, b.epoch()).epoch(), b.epoch() + 1001);
  // One past what is granted is not taken: it would fence every later holder out.
  EXPECT_EQ(AskLease(stub, "b", false, common::kMaxLeaseEpoch - 1).epoch(), b.epoch() + 1001);
  ReleaseLease(stub, "b");
  v1::PlacementLeaseResponse a2 = AskLease(stub, "a");  // a former holder, again
  ASSERT_TRUE(a2.granted());
  EXPECT_EQ(a2.epoch(), b.epoch() + 1002);
  one.server->Shutdown();
  one = Started{};

  Started two = start();
  ASSERT_TRUE(two.a.granted());
  EXPECT_GT(two.a.epoch(), a2.epoch())
      << "a restarted coordinator's epoch is below its last life's";
}

// Only the router that holds the placement lease trains: a step from another one is aborted
// everywhere, not_lease_holder, naming the holder. An older router (no id) is not checked.
TEST(Coordinator, AStepFromARouterThatDoesNotHoldThePlacementLeaseIsRefused) {
  auto server = CoordinatorServer::Start(CoordinatorOptions{});
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Coordinator::NewStub(
      grpc::CreateChannel((*server)->address(), common::ChannelCredentials()));
  ASSERT_TRUE(AskLease(stub.get(), "holder").granted());
  auto commit = [&](const std::string& router) {
    v1::CommitStepRequest req;
    req.set_train_step(3);
    req.set_learning_rate(0.1f);
    req.set_timeout_ms(1000);
    req.set_router_id(router);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::CommitStepResponse resp;
    EXPECT_TRUE(stub->CommitStep(&ctx, req, &resp).ok());
    return resp;
  };
  const v1::CommitStepResponse other = commit("other");
  EXPECT_FALSE(other.committed());
  EXPECT_TRUE(other.not_lease_holder());
  EXPECT_EQ(other.reason(),
            "router holder-host:50051 (holder) holds the placement lease at this coordinator: a "
            "step from router other is refused, as only the router that places the experts "
            "trains them");
  const v1::CommitStepResponse holder = commit("holder");
  EXPECT_TRUE(holder.committed());
  EXPECT_FALSE(holder.not_lease_holder());
  EXPECT_TRUE(commit("").committed());
  EXPECT_EQ(testing::RegistryValue(*(*server)->registry(), "moe_coordinator_steps_total",
                                   {{"outcome", "abort"}}),
            1);
}

}  // namespace
}  // namespace moe::coordinator
