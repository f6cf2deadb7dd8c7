#include "router/placement_lease.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <prometheus/registry.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "services/common/security.h"
#include "services/common/server_util.h"
#include "services/coordinator/coordinator_server.h"
#include "tests/reference/registry_value.h"
#include "tests/reference/test_util.h"

namespace moe::router {
namespace {

// One router's lease on a coordinator at `address`, with its own metrics and counted hooks.
// `connect`: wait until the channel is connected (each ask has 500 ms, connecting included).
struct Router {
  Router(const std::string& address, const std::string& id, bool connect = true)
      : channel(grpc::CreateCustomChannel(address, common::ChannelCredentials(),
                                          common::ClientChannelArgs())),
        stub(v1::Coordinator::NewStub(channel)),
        metrics(registry, 4, {}),
        lease(stub.get(), address, id, epochs, &metrics,
              {[this] { ++regranted; }, [this] { ++lost; }, [this] { ++loop_ended_lost; }}) {
    if (connect) {
      EXPECT_TRUE(
          channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(20)));
    }
  }
  double HeldGauge() { return testing::RegistryValue(registry, "moe_router_placement_lease_held"); }
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Coordinator::Stub> stub;
  prometheus::Registry registry;
  RouterMetrics metrics;
  std::shared_ptr<LeaseEpochs> epochs = std::make_shared<LeaseEpochs>();
  std::atomic<int> regranted{0};
  std::atomic<int> lost{0};
  std::atomic<int> loop_ended_lost{0};
  PlacementLease lease;
};

std::unique_ptr<coordinator::CoordinatorServer> StartCoordinator(absl::Duration lease,
                                                                 int port = 0) {
  coordinator::CoordinatorOptions o;
  o.lease = lease;
  o.address = absl::StrCat("127.0.0.1:", port);
  auto server = coordinator::CoordinatorServer::Start(o);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

// A coordinator whose lease lasts `lease`, and two routers on it: a (id-a, at host-a:1) and b
// (id-b, at host-b:2), given their addresses unless `addressed` is false.
struct TwoRouters {
  explicit TwoRouters(absl::Duration lease, bool addressed = true)
      : coordinator(StartCoordinator(lease)),
        at(coordinator == nullptr ? "" : coordinator->address()),
        a(at, "id-a"),
        b(at, "id-b") {
    if (addressed) {
      a.lease.SetAddress("host-a:1");
      b.lease.SetAddress("host-b:2");
    }
  }
  std::unique_ptr<coordinator::CoordinatorServer> coordinator;
  const std::string at;
  Router a, b;
};

// One router holds the lease and may place; a second stands by, may not place, and says which
// router holds it (in ClusterInfo's text and in the refusal of its requests). Given up, the
// lease goes to the router standing by at its next ask; nothing is asked before a router has
// its address.
TEST(PlacementLease, OneRouterHoldsItAndAnotherStandsBySayingWhichHolds) {
  TwoRouters c(absl::Seconds(3), /*addressed=*/false);
  ASSERT_NE(c.coordinator, nullptr);
  const std::string& at = c.at;
  Router &a = c.a, &b = c.b;
  a.lease.Ask();  // no address yet: not asked
  EXPECT_FALSE(a.lease.MayPlace());
  EXPECT_EQ(a.lease.State(), absl::StrCat("asking coordinator ", at));
  EXPECT_EQ(a.lease.NotServing().message(),
            "the router does not serve: it has not been granted the placement lease yet");

  a.lease.SetAddress("host-a:1");
  b.lease.SetAddress("host-b:2");
  ASSERT_TRUE(a.lease.MayPlaceNow());
  EXPECT_TRUE(a.lease.Fences());
  EXPECT_TRUE(absl::StartsWith(a.lease.State(), "held (renewed ")) << a.lease.State();
  EXPECT_TRUE(a.lease.NotServing().ok());
  EXPECT_GT(a.epochs->held.load(), 0u);
  EXPECT_EQ(a.HeldGauge(), 1);

  EXPECT_FALSE(b.lease.MayPlaceNow());
  const std::string standing_by =
      absl::StrCat("standing by: router host-a:1 (id-a) holds the placement lease at coordinator ",
                   at, " (it lapses ");
  EXPECT_TRUE(absl::StartsWith(b.lease.State(), standing_by)) << b.lease.State();
  const absl::Status refused = b.lease.NotServing();
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(refused.message(), absl::StrCat("the router does not serve: ", b.lease.State()));
  EXPECT_TRUE(b.lease.NotRenewed().ok()) << "never held";
  EXPECT_EQ(b.epochs->held.load(), 0u);
  EXPECT_EQ(b.HeldGauge(), 0);

  a.lease.Release();
  EXPECT_FALSE(a.lease.MayPlace());
  EXPECT_EQ(a.HeldGauge(), 0);
  EXPECT_TRUE(b.lease.MayPlaceNow());
  EXPECT_EQ(b.HeldGauge(), 1);
  // The one that gave it up is told of the new holder, and stands by (it did not lose it).
  EXPECT_FALSE(a.lease.MayPlaceNow());
  EXPECT_FALSE(a.lease.lost());
  EXPECT_TRUE(absl::StartsWith(a.lease.State(), "standing by: router host-b:2 (id-b)"))
      << a.lease.State();
  EXPECT_EQ(a.regranted + a.lost + b.regranted + b.lost, 0);
}

// Start's loop renews the lease every quarter lease: the holder may place a lease later and
// after, and the other router stays refused; stopped, the lease is kept (until Release or its
// lapse) and nothing says it was lost.
TEST(PlacementLease, TheLoopRenewsTheLeaseUntilStopped) {
  TwoRouters c(absl::Seconds(1));
  ASSERT_NE(c.coordinator, nullptr);
  Router &a = c.a, &b = c.b;
  a.lease.Start();
  ASSERT_TRUE(testing::Eventually([&] { return a.lease.MayPlace(); }));
  const uint64_t epoch = a.epochs->held.load();
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  EXPECT_TRUE(a.lease.MayPlace()) << a.lease.State();
  EXPECT_EQ(a.HeldGauge(), 1);
  EXPECT_FALSE(b.lease.MayPlaceNow());
  a.lease.Stop();
  EXPECT_TRUE(absl::StartsWith(a.lease.State(), "held")) << a.lease.State();
  a.lease.Release();
  EXPECT_TRUE(b.lease.MayPlaceNow());
  EXPECT_EQ(a.epochs->held.load(), epoch) << "renewals keep the epoch";
  EXPECT_EQ(a.regranted + a.lost + a.loop_ended_lost, 0);
}

// A holder that went a whole lease without renewing it may no longer place (the refusal says
// so); once another router has taken the lease over, the holder's next ask finds it lost: it
// stops placing for good, says so once (Hooks::lost at once, Hooks::loop_ended_lost as its loop
// ends), and its parting words name the router that holds it now.
TEST(PlacementLease, AHolderThatStalledForALeaseFindsItTakenOverAndStops) {
  // 2 s: a's ask after b's grant must come within b's lease.
  TwoRouters c(absl::Seconds(2));
  ASSERT_NE(c.coordinator, nullptr);
  const std::string& at = c.at;
  Router &a = c.a, &b = c.b;
  ASSERT_TRUE(a.lease.MayPlaceNow());
  std::this_thread::sleep_for(std::chrono::milliseconds(2200));  // past a lease, not renewed
  EXPECT_FALSE(a.lease.MayPlace());
  EXPECT_TRUE(absl::StartsWith(a.lease.State(), "held, not renewed (renewed ")) << a.lease.State();
  const absl::Status stale = a.lease.NotRenewed();
  EXPECT_EQ(stale.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StartsWith(
      stale.message(),
      absl::StrCat("this router's placement lease has not been renewed for over a lease "
                   "(coordinator ",
                   at, " does not answer it in time)")))
      << stale.message();
  EXPECT_TRUE(a.lease.NotServing().ok()) << "a holder keeps serving";

  ASSERT_TRUE(b.lease.MayPlaceNow());  // the coordinator's lease lapsed too
  EXPECT_FALSE(a.lease.MayPlaceNow());
  EXPECT_TRUE(a.lease.lost());
  EXPECT_EQ(a.lost.load(), 1);
  EXPECT_EQ(a.loop_ended_lost.load(), 0);
  const absl::Status gone = a.lease.LostStatus();
  EXPECT_EQ(gone.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StartsWith(gone.message(),
                               absl::StrCat("router host-b:2 (id-b) holds the placement lease at "
                                            "coordinator ",
                                            at, " now (this router last renewed it ")))
      << gone.message();
  EXPECT_EQ(a.lease.NotServing(), gone);
  EXPECT_EQ(a.lease.State(), absl::StrCat("lost: ", gone.message()));
  EXPECT_EQ(a.HeldGauge(), 0);
  a.lease.Start();  // ends at once, lost
  EXPECT_TRUE(testing::Eventually([&] { return a.loop_ended_lost.load() == 1; }));
  a.lease.Lose("once more");
  a.lease.Stop();
  EXPECT_EQ(a.lost.load(), 1);
  EXPECT_EQ(a.loop_ended_lost.load(), 1);
  EXPECT_EQ(a.lease.LostStatus(), gone) << "the first reason stays";
}

// Lose (the router found another's kept gate) ends the asking loop and says so once; the lease
// is not given up (the router that stops holds it until it lapses).
TEST(PlacementLease, LostFromOutsideEndsTheLoop) {
  TwoRouters c(absl::Seconds(2));
  ASSERT_NE(c.coordinator, nullptr);
  Router &a = c.a, &b = c.b;
  a.lease.Start();
  ASSERT_TRUE(testing::Eventually([&] { return a.lease.MayPlace(); }));
  a.lease.Lose("the gate kept in DIR: another router kept it");
  EXPECT_EQ(a.lost.load(), 1);
  EXPECT_TRUE(testing::Eventually([&] { return a.loop_ended_lost.load() == 1; }));
  EXPECT_FALSE(a.lease.MayPlace());
  EXPECT_EQ(a.HeldGauge(), 0);
  EXPECT_EQ(a.lease.LostStatus().message(), "the gate kept in DIR: another router kept it");
  a.lease.Release();
  EXPECT_FALSE(b.lease.MayPlaceNow());
  EXPECT_TRUE(absl::StartsWith(b.lease.State(), "standing by: router host-a:1 (id-a)"));
  a.lease.Stop();
  EXPECT_EQ(a.lost.load(), 1);
  EXPECT_EQ(a.loop_ended_lost.load(), 1);
}

// A coordinator that does not answer: a router that never held the lease says so (what to check)
// and does not serve.
TEST(PlacementLease, ACoordinatorThatDoesNotAnswerIsSaid) {
  const int port = testing::FreePortBlock(1);
  ASSERT_GT(port, 0);
  const std::string at = absl::StrCat("127.0.0.1:", port);
  Router a(at, "id-a", /*connect=*/false);
  a.lease.SetAddress("host-a:1");
  EXPECT_FALSE(a.lease.MayPlaceNow());
  EXPECT_TRUE(absl::StartsWith(a.lease.State(), absl::StrCat("waiting for coordinator ", at,
                                                             ", which does not "
                                                             "answer (")))
      << a.lease.State();
  EXPECT_TRUE(
      absl::StrContains(a.lease.State(), "): check that it runs and that --coordinator names it"))
      << a.lease.State();
  EXPECT_EQ(a.lease.NotServing().message(),
            absl::StrCat("the router does not serve: ", a.lease.State()));
  EXPECT_FALSE(a.lease.lost());
}

// A coordinator started again grants the lease under a new epoch: the holder counts the regrant
// (Hooks::regranted, once) and sends the new epoch from then on.
TEST(PlacementLease, AGrantUnderANewEpochIsCountedOnce) {
  auto first = StartCoordinator(absl::Seconds(2));
  ASSERT_NE(first, nullptr);
  const int port = first->port();
  const std::string at = first->address();
  Router a(at, "id-a");
  a.lease.SetAddress("host-a:1");
  ASSERT_TRUE(a.lease.MayPlaceNow());
  const uint64_t epoch = a.epochs->held.load();
  a.lease.Ask();  // renewed: the same epoch
  EXPECT_EQ(a.epochs->held.load(), epoch);
  first->Shutdown();
  first.reset();
  // The coordinator's epochs come from its clock (milliseconds since 1970, times 2^20).
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  auto second = StartCoordinator(absl::Seconds(2), port);
  ASSERT_NE(second, nullptr);
  EXPECT_TRUE(testing::Eventually([&] {
    a.lease.Ask();
    return a.epochs->held.load() != epoch;
  }));
  EXPECT_GT(a.epochs->held.load(), epoch);
  EXPECT_EQ(a.lease.regrants(), 1u);
  EXPECT_EQ(a.regranted.load(), 1);
  a.lease.Ask();
  EXPECT_EQ(a.lease.regrants(), 1u);
  EXPECT_TRUE(a.lease.MayPlace());
}

}  // namespace
}  // namespace moe::router
