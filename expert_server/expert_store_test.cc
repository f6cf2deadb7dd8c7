#include "expert_server/expert_store.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "services/common/notification.h"
#include "services/common/random_checkpoint.h"
#include "services/common/server_util.h"

namespace moe::expert {
namespace {

common::ModelConfig Config() {
  common::ModelConfig c;
  c.num_experts = 3;
  c.d_model = 8;
  c.d_ff = 16;
  c.top_k = 1;
  c.activation = common::Activation::kRelu;
  return c;
}

class ExpertStoreTest : public ::testing::Test {
 protected:
  ExpertStoreTest()
      : ck_(common::MakeRandomCheckpoint({Config(), false, 3})),
        store_(
            Config(),
            [this](int e) -> absl::StatusOr<LoadedExpert> {
              if (e == 2) return absl::DataLossError("disk on fire");
              return LoadedExpert{ck_.experts[e], 0};
            },
            [this](const std::string& peer, int e) -> absl::StatusOr<LoadedExpert> {
              if (peer != "peer:1") return absl::UnavailableError("no such peer");
              common::ExpertWeights w = ck_.experts[e];
              w.w1[0] += 1.f;  // distinguishable copy
              return LoadedExpert{std::move(w), 17};  // trained up to step 17 on the peer
            }) {}

  absl::Status LoadAndWait(std::vector<int> experts, uint64_t version, std::string peer = "",
                           bool replace_newer = false, uint64_t lease_epoch = 0) {
    common::Notification done;
    absl::Status result;
    absl::Status st = store_.Load(
        experts, version, peer,
        [&](absl::Status s) {
          result = s;
          done.Notify();
        },
        replace_newer, lease_epoch);
    if (!st.ok()) return st;
    done.WaitForNotification();
    return result;
  }

  common::Checkpoint ck_;
  ExpertStore store_;
};

TEST_F(ExpertStoreTest, LoadsFromCheckpointAndReportsFailures) {
  EXPECT_TRUE(LoadAndWait({0, 1}, 1).ok());
  EXPECT_EQ(store_.ready_count(), 2);
  const absl::Status st = LoadAndWait({2}, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("expert 2: disk on fire"), std::string::npos);
  auto snap = store_.Snapshot();
  ASSERT_EQ(snap.size(), 3u);
  EXPECT_EQ(snap[2].state, ExpertState::kFailed);
  auto lease = store_.Acquire(2, 1);
  EXPECT_EQ(lease.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(lease.status().message().find("failed to load"), std::string::npos);
}

TEST_F(ExpertStoreTest, RangeAndVersionChecks) {
  EXPECT_EQ(store_.Load({3}, 1, "", nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(LoadAndWait({0}, 5).ok());
  EXPECT_EQ(store_.placement_version(), 5u);
  EXPECT_EQ(store_.Load({1}, 4, "", nullptr).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_.Unload({0}, 4).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_.Acquire(-1, 1).status().code(), absl::StatusCode::kInvalidArgument);
  auto missing = store_.Acquire(1, 1);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(missing.status().message().find("expert 1 is not loaded on this shard (placement version 5)"),
            std::string::npos);
}

// Loads and unloads carry the sender's placement lease epoch: one older than the highest sent
// is refused, whatever its placement version (the router whose lease went to another may have
// numbered its versions past the new holder's), and changes nothing. The newer epoch fences
// from its first call on, even one whose version is refused. 0 is not checked (a router without
// a coordinator).
TEST_F(ExpertStoreTest, ALoadOrUnloadOfAnOlderLeaseEpochIsRefused) {
  auto load = [&](std::vector<int> experts, uint64_t version, uint64_t epoch) {
    return LoadAndWait(std::move(experts), version, "", false, epoch);
  };
  EXPECT_EQ(store_.lease_epoch(), 0u);
  ASSERT_TRUE(load({0}, 7, 10).ok());
  EXPECT_EQ(store_.lease_epoch(), 10u);
  // A newer epoch with an older version: refused for the version, but fenced from now on.
  absl::Status st = load({1}, 3, 11);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("placement version 3 is older"), std::string::npos) << st;
  EXPECT_EQ(store_.lease_epoch(), 11u);
  st = load({1}, 8, 10);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(st.message(),
            "placement lease epoch 10 is older than 11, under which this shard was placed since: "
            "the sender no longer holds the placement lease (or its coordinator restarted with "
            "its clock behind, and the sender asks it for a later epoch)");
  st = store_.Unload({0}, 9, 10);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  // Refused calls changed nothing: expert 0 still serves, 1 was never loaded, the version is 7.
  EXPECT_TRUE(store_.Acquire(0, 1).ok());
  EXPECT_EQ(store_.Acquire(1, 1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_.placement_version(), 7u);
  // The holder's epoch, and an unchecked 0, go on.
  EXPECT_TRUE(load({1}, 8, 11).ok());
  EXPECT_TRUE(store_.Unload({1}, 8, 0).ok());
  EXPECT_TRUE(store_.Unload({}, 0, 12).ok());  // a router sending its epoch alone
  EXPECT_EQ(store_.lease_epoch(), 12u);
  EXPECT_EQ(store_.Unload({0}, 9, 11).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_.placement_version(), 8u);
  // Past what a coordinator grants: refused, and not kept (it would fence every later holder).
  st = store_.Unload({}, 0, common::kMaxLeaseEpoch);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_EQ(st.message(), absl::StrCat("placement lease epoch ", common::kMaxLeaseEpoch,
                                       " is out of range: a coordinator grants less than ",
                                       common::kMaxLeaseEpoch));
  EXPECT_TRUE(store_.Unload({}, 0, common::kMaxLeaseEpoch - 1).ok());
  EXPECT_EQ(store_.lease_epoch(), common::kMaxLeaseEpoch - 1);
}

TEST_F(ExpertStoreTest, DrainingExpertStaysUntilItsLeasesEnd) {
  ASSERT_TRUE(LoadAndWait({0, 1}, 1).ok());
  auto lease = store_.Acquire(0, 7);
  ASSERT_TRUE(lease.ok());
  EXPECT_EQ(lease->handle()->in_flight_rows.load(), 7);
  ASSERT_TRUE(store_.Unload({0, 1}, 2).ok());
  // Expert 1 was idle: gone at once. Expert 0 drains and still serves.
  EXPECT_EQ(store_.Find(1), nullptr);
  ASSERT_NE(store_.Find(0), nullptr);
  EXPECT_EQ(store_.Snapshot()[0].state, ExpertState::kDraining);
  EXPECT_TRUE(store_.Acquire(0, 1).ok());
  *lease = ExpertLease();  // the in-flight work finishes
  EXPECT_EQ(store_.Find(0), nullptr);
  EXPECT_TRUE(store_.Snapshot().empty());
}

TEST_F(ExpertStoreTest, PeerCopyReplacesWeights) {
  ASSERT_TRUE(LoadAndWait({1}, 1).ok());
  const float before = store_.Find(1)->ffn->weights().w1[0];
  EXPECT_EQ(store_.Snapshot()[0].trained_step, 0u) << "the checkpoint's weights are at step 0";
  ASSERT_TRUE(LoadAndWait({1}, 2, "peer:1").ok());
  EXPECT_EQ(store_.Find(1)->ffn->weights().w1[0], before + 1.f);
  EXPECT_EQ(store_.Snapshot()[0].trained_step, 17u) << "a copy is at its source's step";
  // A failed copy keeps the expert it had.
  EXPECT_EQ(LoadAndWait({1}, 3, "peer:2").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(store_.Snapshot()[0].state, ExpertState::kReady);
  EXPECT_EQ(store_.Find(1)->ffn->weights().w1[0], before + 1.f);
  EXPECT_EQ(store_.Snapshot()[0].trained_step, 17u);
}

TEST_F(ExpertStoreTest, ReplacedWeightsCarryTheirTrainingStep) {
  ASSERT_TRUE(LoadAndWait({0}, 1).ok());
  auto next = ExpertFfn::Create(Config(), ck_.experts[1]);
  ASSERT_TRUE(next.ok()) << next.status();
  ASSERT_TRUE(store_.ReplaceExpert(0, std::move(*next), 42).ok());
  EXPECT_EQ(store_.Snapshot()[0].trained_step, 42u);
  EXPECT_EQ(store_.Find(0)->trained_step, 42u);
  EXPECT_EQ(store_.Find(0)->ffn->weights().w1, ck_.experts[1].w1);
  auto missing = ExpertFfn::Create(Config(), ck_.experts[1]);
  ASSERT_TRUE(missing.ok());
  EXPECT_EQ(store_.ReplaceExpert(1, std::move(*missing), 43).code(),
            absl::StatusCode::kFailedPrecondition);
  // An update computed on weights that were replaced meanwhile is refused.
  const ExpertHandle* read = store_.Find(0).get();
  auto first = ExpertFfn::Create(Config(), ck_.experts[2]);
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(store_.ReplaceExpert(0, std::move(*first), 44, read).ok());
  auto late = ExpertFfn::Create(Config(), ck_.experts[1]);
  ASSERT_TRUE(late.ok());
  EXPECT_EQ(store_.ReplaceExpert(0, std::move(*late), 45, read).code(), absl::StatusCode::kAborted);
  EXPECT_EQ(store_.Find(0)->trained_step, 44u);
  // A copy from a peer at an older step (17) does not undo the training since.
  ASSERT_TRUE(LoadAndWait({0}, 2, "peer:1").ok());
  EXPECT_EQ(store_.Find(0)->trained_step, 44u);
  EXPECT_EQ(store_.Find(0)->ffn->weights().w1, ck_.experts[2].w1);
  EXPECT_EQ(store_.Snapshot()[0].state, ExpertState::kReady);
  // Unless told to replace newer weights: the router gives back an aborted step's update so.
  ASSERT_TRUE(LoadAndWait({0}, 2, "peer:1", /*replace_newer=*/true).ok());
  EXPECT_EQ(store_.Find(0)->trained_step, 17u);
  common::ExpertWeights copy = ck_.experts[0];
  copy.w1[0] += 1.f;
  EXPECT_EQ(store_.Find(0)->ffn->weights().w1, copy.w1);
}

// A store whose loaders wait for the test: `entered` when one starts, until `release`.
struct GatedStore {
  GatedStore()
      : ck(common::MakeRandomCheckpoint({Config(), false, 3})),
        store(
            Config(),
            [this](int e) -> absl::StatusOr<LoadedExpert> {
              if (gate_checkpoint) Wait();
              return LoadedExpert{ck.experts[e], 0};
            },
            [this](const std::string&, int e) -> absl::StatusOr<LoadedExpert> {
              Wait();
              common::ExpertWeights w = ck.experts[e];
              w.w1[0] += 1.f;
              return LoadedExpert{std::move(w), 17};
            }) {}
  void Wait() {
    entered.Notify();
    release.WaitForNotification();
  }
  struct Outcome {
    common::Notification done;
    absl::Status status;
  };
  // Starts a load; its status once `done` is notified.
  std::shared_ptr<Outcome> Load(std::vector<int> experts, uint64_t version, const std::string& peer,
                                bool replace_newer = false, uint64_t lease_epoch = 0) {
    auto out = std::make_shared<Outcome>();
    auto done = [out](absl::Status s) {
      out->status = s;
      out->done.Notify();
    };
    absl::Status st = store.Load(experts, version, peer, done, replace_newer, lease_epoch);
    if (!st.ok()) {
      out->status = st;
      out->done.Notify();
    }
    return out;
  }
  common::Checkpoint ck;
  bool gate_checkpoint = false;
  common::Notification entered, release;
  ExpertStore store;
};

TEST(ExpertStoreOrder, APeerCopyOfADrainingExpertKeepsItWhenItsLastLeaseEnds) {
  GatedStore g;
  auto first = g.Load({0}, 1, "");
  first->done.WaitForNotification();
  ASSERT_TRUE(first->status.ok()) << first->status;
  auto lease = g.store.Acquire(0, 3);
  ASSERT_TRUE(lease.ok());
  ASSERT_TRUE(g.store.Unload({0}, 2).ok());   // draining
  auto copy = g.Load({0}, 3, "peer:1");       // wanted again, copied from a peer
  g.entered.WaitForNotification();
  *lease = ExpertLease();  // its last lease ends while the copy is under way
  g.release.Notify();
  copy->done.WaitForNotification();
  EXPECT_TRUE(copy->status.ok()) << copy->status;
  ASSERT_NE(g.store.Find(0), nullptr) << "the load answered OK but the expert is gone";
  EXPECT_EQ(g.store.Find(0)->trained_step, 17u);
  EXPECT_EQ(g.store.Snapshot()[0].state, ExpertState::kReady);
}

// A copy queued by a router whose lease then went to another (it waited behind a slow load)
// replaces nothing once the new holder's epoch has reached the shard: the weights there may be
// the new holder's training.
TEST(ExpertStoreOrder, ACopyOfARouterWhoseLeaseWentToAnotherWhileItWaitedReplacesNothing) {
  GatedStore g;
  auto loaded = g.Load({0}, 1, "", false, 10);
  loaded->done.WaitForNotification();
  ASSERT_TRUE(loaded->status.ok()) << loaded->status;
  auto copy = g.Load({0}, 2, "peer:1", /*replace_newer=*/true, 10);
  g.entered.WaitForNotification();
  ASSERT_TRUE(g.store.Unload({}, 0, 11).ok());  // the new holder's epoch
  g.release.Notify();
  copy->done.WaitForNotification();
  EXPECT_EQ(copy->status.code(), absl::StatusCode::kFailedPrecondition) << copy->status;
  EXPECT_EQ(copy->status.message(),
            "expert 0: not installed: placement lease epoch 10 is older than 11, under which "
            "this shard was placed while the load waited");
  ASSERT_NE(g.store.Find(0), nullptr);
  EXPECT_EQ(g.store.Find(0)->trained_step, 0u) << "the stale copy replaced the weights";
  EXPECT_EQ(g.store.Find(0)->ffn->weights().w1, g.ck.experts[0].w1);
  EXPECT_EQ(g.store.Snapshot()[0].state, ExpertState::kReady);
}

// The same copy, where the new holder unloaded the expert and asked for it again meanwhile (from
// the checkpoint): the stale copy installs nothing into the new holder's entry, and the new
// holder's load installs its weights (kept, they would have stayed: the copy's are of a later
// training step).
TEST(ExpertStoreOrder, ACopyOfARouterWhoseLeaseWentToAnotherLeavesTheNewHoldersLoadAlone) {
  GatedStore g;
  auto copy = g.Load({1}, 1, "peer:1", /*replace_newer=*/true, 10);
  g.entered.WaitForNotification();
  ASSERT_TRUE(g.store.Unload({1}, 0, 11).ok());
  auto load = g.Load({1}, 0, "", false, 11);
  g.release.Notify();
  copy->done.WaitForNotification();
  load->done.WaitForNotification();
  EXPECT_EQ(copy->status.code(), absl::StatusCode::kFailedPrecondition) << copy->status;
  EXPECT_TRUE(load->status.ok()) << load->status;
  ASSERT_NE(g.store.Find(1), nullptr);
  EXPECT_EQ(g.store.Find(1)->trained_step, 0u) << "the stale copy's weights were installed";
  EXPECT_EQ(g.store.Find(1)->ffn->weights().w1, g.ck.experts[1].w1);
}

TEST(ExpertStoreOrder, AnExpertUnloadedWhileItLoadsFailsItsLoad) {
  GatedStore g;
  g.gate_checkpoint = true;
  auto load = g.Load({0}, 1, "");
  g.entered.WaitForNotification();
  ASSERT_TRUE(g.store.Unload({0}, 1).ok());
  g.release.Notify();
  load->done.WaitForNotification();
  EXPECT_EQ(load->status.code(), absl::StatusCode::kAborted) << load->status;
  EXPECT_NE(load->status.message().find("expert 0 was unloaded while it loaded"),
            std::string::npos);
  EXPECT_EQ(g.store.Find(0), nullptr);
}

// Stopping while a load runs: that load finishes, the one queued behind it is answered
// UNAVAILABLE (not left waiting), and later loads are refused at once.
TEST(ExpertStoreOrder, StopLoadingAnswersQueuedJobs) {
  GatedStore g;
  g.gate_checkpoint = true;
  auto running = g.Load({0}, 1, "");
  g.entered.WaitForNotification();
  auto queued = g.Load({1}, 2, "");
  std::thread stopper([&] { g.store.StopLoading(); });  // waits for the running load
  // Stopped once a new load is refused (one accepted before is queued, and answered too).
  absl::Status later;
  for (int i = 0; i < 2000 && later.code() != absl::StatusCode::kUnavailable; ++i) {
    later = g.store.Load({2}, 3, "", nullptr);
    if (later.code() != absl::StatusCode::kUnavailable) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  EXPECT_EQ(later.code(), absl::StatusCode::kUnavailable) << later;
  EXPECT_EQ(later.message(), "shard is shutting down");
  EXPECT_FALSE(queued->done.HasBeenNotified()) << "answered before the running load ended";
  g.release.Notify();
  stopper.join();
  ASSERT_TRUE(running->done.HasBeenNotified());
  EXPECT_TRUE(running->status.ok()) << running->status;
  ASSERT_TRUE(queued->done.HasBeenNotified()) << "a queued load was left waiting";
  EXPECT_EQ(queued->status.code(), absl::StatusCode::kUnavailable) << queued->status;
  EXPECT_EQ(queued->status.message(), "shard is shutting down");
  EXPECT_EQ(g.store.Find(1), nullptr);
}

}  // namespace
}  // namespace moe::expert
