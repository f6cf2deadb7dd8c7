// Multi-process tests on loopback: real moe-expert-server and moe-router processes, checked
// against the in-process MoeLayer on the same checkpoint.

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <numeric>
#include <optional>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "expert_server/expert_ffn.h"
#include "moe/v1/coordinator.grpc.pb.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "services/common/grpc_status.h"
#include "services/common/safetensors.h"
#include "services/common/server_util.h"
#include "services/common/signals.h"
#include "services/common/status_macros.h"
#include "tests/cluster/cluster_fixture.h"
#include "tests/reference/shard_export.h"

namespace moe {
namespace {

using testing::Clock;
using testing::ClusterTest;
using testing::Config;
using testing::ScrapeBody;
using testing::ScrapeMetric;
using testing::Since;
using testing::WaitFor;

class StrategyTest : public ClusterTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(StrategyTest, InferAndInferStreamMatchTheInProcessLayer) {
  auto cluster = Start(GetParam(), 3);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  for (int64_t n : {1, 7, 64, 300}) {
    const std::vector<float> x = common::RandomMatrix(n, Config().d_model, 1000 + n);
    v1::InferResponse resp;
    grpc::Status st = Infer(stub.get(), Request(x, n, "one"), &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.request_id(), "one");
    EXPECT_EQ(resp.routing().top_k(), 2u);
    EXPECT_TRUE(Matches(x, n, resp, *layer_)) << GetParam() << " n=" << n;
  }
  // Many requests in flight on one stream come back in request order.
  grpc::ClientContext ctx;
  auto stream = stub->InferStream(&ctx);
  std::vector<std::vector<float>> inputs;
  for (int i = 0; i < 24; ++i) {
    const int64_t n = 1 + (i * 5) % 40;
    inputs.push_back(common::RandomMatrix(n, Config().d_model, 5000 + i));
    ASSERT_TRUE(stream->Write(Request(inputs.back(), n, "r" + std::to_string(i))));
  }
  stream->WritesDone();
  v1::InferResponse resp;
  int i = 0;
  while (stream->Read(&resp)) {
    EXPECT_EQ(resp.request_id(), "r" + std::to_string(i));
    EXPECT_EQ(resp.code(), 0) << resp.message();
    const int64_t n = static_cast<int64_t>(inputs[i].size()) / Config().d_model;
    EXPECT_TRUE(Matches(inputs[i], n, resp, *layer_)) << "stream request " << i;
    ++i;
  }
  EXPECT_EQ(i, 24);
  EXPECT_TRUE(stream->Finish().ok());
  // The placement the router reports is the strategy asked for.
  grpc::ClientContext pctx;
  v1::Placement p;
  ASSERT_TRUE(stub->GetPlacement(&pctx, v1::GetPlacementRequest(), &p).ok());
  EXPECT_EQ(p.strategy(), GetParam());
  EXPECT_EQ(p.experts_size(), 8);
  // SIGTERM stops every process with status 0 (under ASan: no error at exit either).
  const absl::Status stopped = cluster->Stop();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

INSTANTIATE_TEST_SUITE_P(Strategies, StrategyTest,
                         ::testing::Values("replicated", "sharded", "hybrid", "dynamic"));

TEST_F(ClusterTest, CapacityDropMatchesTheLayerAndSpillDropsLess) {
  auto cluster = Start("replicated", 2, {"--capacity-factor", "0.5"});
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  auto capped = router::MoeLayer::Create(*ck_, {0.5});
  const int64_t n = 80;
  const std::vector<float> x = common::RandomMatrix(n, Config().d_model, 77);
  v1::InferResponse resp;
  ASSERT_TRUE(Infer(stub.get(), Request(x, n, "cap"), &resp).ok());
  EXPECT_TRUE(Matches(x, n, resp, **capped));
  EXPECT_GT(resp.stats().dropped_assignments(), 0);
  const int64_t dropped = resp.stats().dropped_assignments();
  cluster.reset();
  const int metrics = testing::FreePortBlock(3);
  auto spill = Start("replicated", 2, {"--capacity-factor", "0.5", "--overflow", "spill"}, {},
                     metrics);
  ASSERT_NE(spill, nullptr);
  auto stub2 = client::MakeRouterStub(spill->router_address());
  ASSERT_TRUE(Infer(stub2.get(), Request(x, n, "spill"), &resp).ok());
  EXPECT_LT(resp.stats().dropped_assignments(), dropped);
  // What spill took past the first replica's capacity is counted, and the answer is still the
  // gate-weighted sum of the experts each token reached (the routing says which).
  EXPECT_GT(ScrapeMetric(metrics, "moe_router_assignments_total{outcome=\"spilled\"}"), 0);
  const int64_t d = Config().d_model;
  const std::vector<float> y = common::ViewToFloat(*common::DecodeTensor(resp.output(), "y"));
  const int k = static_cast<int>(resp.routing().top_k());
  // The routing itself: each assignment kept is the gate's own choice with its weight (the
  // uncapped layer's selection), and a dropped one is -1 with weight 0.
  auto uncapped = router::MoeLayer::Create(*ck_);
  ASSERT_TRUE(uncapped.ok()) << uncapped.status();
  const auto chosen = (*uncapped)->Forward(x.data(), n);
  ASSERT_TRUE(chosen.ok()) << chosen.status();
  ASSERT_EQ(k, Config().top_k);
  ASSERT_EQ(resp.routing().expert_ids_size(), n * k);
  ASSERT_EQ(resp.routing().weights_size(), n * k);
  int kept = 0;
  for (int64_t i = 0; i < n * k; ++i) {
    const int e = resp.routing().expert_ids(i);
    if (e < 0) {
      EXPECT_EQ(resp.routing().weights(i), 0.f) << "assignment " << i;
      continue;
    }
    ++kept;
    EXPECT_EQ(e, chosen->gating.selected[i]) << "assignment " << i;
    EXPECT_NEAR(resp.routing().weights(i), chosen->gating.selected_weights[i], 1e-6)
        << "assignment " << i;
  }
  EXPECT_EQ(kept, n * k - resp.stats().dropped_assignments());
  std::vector<std::unique_ptr<expert::ExpertFfn>> experts;
  for (const auto& w : ck_->experts) experts.push_back(*expert::ExpertFfn::Create(Config(), w));
  for (int64_t t = 0; t < n; ++t) {
    std::vector<float> want(d, 0.f), out(d);
    for (int j = 0; j < k; ++j) {
      const int e = resp.routing().expert_ids(t * k + j);
      if (e < 0) continue;
      ASSERT_TRUE(experts[e]->Forward(&x[t * d], 1, out.data()).ok());
      for (int64_t c = 0; c < d; ++c) want[c] += resp.routing().weights(t * k + j) * out[c];
    }
    for (int64_t c = 0; c < d; ++c) ASSERT_NEAR(y[t * d + c], want[c], 1e-5) << t << "," << c;
  }
}

// A shard's share of a request past the shard's --max-batch-rows (here all of it: one shard) is
// sent in batches within the limit, which the router reads from the shard's status; before, the
// shard refused the one batch ("split it") and the request failed every time.
TEST_F(ClusterTest, ARequestPastAShardsBatchLimitIsSentInSeveralBatches) {
  auto cluster = Start("sharded", 1, {}, {"--max-batch-rows", "50"});
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const int64_t n = 120;  // 240 assignments
  const std::vector<float> x = common::RandomMatrix(n, Config().d_model, 78);
  v1::InferResponse resp;
  const grpc::Status st = Infer(stub.get(), Request(x, n, "cut"), &resp);
  ASSERT_TRUE(st.ok()) << st.error_code() << " " << st.error_message();
  EXPECT_TRUE(Matches(x, n, resp, *layer_));
}

// A request whose deadline the router's --timeout-s cuts (the client's is longer) ends
// DEADLINE_EXCEEDED at the cut, and the message names the flag rather than blaming the client;
// one that ends on the client's own deadline does not name it.
TEST_F(ClusterTest, ADeadlineCutToTheRoutersTimeoutSaysSo) {
  // Rows wait 1.5 s in the shard's queue: the request outlives the router's 0.5 s.
  auto cluster = Start("sharded", 1, {"--timeout-s", "0.5"}, {"--batch-delay-us", "1500000"});
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const int64_t n = 4;
  const std::vector<float> x = common::RandomMatrix(n, Config().d_model, 80);
  v1::InferResponse resp;
  const auto start = std::chrono::steady_clock::now();
  const grpc::Status st = Infer(stub.get(), Request(x, n, "cut"), &resp, 10000);
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
  EXPECT_NE(st.error_message().find("the router gives one request at most --timeout-s, 500ms"),
            std::string::npos)
      << st.error_message();
  EXPECT_LT(took, std::chrono::milliseconds(1400)) << "it waited for the shard's answer";
  // A client's own, shorter deadline is not put on the flag. gRPC mostly reports the client's
  // deadline on the client's side first ("Deadline Exceeded"); when the router's answer comes
  // first, it must not name the flag (the router's side of this is Capped's single reading).
  const grpc::Status own = Infer(stub.get(), Request(x, n, "own"), &resp, 300);
  EXPECT_EQ(own.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << own.error_message();
  EXPECT_EQ(own.error_message().find("--timeout-s"), std::string::npos) << own.error_message();
}

// A request whose deadline passes while its shard is stalled (stopped, and not yet out of
// rotation) ends DEADLINE_EXCEEDED on time; the router cancels its batch there, and the shard,
// running again, drops the batch instead of computing it for nobody (before, it computed it in
// full: its deadline only starts when the shard reads it).
TEST_F(ClusterTest, AShardRunningAgainDropsTheBatchOfARequestThatEndedMeanwhile) {
  const int metrics = testing::FreePortBlock(3);
  // Rows wait 400 ms in the shard's queue: the cancellation, read just after the batch, finds
  // it there however the shard's threads are scheduled (with 200 ms, a make test under -j 2 once
  // saw the shard read it as its compute threads took the batch: 11 of 32 rows computed). The
  // late request's batch has what was left of its 600 ms when the router sent it (the shard
  // counts it from its own read): its deadline drops it first only where the router took more
  // than about 200 ms to send it, so the cases of a cancelled request, without such a deadline,
  // count the cancelled batches alone.
  auto cluster = Start("sharded", 1, {}, {"--batch-delay-us", "400000"}, metrics);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  auto shard_tokens = [&] { return ShardTokens(metrics + 1); };
  const std::string cancelled = "moe_shard_rejected_batches_total{reason=\"cancelled\"}";
  // Batches the shard dropped unseen: cancelled, and with `deadline_too` those past their
  // deadline (a late request's own deadline can pass before the router's cancellation is read).
  const std::string past_deadline = "moe_shard_rejected_batches_total{reason=\"deadline\"}";
  auto dropped = [&](bool deadline_too) {
    return std::max(0.0, ScrapeMetric(metrics + 1, cancelled)) +
           (deadline_too ? std::max(0.0, ScrapeMetric(metrics + 1, past_deadline)) : 0.0);
  };
  // The shard's rejected-batch counts by reason, for a failure message.
  auto rejections = [&] {
    std::string lines;
    for (absl::string_view line : absl::StrSplit(ScrapeBody(metrics + 1), '\n')) {
      if (absl::StartsWith(line, "moe_shard_rejected_batches_total")) {
        absl::StrAppend(&lines, line, "\n");
      }
    }
    return lines;
  };
  // Counted as what ended it (gRPC tells the router of the client's deadline as a cancellation);
  // 0 until the first such request (ScrapeMetric's -1: no series yet).
  auto router_counted = [&](const char* method, const char* code) {
    return std::max(0.0, ScrapeMetric(metrics, absl::StrCat("moe_router_requests_total{code=\"",
                                                            code, "\",method=\"", method, "\"}")));
  };
  const int64_t n = 16;
  const std::vector<float> x = common::RandomMatrix(n, Config().d_model, 79);
  v1::InferResponse resp;
  ASSERT_TRUE(Infer(stub.get(), Request(x, n, "warm"), &resp).ok());
  EXPECT_GT(shard_tokens(), 0);
  EXPECT_EQ(ScrapeMetric(metrics + 1, cancelled), 0);
  // The request must reach the shard before it ends: 600 ms leave room for a slow router (an
  // ASan build with other tests running took more than 300 ms), and the router takes the
  // stopped shard out of rotation only after two failed health checks (1.25 s or more).
  const auto on_the_shard = std::chrono::milliseconds(600);
  // One case: the shard stops; `end` sends a request and has it end while its batch waits on
  // the shard; the shard runs again once the router has counted the request as `code` (and so
  // sent the cancellation), and reads the batch and its cancellation back to back. It must
  // drop the batch, counted as cancelled (or past its deadline), and compute nothing.
  // The router's keepalive (a ping every 500 ms, 1 s to answer) may end the stream, and the
  // batch with it, from 1 s into the stop: a loaded machine once ran past that, and the batch
  // was neither computed nor counted. A case whose stop lasted 0.8 s or more is run again,
  // once the shard serves again and has nothing queued; at most four times.
  auto check_case = [&](const char* what, const char* method, const char* code,
                        const std::function<void()>& end) {
    const bool deadline_too = std::string(code) == "DEADLINE_EXCEEDED";
    for (int attempt = 1;; ++attempt) {
      const double dropped_before = dropped(deadline_too);
      const double tokens_before = shard_tokens();
      const double counted_before = router_counted(method, code);
      cluster->shard(0).Signal(SIGSTOP);
      const auto stopped_at = Clock::now();
      end();
      if (HasFatalFailure()) {
        cluster->shard(0).Signal(SIGCONT);
        return;
      }
      EXPECT_TRUE(testing::Eventually(
          [&] { return router_counted(method, code) == counted_before + 1; }))
          << what << ": the router did not end the request: " << ScrapeBody(metrics);
      const double stopped_for = Since(stopped_at);
      cluster->shard(0).Signal(SIGCONT);
      if (stopped_for < 0.8 || attempt == 4) {
        EXPECT_TRUE(testing::Eventually([&] {
          return dropped(deadline_too) == dropped_before + 1;
        })) << what
            << " (attempt " << attempt << ", the shard stopped for " << stopped_for << " s)\n"
            << rejections();
        EXPECT_EQ(shard_tokens(), tokens_before) << "the shard computed " << what;
        return;
      }
      ASSERT_TRUE(testing::Eventually(
          [&] { return Infer(stub.get(), Request(x, n, "again"), &resp).ok(); }));
      ASSERT_TRUE(testing::Eventually([&] {
        return ScrapeMetric(metrics + 1, "moe_shard_queue_depth{unit=\"rows\"}") == 0;
      }));
    }
  };
  check_case("the batch of a request past its deadline", "Infer", "DEADLINE_EXCEEDED", [&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + on_the_shard);
    const grpc::Status st = stub->Infer(&ctx, Request(x, n, "late"), &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
  });
  if (HasFatalFailure()) return;  // an ASSERT in a case ends only its lambda
  // The same for a request its client cancels: the router ends it at once (before, it waited
  // for the shard's answer) and cancels its batch.
  check_case("the batch of a cancelled request", "Infer", "CANCELLED", [&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    grpc::Status st;
    std::thread call([&] {
      v1::InferResponse r;
      st = stub->Infer(&ctx, Request(x, n, "cancelled"), &r);
    });
    std::this_thread::sleep_for(on_the_shard);  // the request is on the shard
    ctx.TryCancel();
    call.join();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED);
  });
  if (HasFatalFailure()) return;  // an ASSERT in a case ends only its lambda
  // And for the requests in flight on a stream its client cancels.
  check_case("the batch of a cancelled stream", "InferStream", "CANCELLED", [&] {
    grpc::ClientContext ctx;
    auto stream = stub->InferStream(&ctx);
    ASSERT_TRUE(stream->Write(Request(x, n, "on a stream")));
    std::this_thread::sleep_for(on_the_shard);  // the request is on the shard
    ctx.TryCancel();
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  });
  if (HasFatalFailure()) return;  // an ASSERT in a case ends only its lambda
  // It serves on.
  ASSERT_TRUE(Infer(stub.get(), Request(x, n, "after"), &resp).ok());
  EXPECT_TRUE(Matches(x, n, resp, *layer_));
}

TEST_F(ClusterTest, KilledShardWithReplicasLosesNoRequest) {
  auto cluster = Start("replicated", 3);
  ASSERT_NE(cluster, nullptr);
  BackgroundLoad load(cluster->router_address(), 4);
  const LoadResult& result = load.result();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  cluster->shard(1).Signal(SIGKILL);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  load.Stop();
  EXPECT_EQ(result.failed.load(), 0) << result.first_error;
  EXPECT_EQ(result.wrong.load(), 0);
  EXPECT_GT(result.ok.load(), 20);
}

// The router's view of the shard at `address` (ShardInfo.state), polled until it reads `want` or
// `seconds` pass; the last state read, and the last entry in `*last` if given.
std::string AwaitShardState(const std::string& router, const std::string& address,
                            const std::string& want, double seconds,
                            v1::ShardInfo* last = nullptr) {
  auto stub = client::MakeRouterStub(router);
  std::string state;
  const auto start = Clock::now();
  do {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::ClusterInfo info;
    if (stub->GetClusterInfo(&ctx, v1::GetClusterInfoRequest(), &info).ok()) {
      for (const auto& s : info.shards()) {
        if (s.address() != address) continue;
        state = s.state();
        if (last != nullptr) *last = s;
      }
    }
    if (state == want) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  } while (Since(start) < seconds);
  return state;
}

// A Drain of `address` with `undo` set (`drain --undo`): the call's status, its answer in `*out`.
grpc::Status UndoDrain(const std::string& address, v1::DrainResponse* out) {
  auto stub =
      v1::ExpertShard::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::DrainRequest undo;
  undo.set_undo(true);
  return stub->Drain(&ctx, undo, out);
}

// `moe-client drain --addr address` with a timeout of `seconds`: whether it said "drained" and
// exited 0 (failures are reported).
bool DrainWithClient(const std::string& address, int seconds) {
  auto drain =
      common::Subprocess::Spawn({std::string(MOE_BIN_DIR) + "/moe-client", "drain", "--addr",
                                 address, "--timeout-ms", std::to_string(seconds * 1000)});
  EXPECT_TRUE(drain.ok()) << drain.status();
  if (!drain.ok()) return false;
  auto line = drain->ReadLineWith("drained", absl::Seconds(seconds + 5));
  EXPECT_TRUE(line.ok()) << line.status();
  auto exit = drain->Wait(absl::Seconds(5));
  EXPECT_TRUE(exit.ok());
  const bool clean = exit.ok() && WIFEXITED(*exit) && WEXITSTATUS(*exit) == 0;
  EXPECT_TRUE(clean) << (line.ok() ? *line : "");
  return line.ok() && clean;
}

// The planned stop of Kubernetes' preStop: `moe-client drain` turns the shard NOT_SERVING, the
// router closes its stream once the batches on it are answered, and the SIGTERM that follows
// interrupts nothing: no failed request, and not even a failover.
TEST_F(ClusterTest, DrainedShardStopsWithoutAFailover) {
  const int metrics = testing::FreePortBlock(5);
  auto cluster = Start("replicated", 3, {}, {}, metrics);
  ASSERT_NE(cluster, nullptr);
  BackgroundLoad load(cluster->router_address(), 4);
  const LoadResult& result = load.result();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));

  const auto t0 = Clock::now();
  ASSERT_TRUE(DrainWithClient(cluster->shard_addresses()[1], 10));
  EXPECT_LT(Since(t0), 3.0) << "drain took too long";
  EXPECT_EQ(ScrapeMetric(metrics,
                         "moe_shard_up{shard=\"" + cluster->shard_addresses()[1] + "\"}"), 0);
  // Out of rotation on purpose: moe_shard_draining says so (the control loop reads it once a
  // second), and MoeShardDown leaves it out.
  auto draining = [&](int s) {
    return ScrapeMetric(metrics,
                        "moe_shard_draining{shard=\"" + cluster->shard_addresses()[s] + "\"}");
  };
  EXPECT_GE(WaitFor([&] { return draining(1) == 1; }, 5), 0) << "moe_shard_draining never read 1";
  EXPECT_EQ(draining(0), 0);

  // `moe-client info` tells a drained shard (it answers NOT_SERVING) from a stopped one.
  // Its entry says why it is out, and since when; a shard in rotation has no reason.
  const std::string drained = cluster->shard_addresses()[1];
  v1::ShardInfo out;
  EXPECT_EQ(AwaitShardState(cluster->router_address(), drained, "not_serving", 0, &out),
            "not_serving");
  EXPECT_EQ(out.out_of_rotation_reason(),
            "its health check says NOT_SERVING (draining, or no expert loaded)");
  EXPECT_GE(out.out_of_rotation_ms(), 0);
  EXPECT_LT(out.out_of_rotation_ms(), 10000);
  v1::ShardInfo in;
  EXPECT_EQ(
      AwaitShardState(cluster->router_address(), cluster->shard_addresses()[0], "serving", 0, &in),
      "serving");
  EXPECT_EQ(in.out_of_rotation_reason(), "");
  EXPECT_EQ(in.out_of_rotation_ms(), 0);

  const int ok_at_drain = result.ok.load();
  cluster->shard(1).Signal(SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  load.Stop();
  // Stopped now: the reason is the latest (its checks fail), the time still counts from the drain.
  EXPECT_EQ(AwaitShardState(cluster->router_address(), drained, "unreachable", 10, &out),
            "unreachable");
  EXPECT_TRUE(absl::StartsWith(out.out_of_rotation_reason(),
                               "two health checks in a row failed, the last: "))
      << out.out_of_rotation_reason();
  EXPECT_GE(out.out_of_rotation_ms(), 1000);
  // Stopped, it no longer drains: down (MoeShardDown pages if it stays a member for a minute),
  // or gone from the metrics once its lease has ended (-1: no series).
  EXPECT_GE(WaitFor([&] { return draining(1) != 1; }, 5), 0)
      << "moe_shard_draining still reads 1 for the stopped shard";
  EXPECT_EQ(result.failed.load(), 0) << result.first_error;
  EXPECT_EQ(result.wrong.load(), 0);
  EXPECT_GT(result.ok.load(), ok_at_drain + 10) << "serving went on after the drain";
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_failovers_total"), 0);

  // A drain timeout out of range is refused by name; the other shards keep serving.
  auto stub = v1::ExpertShard::NewStub(
      grpc::CreateChannel(cluster->shard_addresses()[0], grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::DrainRequest req;
  req.set_timeout_ms(600000);
  v1::DrainResponse resp;
  grpc::Status st = stub->Drain(&ctx, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("timeout_ms must be in [0, 60000]"), std::string::npos)
      << st.error_message();
}

// The first line of `moe-client ARGS...` holding `needle`, or the error.
absl::StatusOr<std::string> ClientLineWith(const std::vector<std::string>& args,
                                           const std::string& needle) {
  std::vector<std::string> argv = {std::string(MOE_BIN_DIR) + "/moe-client"};
  argv.insert(argv.end(), args.begin(), args.end());
  absl::StatusOr<common::Subprocess> p = common::Subprocess::Spawn(argv);
  if (!p.ok()) return p.status();
  return p->ReadLineWith(needle, absl::Seconds(10));
}

// A drain whose shard is the last to hold its experts (no shard in rotation can take them) waits,
// and the router serves those experts from the draining shard meanwhile, their last resort.
// Operators are told so: `info` says the shard drains but still serves them (it read "not
// serving (drains)" while the shard answered every request: a helper's walk-through,
// 2026-12-06), `placement` marks it as draining, and moe_shard_draining reads 1, which keeps
// MoeShardDown from paging for a planned drain.
TEST_F(ClusterTest, ADrainThatCannotMoveItsExpertsSaysTheShardStillServesThem) {
  const int metrics = testing::FreePortBlock(4);  // the router, 2 shards, the coordinator
  auto cluster = Start("sharded", 2, {}, {}, metrics);
  ASSERT_NE(cluster, nullptr);
  const std::string first = cluster->shard_addresses()[0], last = cluster->shard_addresses()[1];
  ASSERT_TRUE(DrainWithClient(first, 30));  // its experts move onto the other shard
  {
    auto shard =
        v1::ExpertShard::NewStub(grpc::CreateChannel(last, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(15));
    v1::DrainRequest req;
    req.set_timeout_ms(2000);
    v1::DrainResponse resp;
    const grpc::Status st = shard->Drain(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_FALSE(resp.drained()) << "nowhere to move its experts, yet the drain ended";
  }
  auto router = client::MakeRouterStub(cluster->router_address());
  for (int i = 0; i < 4; ++i) {
    const std::vector<float> x = common::RandomMatrix(16, Config().d_model, 960 + i);
    v1::InferResponse resp;
    const grpc::Status st = Infer(router.get(), Request(x, 16, "last resort"), &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_TRUE(Matches(x, 16, resp, *layer_));
  }
  auto draining = [&](const std::string& shard) {
    return ScrapeMetric(metrics, "moe_shard_draining{shard=\"" + shard + "\"}");
  };
  EXPECT_GE(WaitFor([&] { return draining(last) == 1 && draining(first) == 1; }, 5), 0)
      << "moe_shard_draining: " << draining(first) << " and " << draining(last);
  EXPECT_EQ(ScrapeMetric(metrics, "moe_shard_up{shard=\"" + last + "\"}"), 0);
  std::vector<std::string> all;
  for (int e = 0; e < Config().num_experts; ++e) all.push_back(absl::StrCat(e));
  const absl::StatusOr<std::string> row =
      ClientLineWith({"info", "--router", cluster->router_address()}, last);
  ASSERT_TRUE(row.ok()) << row.status();
  EXPECT_NE(row->find("drains, still serving"), std::string::npos) << *row;
  const absl::StatusOr<std::string> why =
      ClientLineWith({"info", "--router", cluster->router_address()}, "drains but still serves");
  ASSERT_TRUE(why.ok()) << why.status();
  EXPECT_EQ(*why, absl::StrCat("shard 1 (", last, ") drains but still serves expert(s) ",
                               absl::StrJoin(all, ","),
                               ": no shard in rotation holds them, so its drain waits for one "
                               "that can take them (undo the drain of ",
                               first, ": moe-client drain --addr ", first,
                               " --undo; or undo this drain: moe-client drain --addr ", last,
                               " --undo)"));
  // The first shard holds nothing: drained, not serving anything.
  const absl::StatusOr<std::string> drained =
      ClientLineWith({"info", "--router", cluster->router_address()}, first);
  ASSERT_TRUE(drained.ok()) << drained.status();
  EXPECT_NE(drained->find("not serving (drains)"), std::string::npos) << *drained;
  for (const auto& [shard, says] : std::vector<std::pair<std::string, std::string>>{
           {first, "- (drains)"}, {last, "- (drains, still serving)"}}) {
    const absl::StatusOr<std::string> line =
        ClientLineWith({"placement", "--router", cluster->router_address()}, shard);
    ASSERT_TRUE(line.ok()) << line.status();
    EXPECT_TRUE(absl::EndsWith(absl::StripTrailingAsciiWhitespace(*line), says)) << *line;
  }
}

std::pair<std::set<int>, std::set<int>> OnlyAndSharedOn(v1::Router::Stub* stub, int s);

// OnlyAndSharedOn read until it is `want` or `seconds` pass (a shard placed again reads
// "serving" a moment before the switch that places it is live); the last read.
std::pair<std::set<int>, std::set<int>> AwaitOnlyAndSharedOn(
    v1::Router::Stub* stub, int s, const std::pair<std::set<int>, std::set<int>>& want,
    double seconds) {
  const auto start = Clock::now();
  std::pair<std::set<int>, std::set<int>> got = OnlyAndSharedOn(stub, s);
  while (got != want && Since(start) < seconds) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    got = OnlyAndSharedOn(stub, s);
  }
  return got;
}

// A Rebalance to `strategy` (a dry run where `dry_run`) with a deadline `within` from now.
grpc::Status RebalanceWithin(v1::Router::Stub* stub, const std::string& strategy, bool dry_run,
                             v1::Placement* p, std::chrono::seconds within) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + within);
  v1::RebalanceRequest req;
  req.set_strategy(strategy);
  req.set_dry_run(dry_run);
  return stub->Rebalance(&ctx, req, p);
}
absl::Status TrainSteps(v1::Router::Stub* stub, uint64_t first_seed, int n);
grpc::Status TrainWhileRefused(v1::Router::Stub* stub, uint64_t seed,
                               const std::function<bool(const grpc::Status&)>& refused = nullptr,
                               v1::TrainStepResponse* out = nullptr);
absl::StatusOr<common::Checkpoint> SaveIdentical(v1::Router::Stub* stub, const std::string& name);

// A drained shard that holds an expert's only replica (half of `hybrid`'s experts): the router
// copies each such expert to another shard (from the draining one: trained weights stay
// trained) and only then closes its stream, so the drain answers "drained" once nothing needs
// the shard, and the SIGTERM that follows fails no request. Until 2026-12-05 the drain answered
// at once, the router kept sending those experts to the drained shard as a last resort, and
// its stop failed every request that gated to them ("expert 4 has no healthy replica"); found
// by a new user's walk-through. An idle router (no stream open to the shard) is covered too.
TEST_F(ClusterTest, ADrainedShardsOnlyReplicasMoveOffBeforeTheDrainEnds) {
  for (const bool trained : {false, true}) {
    SCOPED_TRACE(trained ? "trained" : "untrained");
    const int metrics = testing::FreePortBlock(5);
    auto cluster = Start("hybrid", 3, {}, {}, metrics);
    ASSERT_NE(cluster, nullptr);
    auto stub = client::MakeRouterStub(cluster->router_address());
    const auto [alone, shared] = OnlyAndSharedOn(stub.get(), 1);
    ASSERT_FALSE(alone.empty());
    if (trained) {
      const absl::Status st = TrainSteps(stub.get(), 9100, 2);
      ASSERT_TRUE(st.ok()) << st;
    }
    // Untrained, the router is idle when the drain starts: it has no stream open to the shard
    // (it opens one on seeing NOT_SERVING, which the drain waits for). Trained, under load.
    std::optional<BackgroundLoad> load;
    if (trained) {
      load.emplace(cluster->router_address(), 3);
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
    ASSERT_TRUE(DrainWithClient(cluster->shard_addresses()[1], 30));
    if (!trained) load.emplace(cluster->router_address(), 3);
    const LoadResult& result = load->result();
    // Each expert shard 1 held alone now also has a replica on another shard.
    grpc::ClientContext pctx;
    v1::Placement p;
    ASSERT_TRUE(stub->GetPlacement(&pctx, v1::GetPlacementRequest(), &p).ok());
    for (int e : alone) {
      const auto& where = p.experts(e).shards();
      EXPECT_TRUE(std::any_of(where.begin(), where.end(), [](int r) { return r != 1; }))
          << "expert " << e << " is still only on the drained shard";
    }
    const int ok_at_drain = result.ok.load();
    cluster->shard(1).Signal(SIGTERM);
    ASSERT_TRUE(cluster->shard(1).Wait(absl::Seconds(10)).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));
    load->Stop();
    EXPECT_EQ(result.failed.load(), 0) << result.first_error;
    if (!trained) {
      EXPECT_EQ(result.wrong.load(), 0);
    }
    EXPECT_GT(result.ok.load() + result.wrong.load(), ok_at_drain + 10)
        << "serving went on after the stop";
    if (trained) {
      // Copied from the draining shard, trained: nothing lost, every replica alike, and the
      // moved experts are not the checkpoint's any more.
      EXPECT_EQ(ScrapeMetric(metrics, "moe_router_experts_lost_training_total"), 0);
      absl::StatusOr<common::Checkpoint> saved = SaveIdentical(stub.get(), "drained_moved");
      ASSERT_TRUE(saved.ok()) << saved.status();
      int moved = 0;
      for (int e : alone) moved += saved->experts[e].w1 != ck_->experts[e].w1;
      EXPECT_GT(moved, 0) << "the moved experts came back untrained";
    }
  }
}

// A drain that was not followed by a stop can be taken back (`drain --undo`): the shard serves
// again, the router puts it back in rotation, and it answers requests as before. While it
// drains, its replicas leave the placement, so training steps run (until 2026-12-05 every step
// was refused for the whole drain: "replicas on ... are out of rotation"); once undone, the
// strategy's own layout comes back, with the trained weights.
TEST_F(ClusterTest, AnUndoneDrainServesAgain) {
  for (const std::string strategy : {"replicated", "hybrid"}) {
    SCOPED_TRACE(strategy);
    const int shards = strategy == "hybrid" ? 3 : 2;
    const int metrics = testing::FreePortBlock(shards + 1);
    auto cluster = Start(strategy, shards, {}, {}, metrics);
    ASSERT_NE(cluster, nullptr);
    const std::string shard = cluster->shard_addresses()[1];
    auto client = [&](std::vector<std::string> args, const std::string& says) {
      args.insert(args.begin(), std::string(MOE_BIN_DIR) + "/moe-client");
      auto p = common::Subprocess::Spawn(args);
      EXPECT_TRUE(p.ok()) << p.status();
      if (!p.ok()) return;
      auto line = p->ReadLineWith(says, absl::Seconds(15));
      EXPECT_TRUE(line.ok()) << line.status();
      auto exit = p->Wait(absl::Seconds(5));
      ASSERT_TRUE(exit.ok());
      EXPECT_TRUE(WIFEXITED(*exit) && WEXITSTATUS(*exit) == 0);
    };
    auto router = client::MakeRouterStub(cluster->router_address());
    const auto placed = OnlyAndSharedOn(router.get(), 1);  // the strategy's layout on shard 1
    ASSERT_FALSE(placed.first.empty() && placed.second.empty());
    absl::Status trained = TrainSteps(router.get(), 9290, 1);
    ASSERT_TRUE(trained.ok()) << trained;
    client({"drain", "--addr", shard, "--timeout-ms", "10000"}, "drained");
    EXPECT_EQ(AwaitShardState(cluster->router_address(), shard, "not_serving", 10), "not_serving");
    // The drain ends once the shard has left the placement (what it held alone was copied off
    // first), and training steps run.
    const auto drained = OnlyAndSharedOn(router.get(), 1);
    EXPECT_TRUE(drained.first.empty() && drained.second.empty())
        << drained.first.size() << " expert(s) alone and " << drained.second.size()
        << " shared are still placed on the drained shard";
    // Refused because of the drained shard, a step is not sent again (one refused for a slow
    // health check of another shard is, as TrainSteps does).
    for (uint64_t seed : {9300, 9301}) {
      const grpc::Status st = TrainWhileRefused(router.get(), seed, [&](const grpc::Status& s) {
        return absl::StrContains(s.error_message(), "out of rotation: the step could not commit") &&
               !absl::StrContains(s.error_message(), shard);
      });
      EXPECT_TRUE(st.ok()) << "step of seed " << seed << ": " << st.error_message();
    }
    // Undone, it holds nothing until the router places the strategy's layout again (or it
    // still holds it, where the undo came before the router had unloaded it). The undo returns
    // once it serves (it returned before, and `undo && health` failed): health says SERVING.
    client({"drain", "--addr", shard, "--undo"}, "drain undone: SERVING");
    client({"health", "--addr", shard}, "SERVING");
    EXPECT_EQ(AwaitShardState(cluster->router_address(), shard, "serving", 10), "serving");
    client({"drain", "--addr", shard, "--undo"}, "not draining, nothing to undo: SERVING");
    EXPECT_EQ(OnlyAndSharedOn(router.get(), 1), placed) << "not the strategy's layout again";
    // Placed again with the trained weights: the next step trains every replica alike.
    trained = TrainSteps(router.get(), 9310, 1);
    EXPECT_TRUE(trained.ok()) << trained;
    absl::StatusOr<common::Checkpoint> saved = SaveIdentical(router.get(), "undone_drain");
    ASSERT_TRUE(saved.ok()) << saved.status();
    auto trained_layer = router::MoeLayer::Create(*saved);
    ASSERT_TRUE(trained_layer.ok()) << trained_layer.status();
    auto stub =
        v1::ExpertShard::NewStub(grpc::CreateChannel(shard, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    v1::ShardStatus status;
    ASSERT_TRUE(stub->GetStatus(&ctx, v1::GetShardStatusRequest(), &status).ok());
    EXPECT_FALSE(status.draining());
    EXPECT_TRUE(status.serving());
    // Requests are answered right with the shard back in rotation, and it computes its share.
    const double before = ShardTokens(metrics + 2);
    for (int i = 0; i < 4; ++i) {
      const std::vector<float> x = common::RandomMatrix(32, Config().d_model, 950 + i);
      v1::InferResponse resp;
      ASSERT_TRUE(Infer(router.get(), Request(x, 32, "undone"), &resp).ok());
      EXPECT_TRUE(Matches(x, 32, resp, **trained_layer));
    }
    EXPECT_GT(ShardTokens(metrics + 2), before) << "the undone shard was sent no work";
  }
}

// A rebalance to a fixed strategy while a shard stays drained (not stopped) runs the formula
// over the shards that do not drain: the dry run is not refused, and applied, it puts nothing
// on the drained shard; training and requests go on. Until 2026-12-05 it was refused ("hybrid
// placement would leave experts 6,7 with no replica on a shard in rotation"), from a new
// user's walk-through. Undone, the shard gets the formula over all shards again.
TEST_F(ClusterTest, ARebalanceWhileAShardDrainsPlacesOverTheOthers) {
  auto cluster = Start("hybrid", 3);
  ASSERT_NE(cluster, nullptr);
  auto router = client::MakeRouterStub(cluster->router_address());
  const std::string shard = cluster->shard_addresses()[1];
  ASSERT_TRUE(DrainWithClient(shard, 10));
  auto rebalance = [&](const std::string& strategy, bool dry, v1::Placement* p) {
    return RebalanceWithin(router.get(), strategy, dry, p, std::chrono::seconds(30));
  };
  // Some load for the proposals' imbalance to measure.
  for (int i = 0; i < 3; ++i) {
    const std::vector<float> x = common::RandomMatrix(16, Config().d_model, 960 + i);
    v1::InferResponse resp;
    ASSERT_TRUE(Infer(router.get(), Request(x, 16, "load"), &resp).ok());
  }
  for (const std::string strategy : {"hybrid", "sharded", "replicated"}) {
    SCOPED_TRACE(strategy);
    v1::Placement dry;
    const grpc::Status st = rebalance(strategy, true, &dry);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(dry.refusal(), "");
    for (const v1::ExpertPlacement& e : dry.experts()) {
      EXPECT_TRUE(std::find(e.shards().begin(), e.shards().end(), 1) == e.shards().end())
          << "expert " << e.expert() << " proposed on the drained shard";
    }
    // The imbalance is over the two shards that take load: the drained one, which holds
    // nothing, is no idle shard (max/mean - 1 of shards 0 and 2's loads).
    ASSERT_EQ(dry.shard_load_size(), 3);
    EXPECT_EQ(dry.shard_load(1), 0.0);
    const double a = dry.shard_load(0), b = dry.shard_load(2);
    ASSERT_GT(a + b, 0.0);
    EXPECT_NEAR(dry.imbalance(), std::max(a, b) / ((a + b) / 2) - 1, 1e-9);
  }
  v1::Placement applied;
  grpc::Status st = rebalance("sharded", false, &applied);
  ASSERT_TRUE(st.ok()) << st.error_message();
  const auto on_drained = OnlyAndSharedOn(router.get(), 1);
  EXPECT_TRUE(on_drained.first.empty() && on_drained.second.empty());
  // Experts 0-3 on shard 0, 4-7 on shard 2: the formula over the two that do not drain.
  EXPECT_EQ(OnlyAndSharedOn(router.get(), 0).first, (std::set<int>{0, 1, 2, 3}));
  EXPECT_EQ(OnlyAndSharedOn(router.get(), 2).first, (std::set<int>{4, 5, 6, 7}));
  for (int i = 0; i < 3; ++i) {
    const std::vector<float> x = common::RandomMatrix(16, Config().d_model, 970 + i);
    v1::InferResponse resp;
    ASSERT_TRUE(Infer(router.get(), Request(x, 16, "drained"), &resp).ok());
    EXPECT_TRUE(Matches(x, 16, resp, *layer_));
  }
  const absl::Status trained = TrainSteps(router.get(), 9400, 1);
  EXPECT_TRUE(trained.ok()) << trained;
  // Undone: the formula over all three again (blocks of 3: shard 1 holds experts 3-5).
  v1::DrainResponse undone;
  ASSERT_TRUE(UndoDrain(shard, &undone).ok());
  EXPECT_EQ(AwaitShardState(cluster->router_address(), shard, "serving", 10), "serving");
  EXPECT_EQ(AwaitOnlyAndSharedOn(router.get(), 1, {{3, 4, 5}, {}}, 10),
            (std::pair<std::set<int>, std::set<int>>{{3, 4, 5}, {}}));

  // Drained again, and then stopped (a fixed --shards list keeps it in the table, down): it
  // stays out of the formulas, so a Rebalance to hybrid is applied over the other two instead
  // of refused ("would load experts onto it"). Started again, it gets its position back.
  // The answers (the model has trained a step: the layer is no reference) stay the same.
  const std::vector<float> x = common::RandomMatrix(16, Config().d_model, 980);
  v1::InferResponse before;
  ASSERT_TRUE(Infer(router.get(), Request(x, 16, "before"), &before).ok());
  ASSERT_TRUE(DrainWithClient(shard, 10));
  cluster->shard(1).Signal(SIGKILL);
  ASSERT_TRUE(cluster->shard(1).Wait(absl::Seconds(5)).ok());
  EXPECT_EQ(AwaitShardState(cluster->router_address(), shard, "unreachable", 10), "unreachable");
  st = rebalance("hybrid", false, &applied);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(applied.strategy(), "hybrid");
  // Hybrid over shards 0 and 2: experts 0-3 on both, 4-5 on shard 0 and 6-7 on shard 2.
  EXPECT_EQ(OnlyAndSharedOn(router.get(), 0),
            (std::pair<std::set<int>, std::set<int>>{{4, 5}, {0, 1, 2, 3}}));
  EXPECT_EQ(OnlyAndSharedOn(router.get(), 2),
            (std::pair<std::set<int>, std::set<int>>{{6, 7}, {0, 1, 2, 3}}));
  const auto on_stopped = OnlyAndSharedOn(router.get(), 1);
  EXPECT_TRUE(on_stopped.first.empty() && on_stopped.second.empty());
  v1::InferResponse after;
  ASSERT_TRUE(Infer(router.get(), Request(x, 16, "stopped"), &after).ok());
  const std::vector<float> y0 = common::ViewToFloat(*common::DecodeTensor(before.output(), "y"));
  const std::vector<float> y1 = common::ViewToFloat(*common::DecodeTensor(after.output(), "y"));
  ASSERT_EQ(y0.size(), y1.size());
  for (size_t i = 0; i < y0.size(); ++i) {
    ASSERT_NEAR(y1[i], y0[i], 1e-5 * (1 + std::fabs(y0[i]))) << "output " << i;
  }
  // Hybrid over all three (blocks of 2): shard 1 holds experts 6 and 7 alone.
  ASSERT_TRUE(cluster->RestartShard(1).ok());
  EXPECT_EQ(AwaitShardState(cluster->router_address(), shard, "serving", 15), "serving");
  EXPECT_EQ(AwaitOnlyAndSharedOn(router.get(), 1, {{6, 7}, {0, 1, 2, 3}}, 10),
            (std::pair<std::set<int>, std::set<int>>{{6, 7}, {0, 1, 2, 3}}));
}

// An expert whose only replica is killed fails its requests at once, UNAVAILABLE naming it and
// where it was; the others keep serving. Those failures are no failovers: the metric counts
// shard failures that were recovered (it counted each doomed request's last try on the dead
// shard).
TEST_F(ClusterTest, KilledShardWithoutReplicasFailsFastNamingTheExpert) {
  const int metrics = testing::FreePortBlock(4);
  auto cluster = Start("sharded", 2, {}, {}, metrics);  // experts 0-3 on shard 0, 4-7 on shard 1
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  // Find tokens routed only to shard 0's experts, and tokens that need shard 1.
  std::vector<float> safe, doomed;
  for (int seed = 0; safe.size() < 4 * 32 || doomed.size() < 32; ++seed) {
    const std::vector<float> x = common::RandomMatrix(1, Config().d_model, 900000 + seed);
    auto out = layer_->Forward(x.data(), 1);
    const bool on0 = out->gating.expert_ids[0] < 4 && out->gating.expert_ids[1] < 4;
    auto& dst = on0 ? safe : doomed;
    if (dst.size() < (on0 ? 4u : 1u) * 32) dst.insert(dst.end(), x.begin(), x.end());
  }
  v1::InferResponse resp;
  ASSERT_TRUE(Infer(stub.get(), Request(doomed, 1, "warm"), &resp).ok());
  cluster->shard(1).Signal(SIGKILL);
  const auto start = Clock::now();
  grpc::Status st = Infer(stub.get(), Request(doomed, 1, "doomed"), &resp);
  const double took = Since(start);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  // The message names the doomed token's expert on shard 1, and where it was hosted.
  int lost = Config().num_experts;  // the lowest of its experts on shard 1 is reported
  const auto doomed_ref = layer_->Forward(doomed.data(), 1);
  ASSERT_TRUE(doomed_ref.ok());
  for (int e : doomed_ref->gating.expert_ids) {
    if (e >= 4) lost = std::min(lost, e);
  }
  EXPECT_NE(st.error_message().find(absl::StrCat("expert ", lost, " has no healthy replica")),
            std::string::npos)
      << st.error_message();
  EXPECT_NE(st.error_message().find(cluster->shard_addresses()[1]), std::string::npos)
      << st.error_message();
  EXPECT_LT(took, 1.0);
  st = Infer(stub.get(), Request(safe, 4, "safe"), &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(Matches(safe, 4, resp, *layer_));
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(Infer(stub.get(), Request(doomed, 1, "doomed"), &resp).error_code(),
              grpc::StatusCode::UNAVAILABLE);
  }
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_failovers_total"), 0);
}

std::map<int, uint64_t> TrainedSteps(const std::string& address);

// A shard that no longer holds one of the replicas this router's placement puts on it (unloaded
// behind the router's back under a later placement version, as another router placing the shards
// meanwhile would, so that the router's load at its next tick is refused): every request is
// still answered, and right. The shard refuses a batch naming the experts it lacks, whose rows
// then go to their other replicas, and its other experts, those it alone holds among them, go
// back to it. (Before 2026-12-07 the shard was taken out of each request, and the experts it
// alone held failed.) The router then raises its placement version to the shard's and loads the
// replica back (before 2026-12-07 its load was refused at every tick, and each request paid a
// round).
TEST_F(ClusterTest, AShardMissingAReplicaStillServesItsOtherExperts) {
  const int metrics = testing::FreePortBlock(3);
  auto cluster = Start("hybrid", 2, {}, {}, metrics);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  v1::Placement placement;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->GetPlacement(&ctx, v1::GetPlacementRequest(), &placement).ok());
  }
  // An expert on both shards, and the experts shard 0 holds alone.
  const auto& listed = placement.shard_addresses();
  const int first = static_cast<int>(
      std::find(listed.begin(), listed.end(), cluster->shard_addresses()[0]) - listed.begin());
  ASSERT_LT(first, static_cast<int>(listed.size())) << "shard 0 is not in the placement";
  int shared = -1;
  std::vector<int> alone;
  for (const auto& e : placement.experts()) {
    if (e.shards_size() == 2 && shared < 0) shared = e.expert();
    if (e.shards_size() == 1 && e.shards(0) == first) alone.push_back(e.expert());
  }
  ASSERT_GE(shared, 0) << "hybrid replicated no expert";
  ASSERT_FALSE(alone.empty()) << "hybrid placed no expert on shard 0 alone";
  {
    auto shard = v1::ExpertShard::NewStub(
        grpc::CreateChannel(cluster->shard_addresses()[0], grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::UnloadExpertsRequest req;
    req.add_experts(shared);
    req.set_placement_version(placement.version() + 100);
    v1::ShardStatus status;
    const grpc::Status st = shard->UnloadExperts(&ctx, req, &status);
    ASSERT_TRUE(st.ok()) << st.error_message();
  }
  const std::string refused = "moe_shard_rejected_batches_total{reason=\"not_loaded\"}";
  const double refused_before = std::max(0.0, ScrapeMetric(metrics + 1, refused));
  // Requests that route tokens to the missing replica and to shard 0's own experts: 64 tokens
  // each, so that every expert is routed to.
  for (int i = 0; i < 10; ++i) {
    const int64_t n = 64;
    const std::vector<float> x = common::RandomMatrix(n, Config().d_model, 77000 + i);
    v1::InferResponse resp;
    const grpc::Status st = Infer(stub.get(), Request(x, n, "r" + std::to_string(i)), &resp);
    ASSERT_TRUE(st.ok()) << "request " << i << ": " << st.error_message();
    EXPECT_TRUE(Matches(x, n, resp, *layer_)) << "request " << i;
  }
  EXPECT_GT(std::max(0.0, ScrapeMetric(metrics + 1, refused)), refused_before)
      << "shard 0 never refused a batch for the missing replica: the case was not made";
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_failovers_total"), 0)
      << "shard 0 was taken out of a request";
  EXPECT_TRUE(testing::Eventually([&] {
    return TrainedSteps(cluster->shard_addresses()[0]).count(shared) == 1;
  })) << "the router did not load expert "
      << shared << " back onto shard 0";
  const double refused_after = ScrapeMetric(metrics + 1, refused);
  for (int i = 0; i < 3; ++i) {
    const std::vector<float> x = common::RandomMatrix(64, Config().d_model, 78000 + i);
    v1::InferResponse resp;
    ASSERT_TRUE(Infer(stub.get(), Request(x, 64, "after"), &resp).ok());
    EXPECT_TRUE(Matches(x, 64, resp, *layer_));
  }
  EXPECT_EQ(ScrapeMetric(metrics + 1, refused), refused_after)
      << "shard 0 still refuses batches once the replica is back";
}

TEST_F(ClusterTest, StalledShardLeavesRotationAndComesBack) {
  auto cluster = Start("replicated", 3);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  auto healthy = [&](int shard) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::ClusterInfo info;
    const grpc::Status st = stub->GetClusterInfo(&ctx, v1::GetClusterInfoRequest(), &info);
    if (!st.ok() || info.shards_size() <= shard) {  // the router must answer throughout
      ADD_FAILURE() << "GetClusterInfo: " << st.error_message() << " (" << info.shards_size()
                    << " shards)";
      return false;
    }
    return info.shards(shard).healthy();
  };
  ASSERT_TRUE(healthy(2));
  // Under load: what was in flight on the stalled shard is sent again to another replica once
  // the shard is out (its stream's keepalive times out), so no request fails.
  BackgroundLoad load(cluster->router_address(), 3);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  cluster->shard(2).Signal(SIGSTOP);
  auto start = Clock::now();
  while (healthy(2) && Since(start) < 5) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const double out_after = Since(start);
  EXPECT_LT(out_after, 2.0);
  // Requests still succeed while it is stalled.
  const std::vector<float> x = common::RandomMatrix(16, Config().d_model, 31);
  v1::InferResponse resp;
  grpc::Status st = Infer(stub.get(), Request(x, 16, "stalled"), &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(Matches(x, 16, resp, *layer_));
  {
    // A dynamic placement proposed now leaves the stalled shard out: nothing is moved onto a
    // shard out of rotation.
    grpc::ClientContext ctx;
    v1::RebalanceRequest dry;
    dry.set_strategy("dynamic");
    dry.set_dry_run(true);
    v1::Placement p;
    const grpc::Status dst = stub->Rebalance(&ctx, dry, &p);
    EXPECT_TRUE(dst.ok()) << dst.error_message();  // no ASSERT: the shard must be let go on
    EXPECT_FALSE(p.applied());
    EXPECT_EQ(p.experts_size(), dst.ok() ? Config().num_experts : 0);
    for (const auto& e : p.experts()) {
      EXPECT_GT(e.shards_size(), 0) << "expert " << e.expert();
      for (int s : e.shards()) EXPECT_NE(s, 2) << "expert " << e.expert() << " on the stalled shard";
    }
  }
  cluster->shard(2).Signal(SIGCONT);
  start = Clock::now();
  while (!healthy(2) && Since(start) < 5) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_LT(Since(start), 2.0);
  EXPECT_TRUE(healthy(2));
  const LoadResult& result = load.Stop();
  EXPECT_EQ(result.failed.load(), 0) << result.first_error;
  EXPECT_EQ(result.wrong.load(), 0);
  EXPECT_GT(result.ok.load(), 10);
}

// Dynamic placement moves load off a dead shard; once it is back, empty and so NOT_SERVING
// (a shard turns SERVING when it holds an expert), the next dynamic placement gives it
// experts again instead of leaving it out for good.
TEST_F(ClusterTest, DynamicPlacementUsesAShardBackEmptyAfterItsLoadWasMovedOff) {
  auto cluster = Start("dynamic", 3);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  auto rebalance = [&](bool dry_run, v1::Placement* p) {
    grpc::ClientContext ctx;
    v1::RebalanceRequest req;
    req.set_strategy("dynamic");
    req.set_dry_run(dry_run);
    return stub->Rebalance(&ctx, req, p);
  };
  auto holds = [](const v1::Placement& p, int shard) {
    int n = 0;
    for (const auto& e : p.experts()) n += std::count(e.shards().begin(), e.shards().end(), shard);
    return n;
  };
  const std::string dead = cluster->shard_addresses()[2];
  cluster->shard(2).Signal(SIGKILL);
  ASSERT_TRUE(cluster->shard(2).Wait(absl::Seconds(5)).ok());
  EXPECT_EQ(AwaitShardState(cluster->router_address(), dead, "unreachable", 10), "unreachable");
  v1::Placement off;
  const grpc::Status moved = rebalance(false, &off);
  ASSERT_TRUE(moved.ok()) << moved.error_message();
  EXPECT_EQ(holds(off, 2), 0) << "load left on the dead shard";
  ASSERT_TRUE(cluster->RestartShard(2).ok());
  EXPECT_EQ(AwaitShardState(cluster->router_address(), dead, "not_serving", 10), "not_serving");
  v1::Placement back;
  const grpc::Status proposed = rebalance(true, &back);
  ASSERT_TRUE(proposed.ok()) << proposed.error_message();
  EXPECT_GT(holds(back, 2), 0) << "the shard back, empty, was left out";

  // A drained shard is empty too once its load has moved off, but it will not serve again:
  // nothing is placed on it.
  const std::string drained = cluster->shard_addresses()[1];
  auto drain = common::Subprocess::Spawn({std::string(MOE_BIN_DIR) + "/moe-client", "drain",
                                          "--addr", drained, "--timeout-ms", "10000"});
  ASSERT_TRUE(drain.ok()) << drain.status();
  ASSERT_TRUE(drain->ReadLineWith("drained", absl::Seconds(15)).ok());
  ASSERT_TRUE(drain->Wait(absl::Seconds(5)).ok());
  EXPECT_EQ(AwaitShardState(cluster->router_address(), drained, "not_serving", 10),
            "not_serving");
  v1::Placement without;
  const grpc::Status moved_off = rebalance(false, &without);
  ASSERT_TRUE(moved_off.ok()) << moved_off.error_message();
  EXPECT_EQ(holds(without, 1), 0) << "load left on the drained shard";
  v1::Placement after;
  const grpc::Status again = rebalance(true, &after);
  ASSERT_TRUE(again.ok()) << again.error_message();
  EXPECT_EQ(holds(after, 1), 0) << "load proposed for the drained shard";
  EXPECT_GT(holds(after, 2), 0);
}

TEST_F(ClusterTest, RebalanceUnderLoadNeverFailsARequest) {
  auto cluster = Start("hybrid", 3, {"--rebalance-cooldown-s", "0"});
  ASSERT_NE(cluster, nullptr);
  BackgroundLoad load(cluster->router_address(), 3);
  const LoadResult& result = load.result();
  auto stub = client::MakeRouterStub(cluster->router_address());
  uint64_t last_version = 0;
  for (const char* s : {"sharded", "replicated", "dynamic", "hybrid", "sharded"}) {
    grpc::ClientContext ctx;
    v1::RebalanceRequest req;
    req.set_strategy(s);
    v1::Placement p;
    grpc::Status st = stub->Rebalance(&ctx, req, &p);
    ASSERT_TRUE(st.ok()) << s << ": " << st.error_message();
    EXPECT_EQ(p.strategy(), s);
    EXPECT_TRUE(p.applied());
    EXPECT_GT(p.version(), last_version);
    last_version = p.version();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  // A dry run changes nothing.
  grpc::ClientContext ctx;
  v1::RebalanceRequest dry;
  dry.set_strategy("replicated");
  dry.set_dry_run(true);
  v1::Placement p;
  ASSERT_TRUE(stub->Rebalance(&ctx, dry, &p).ok());
  EXPECT_FALSE(p.applied());
  EXPECT_EQ(p.strategy(), "replicated");  // the proposal, scored
  EXPECT_EQ(p.experts_size(), Config().num_experts);
  for (const auto& e : p.experts()) EXPECT_EQ(e.shards_size(), 3) << "expert " << e.expert();
  grpc::ClientContext ctx2;
  ASSERT_TRUE(stub->GetPlacement(&ctx2, v1::GetPlacementRequest(), &p).ok());
  EXPECT_EQ(p.strategy(), "sharded");
  EXPECT_EQ(p.version(), last_version);
  // A rebalance to the live strategy that moves nothing (or one resent after a reconnect) is
  // answered with the live placement, without a new version.
  grpc::ClientContext ctx3;
  v1::RebalanceRequest same;
  same.set_strategy("sharded");
  ASSERT_TRUE(stub->Rebalance(&ctx3, same, &p).ok());
  EXPECT_TRUE(p.applied());
  EXPECT_EQ(p.version(), last_version);
  load.Stop();
  EXPECT_EQ(result.failed.load(), 0) << result.first_error;
  EXPECT_EQ(result.wrong.load(), 0);
  EXPECT_GT(result.ok.load(), 10);
}

// A user's synchronous client reads its connection only during a call (and otherwise every 5 s,
// gRPC's backup poller), so between calls it answers the router's keepalive pings late. The
// router pings users every 10 s with 10 s to answer: a call after 2 or 3 s of idling goes
// through, where with the cluster's 500 ms and 1 s it found its connection closed (UNAVAILABLE
// "Socket closed"); and so does one after 12 s, past a ping that the idle client answered from
// its backup poller within the 10 s.
TEST_F(ClusterTest, AClientIdleBetweenCallsIsNotCutOff) {
  auto cluster = Start("hybrid", 2);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  for (int gap_ms : {0, 2000, 3000, 12000}) {
    std::this_thread::sleep_for(std::chrono::milliseconds(gap_ms));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ClusterInfo info;
    const grpc::Status st = stub->GetClusterInfo(&ctx, v1::GetClusterInfoRequest(), &info);
    EXPECT_TRUE(st.ok()) << "after " << gap_ms << " ms idle: " << st.error_code() << " "
                         << st.error_message();
  }
}

TEST_F(ClusterTest, BadRequestsGetClearErrors) {
  auto cluster = Start("hybrid", 2, {"--max-batch-tokens", "100"});
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const int d = Config().d_model;
  struct Case {
    const char* name;
    v1::InferRequest req;
    grpc::StatusCode code;
    const char* needle;
  };
  std::vector<Case> cases;
  {
    v1::InferRequest r;
    common::EncodeTensor(common::RandomMatrix(2, d + 1, 1), {2, d + 1}, common::WireType::kFloat32,
                         r.mutable_tokens());
    cases.push_back({"wrong d_model", r, grpc::INVALID_ARGUMENT, "must be [N, 32]"});
  }
  {
    std::vector<float> x = common::RandomMatrix(3, d, 2);
    x[d + 4] = std::nanf("");
    cases.push_back({"NaN", Request(x, 3, "nan"), grpc::INVALID_ARGUMENT, "tokens[1, 4] is NaN"});
    x[d + 4] = INFINITY;
    cases.push_back({"Inf", Request(x, 3, "inf"), grpc::INVALID_ARGUMENT, "is infinite"});
    // Finite, but so large that the gated experts' product overflows: the answer is not served.
    const std::vector<float> large(2 * d, 1e36f);
    cases.push_back({"overflowing", Request(large, 2, "large"), grpc::OUT_OF_RANGE,
                     "the output of token 0 is not finite"});
  }
  cases.push_back({"empty", Request({}, 0, "empty"), grpc::INVALID_ARGUMENT, "empty"});
  cases.push_back({"oversized", Request(common::RandomMatrix(101, d, 3), 101, "big"),
                   grpc::RESOURCE_EXHAUSTED, "exceed the limit of 100"});
  {
    v1::InferRequest r = Request(common::RandomMatrix(2, d, 4), 2, "short");
    r.mutable_tokens()->mutable_data()->resize(17);
    cases.push_back({"malformed", r, grpc::INVALID_ARGUMENT, "data has 17 bytes"});
    r = Request(common::RandomMatrix(1, d, 4), 1, "huge");
    r.mutable_tokens()->set_shape(0, int64_t{1} << 40);
    cases.push_back({"huge declared", r, grpc::RESOURCE_EXHAUSTED, "tokens"});
    r = Request(common::RandomMatrix(1, d, 4), 1, "dtype");
    r.mutable_tokens()->set_dtype(static_cast<v1::DataType>(5));
    cases.push_back({"unknown dtype", r, grpc::INVALID_ARGUMENT, "dtype 5"});
    r = Request(common::RandomMatrix(1, d, 4), 1, "rank");
    r.mutable_tokens()->add_shape(1);
    cases.push_back({"rank 3", r, grpc::INVALID_ARGUMENT, "must be [N, 32]"});
  }
  for (const Case& c : cases) {
    v1::InferResponse resp;
    grpc::Status st = Infer(stub.get(), c.req, &resp);
    EXPECT_EQ(st.error_code(), c.code) << c.name << ": " << st.error_message();
    EXPECT_NE(st.error_message().find(c.needle), std::string::npos)
        << c.name << ": " << st.error_message();
  }
  // On a stream, a bad request gets an error response and the others go through.
  grpc::ClientContext ctx;
  auto stream = stub->InferStream(&ctx);
  const std::vector<float> good = common::RandomMatrix(3, d, 5);
  ASSERT_TRUE(stream->Write(Request(good, 3, "a")));
  ASSERT_TRUE(stream->Write(cases[1].req));
  ASSERT_TRUE(stream->Write(Request(good, 3, "c")));
  stream->WritesDone();
  std::vector<v1::InferResponse> got(3);
  for (auto& r : got) ASSERT_TRUE(stream->Read(&r));
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(got[0].code(), 0);
  EXPECT_EQ(got[1].code(), grpc::INVALID_ARGUMENT);
  EXPECT_NE(got[1].message().find("NaN"), std::string::npos);
  EXPECT_EQ(got[2].code(), 0);
  EXPECT_TRUE(Matches(good, 3, got[2], *layer_));
  // TrainStep's inputs are checked the same way, and nothing trains on them.
  struct TrainCase {
    const char* name;
    int64_t n_dy;     // rows of grad_output (tokens have 3)
    int nan_at;       // an element of grad_output set to NaN, or -1
    float lr, aux, z;
    const char* needle;
  };
  const TrainCase train_cases[] = {
      {"grad_output rows", 2, -1, 0.1f, 0, 0, "grad_output has 2 rows, tokens has 3"},
      {"grad_output NaN", 3, d + 1, 0.1f, 0, 0, "grad_output[1, 1] is NaN"},
      {"learning rate", 3, -1, INFINITY, 0, 0,
       "learning_rate must be a finite number >= 0, got inf"},
      {"negative learning rate", 3, -1, -0.5f, 0, 0,
       "learning_rate must be a finite number >= 0, got -0.5"},
      {"negative aux coefficient", 3, -1, 0.1f, -1, 0,
       "aux_loss_coef must be a finite number >= 0, got -1"},
      {"z coefficient NaN", 3, -1, 0.1f, 0, std::nanf(""),
       "z_loss_coef must be a finite number >= 0, got nan"},
  };
  for (const TrainCase& c : train_cases) {
    v1::TrainStepRequest req;
    common::EncodeTensor(good, {3, d}, common::WireType::kFloat32, req.mutable_tokens());
    std::vector<float> dy = common::RandomMatrix(c.n_dy, d, 6);
    if (c.nan_at >= 0) dy[c.nan_at] = std::nanf("");
    common::EncodeTensor(dy, {c.n_dy, d}, common::WireType::kFloat32, req.mutable_grad_output());
    req.set_learning_rate(c.lr);
    req.set_aux_loss_coef(c.aux);
    req.set_z_loss_coef(c.z);
    grpc::ClientContext tctx;
    v1::TrainStepResponse tresp;
    const grpc::Status st = stub->TrainStep(&tctx, req, &tresp);
    EXPECT_EQ(st.error_code(), grpc::INVALID_ARGUMENT) << c.name << ": " << st.error_message();
    EXPECT_NE(st.error_message().find(c.needle), std::string::npos)
        << c.name << ": " << st.error_message();
  }
  // The router still serves after all of that, with the checkpoint's weights.
  v1::InferResponse resp;
  EXPECT_TRUE(Infer(stub.get(), Request(good, 3, "after"), &resp).ok());
  EXPECT_TRUE(Matches(good, 3, resp, *layer_));
}

TEST_F(ClusterTest, ClientDeadlineReachesTheShards) {
  const int metrics = testing::FreePortBlock(3);
  // The shards hold work for 3 s before computing; the client waits 1 s. (With 400 ms and
  // 150 ms, a TSan build under load once got the request to the router too late to send it on:
  // the shard never saw the batch it was to drop.)
  auto cluster = Start("replicated", 1, {}, {"--batch-delay-us", "3000000"}, metrics);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const std::vector<float> x = common::RandomMatrix(4, Config().d_model, 6);
  v1::InferResponse resp;
  const auto start = Clock::now();
  grpc::Status st = Infer(stub.get(), Request(x, 4, "late"), &resp, 1000);
  const double took = Since(start);
  EXPECT_EQ(st.error_code(), grpc::DEADLINE_EXCEEDED) << st.error_message();
  EXPECT_LT(took, 2.0) << "the call outlived its deadline: it waited for the shard's hold";
  // The shard dropped the queued work when the deadline passed instead of computing it: by its
  // own deadline, or by the router's cancellation, which the deadline set off (sent at once, it
  // is usually read first).
  auto dropped_by = [&](const char* reason) {
    return ScrapeMetric(metrics + 1,
                        absl::StrCat("moe_shard_rejected_batches_total{reason=\"", reason, "\"}"));
  };
  double dropped = -1;
  for (int i = 0; i < 300 && dropped < 1; ++i) {  // the hold ends about 2 s after the call
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    dropped = dropped_by("deadline") + dropped_by("cancelled");
  }
  EXPECT_GE(dropped, 1);
  EXPECT_EQ(ScrapeMetric(metrics + 1, "moe_shard_tokens_total{expert=\"0\"}"), 0);
}

// Past --max-inflight-requests the router sheds load at once with RESOURCE_EXHAUSTED instead of
// queueing without bound; the request in flight is answered, and the next one goes through.
TEST_F(ClusterTest, RequestsPastTheInFlightLimitAreShedAndTheRestServed) {
  // The shard holds each batch 3 s, so the first request is still in flight.
  auto cluster =
      Start("replicated", 1, {"--max-inflight-requests", "1"}, {"--batch-delay-us", "3000000"});
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const std::vector<float> x = common::RandomMatrix(4, Config().d_model, 41);
  grpc::Status first;
  v1::InferResponse first_resp;
  std::thread held([&] { first = Infer(stub.get(), Request(x, 4, "held"), &first_resp); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the first is at the shard
  v1::InferResponse resp;
  const auto start = Clock::now();
  const grpc::Status shed = Infer(stub.get(), Request(x, 4, "shed"), &resp);
  // At once: queued behind the first, it would take the 2.7 s the shard still holds that one.
  // The bound is far from both (under ThreadSanitizer on 2 cores a refused call took 0.28 s).
  EXPECT_LT(Since(start), 1.5);
  held.join();
  EXPECT_EQ(shed.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << shed.error_message();
  EXPECT_NE(shed.error_message().find("1 requests in flight, its limit"), std::string::npos)
      << shed.error_message();
  ASSERT_TRUE(first.ok()) << first.error_message();
  EXPECT_TRUE(Matches(x, 4, first_resp, *layer_));
  ASSERT_TRUE(Infer(stub.get(), Request(x, 4, "after"), &resp).ok());
  EXPECT_TRUE(Matches(x, 4, resp, *layer_));
}

TEST_F(ClusterTest, RouterMetricsCoverRequestsStagesExpertsAndShards) {
  const int metrics = testing::FreePortBlock(4);
  auto cluster = Start("hybrid", 2, {"--capacity-factor", "0.3"}, {}, metrics);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  std::vector<int64_t> assigned(Config().num_experts, 0);  // from the answers' routing
  int64_t dropped = 0;
  for (int i = 0; i < 5; ++i) {
    const std::vector<float> x = common::RandomMatrix(40, Config().d_model, 300 + i);
    v1::InferResponse resp;
    ASSERT_TRUE(Infer(stub.get(), Request(x, 40, "m"), &resp).ok());
    for (int e : resp.routing().expert_ids()) (e >= 0 ? assigned[e] : dropped) += 1;
  }
  v1::InferResponse resp;
  EXPECT_FALSE(Infer(stub.get(), Request({}, 0, "bad"), &resp).ok());
  {
    grpc::ClientContext ctx;
    v1::ClusterInfo info;
    ASSERT_TRUE(stub->GetClusterInfo(&ctx, v1::GetClusterInfoRequest(), &info).ok());
    grpc::ClientContext pctx;
    v1::Placement p;
    ASSERT_TRUE(stub->GetPlacement(&pctx, v1::GetPlacementRequest(), &p).ok());
    grpc::ClientContext rctx;
    v1::RebalanceRequest r;
    r.set_strategy("sharded");
    ASSERT_TRUE(stub->Rebalance(&rctx, r, &p).ok());
  }
  const std::string body = ScrapeBody(metrics);
  for (const char* series :
       {"moe_router_requests_total{code=\"OK\",method=\"Infer\"} 5",
        "moe_router_requests_total{code=\"INVALID_ARGUMENT\",method=\"Infer\"} 1",
        "moe_router_requests_total{code=\"OK\",method=\"GetClusterInfo\"} 1",
        "moe_router_requests_total{code=\"OK\",method=\"GetPlacement\"} 1",
        "moe_router_requests_total{code=\"OK\",method=\"Rebalance\"} 1",
        "moe_router_request_seconds_count{method=\"Infer\"} 6",
        "moe_router_stage_seconds_count{stage=\"gate\"} 5",
        "moe_router_stage_seconds_count{stage=\"dispatch\"} 5",
        "moe_router_stage_seconds_count{stage=\"combine\"} 5", "moe_router_tokens_total 200",
        "moe_router_placement_version 2", "moe_router_failovers_total 0",
        "moe_router_assignments_total{outcome=\"spilled\"} 0"}) {
    EXPECT_NE(body.find(std::string("\n") + series), std::string::npos) << series;
  }
  // Each expert's count is what the answers' routing says it computed; the rest were dropped.
  for (int e = 0; e < Config().num_experts; ++e) {
    EXPECT_EQ(ScrapeMetric(metrics, absl::StrCat("moe_expert_tokens_total{expert=\"", e, "\"}")),
              assigned[e])
        << "expert " << e;
  }
  EXPECT_GT(dropped, 0);
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_assignments_total{outcome=\"dropped\"}"), dropped);
  for (const std::string& shard : cluster->shard_addresses()) {
    EXPECT_EQ(ScrapeMetric(metrics, "moe_shard_up{shard=\"" + shard + "\"}"), 1) << shard;
  }
  // The shards count what they computed.
  EXPECT_GT(ScrapeMetric(metrics + 1, "moe_shard_experts_loaded"), 0);
  EXPECT_NE(ScrapeBody(metrics + 1).find("moe_shard_compute_seconds_count"), std::string::npos);
}

v1::Placement PlacementOf(v1::Router::Stub* stub) {
  grpc::ClientContext ctx;
  v1::Placement p;
  EXPECT_TRUE(stub->GetPlacement(&ctx, v1::GetPlacementRequest(), &p).ok());
  return p;
}

// The same skew leaves the placement alone within the cooldown, and below the threshold.
TEST_F(ClusterTest, DynamicPlacementHoldsStillWithinItsCooldownOrBelowItsThreshold) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{
           {"--rebalance-cooldown-s", "1000", "--dynamic-slots", "3"},
           {"--rebalance-cooldown-s", "0.2", "--dynamic-slots", "3", "--imbalance-threshold",
            "100"}}) {
    auto cluster = Start("dynamic", 4, args);
    ASSERT_NE(cluster, nullptr);
    auto stub = client::MakeRouterStub(cluster->router_address());
    const v1::Placement before = PlacementOf(stub.get());
    client::ZipfTokens gen(ck_->gate, Config().num_experts, Config().d_model, 1.5, 5);
    // Three ticks of the control loop (one a second) under the skew. In sanitizer builds a
    // request answered UNAVAILABLE is sent again for up to 3 s: there a shard can pause past the
    // 1 s keepalive timeout (seen once under TSan on two cores), its stream is broken, and the
    // experts it alone holds fail the request in flight, as they should; what this test checks is
    // the placement.
    for (const auto start = Clock::now(); Since(start) < 3.2;) {
      const std::vector<float> x = gen.Next(64);
      v1::InferResponse resp;
      grpc::Status st = Infer(stub.get(), Request(x, 64, "zipf"), &resp);
#ifdef MOE_SANITIZED
      for (const auto retry = Clock::now();
           st.error_code() == grpc::StatusCode::UNAVAILABLE && Since(retry) < 3;) {
        std::printf("sent again: %s\n", st.error_message().c_str());
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        st = Infer(stub.get(), Request(x, 64, "zipf"), &resp);
      }
#endif
      ASSERT_TRUE(st.ok()) << st.error_code() << ": " << st.error_message();
    }
    const v1::Placement after = PlacementOf(stub.get());
    EXPECT_EQ(after.version(), before.version()) << absl::StrJoin(args, " ");
    // The skew was there: past the default threshold of 0.2.
    EXPECT_GT(after.imbalance(), 0.2) << absl::StrJoin(args, " ");
  }
}

TEST_F(ClusterTest, DynamicPlacementRebalancesItselfUnderSkew) {
  auto cluster = Start("dynamic", 4,
                       {"--rebalance-cooldown-s", "0.2", "--dynamic-slots", "3",
                        "--imbalance-threshold", "0.2"});
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  auto placement = [&] { return PlacementOf(stub.get()); };
  const v1::Placement before = placement();
  // Expert 0 of a Zipf(1.5) popularity gets most of the tokens.
  client::ZipfTokens gen(ck_->gate, Config().num_experts, Config().d_model, 1.5, 5);
  const auto start = Clock::now();
  v1::Placement now = before;
  int sent = 0;
  while (Since(start) < 15 && now.version() == before.version()) {
    const std::vector<float> x = gen.Next(64);
    v1::InferResponse resp;
    ASSERT_TRUE(Infer(stub.get(), Request(x, 64, "zipf"), &resp).ok());
    EXPECT_TRUE(Matches(x, 64, resp, *layer_));
    ++sent;
    if (sent % 10 == 0) now = placement();
  }
  EXPECT_GT(now.version(), before.version()) << "no rebalance after " << sent << " requests";
  EXPECT_EQ(now.strategy(), "dynamic");
  // The hottest expert got more replicas than the coldest, and the expected imbalance is low.
  int hot = 0;
  double hot_load = -1;
  for (const auto& e : now.experts()) {
    if (e.load() > hot_load) {
      hot_load = e.load();
      hot = e.expert();
    }
  }
  EXPECT_GT(now.experts(hot).shards_size(), 1);
  EXPECT_LT(now.imbalance(), 0.2);
}

// Starts moe-coordinator, a router following its membership, and `shards` shards that register.
struct MembershipCluster {
  common::Subprocess coordinator, router;
  std::vector<common::Subprocess> shards;
  std::vector<std::string> shard_addrs;  // of `shards`
  std::string coordinator_addr, router_addr;

  // A shard that registers; with `failpoint`, started with MOE_FAILPOINT=failpoint.
  absl::Status AddShard(const std::string& checkpoint, const std::string& failpoint = "") {
    if (!failpoint.empty() && setenv("MOE_FAILPOINT", failpoint.c_str(), 1) != 0) {
      return absl::InternalError("setenv MOE_FAILPOINT failed");
    }
    auto p = common::Subprocess::Spawn({MOE_BIN_DIR "/moe-expert-server", "--checkpoint",
                                        checkpoint, "--host", "127.0.0.1", "--port", "0",
                                        "--experts", "none", "--coordinator", coordinator_addr});
    if (!failpoint.empty()) unsetenv("MOE_FAILPOINT");
    if (!p.ok()) return p.status();
    auto port = p->ReadListeningPort(absl::Seconds(30));
    if (!port.ok()) return port.status();
    shards.push_back(std::move(*p));
    shard_addrs.push_back(absl::StrCat("127.0.0.1:", *port));
    return absl::OkStatus();
  }

  // The coordinator (members leave 1 s after their last heartbeat), `n` shards, and a router
  // following the membership with `placement` (and `router_args`).
  absl::Status Start(const std::string& checkpoint, int n, const std::string& placement,
                     const std::vector<std::string>& router_args = {}) {
    auto c = common::Subprocess::Spawn({MOE_BIN_DIR "/moe-coordinator", "--host", "127.0.0.1",
                                        "--port", "0", "--lease-ms", "1000"});
    if (!c.ok()) return c.status();
    coordinator = std::move(*c);
    auto cport = coordinator.ReadListeningPort(absl::Seconds(30));
    if (!cport.ok()) return cport.status();
    coordinator_addr = absl::StrCat("127.0.0.1:", *cport);
    for (int i = 0; i < n; ++i) RETURN_IF_ERROR(AddShard(checkpoint));
    std::vector<std::string> args = {MOE_BIN_DIR "/moe-router",
                                     "--checkpoint",
                                     checkpoint,
                                     "--host",
                                     "127.0.0.1",
                                     "--port",
                                     "0",
                                     "--coordinator",
                                     coordinator_addr,
                                     "--placement",
                                     placement};
    args.insert(args.end(), router_args.begin(), router_args.end());
    auto r = common::Subprocess::Spawn(args);
    if (!r.ok()) return r.status();
    router = std::move(*r);
    auto rport = router.ReadListeningPort(absl::Seconds(30));
    if (!rport.ok()) return rport.status();
    router_addr = absl::StrCat("127.0.0.1:", *rport);
    return absl::OkStatus();
  }
};

// One TrainStep of 24 random tokens (from `seed`).
grpc::Status Train(v1::Router::Stub* stub, uint64_t seed, int deadline_ms,
                   float learning_rate = 0.1f, v1::TrainStepResponse* out = nullptr) {
  v1::TrainStepRequest req;
  common::EncodeTensor(common::RandomMatrix(24, Config().d_model, seed), {24, Config().d_model},
                       common::WireType::kFloat32, req.mutable_tokens());
  common::EncodeTensor(common::RandomMatrix(24, Config().d_model, seed + 1),
                       {24, Config().d_model}, common::WireType::kFloat32,
                       req.mutable_grad_output());
  req.set_learning_rate(learning_rate);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
  v1::TrainStepResponse resp;
  return stub->TrainStep(&ctx, req, out != nullptr ? out : &resp);
}

// Training calls block for as long as a step takes; inference must not wait behind them. With
// the coordinator stopped, four steps wait (one on the coordinator, three for the first) while a
// batch large enough to be gated on the router's worker pool, here of 2 threads, is served.
TEST_F(ClusterTest, TrainingCallsStuckOnAStoppedCoordinatorDoNotHoldUpInference) {
  auto cluster = Start("replicated", 2, {"--threads", "2"});
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  cluster->coordinator().Signal(SIGSTOP);
  std::atomic<int> answered{0};
  std::vector<std::thread> steps;
  for (int i = 0; i < 4; ++i) {
    steps.emplace_back([&, i] {
      Train(stub.get(), 8200 + 10 * i, 6000, 0.01f);  // fails: its outcome is not the point
      ++answered;
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const int64_t n = 300;  // over the router's inline limit of 256 tokens
  const std::vector<float> x = common::RandomMatrix(n, Config().d_model, 8300);
  v1::InferResponse resp;
  const grpc::Status st = Infer(stub.get(), Request(x, n, "beside-training"), &resp, 3000);
  const int answered_by_then = answered.load();
  cluster->coordinator().Signal(SIGCONT);
  for (auto& t : steps) t.join();
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(Matches(x, n, resp, *layer_));
  // At least two were still waiting: on a shared pool they would hold both of its threads.
  EXPECT_LE(answered_by_then, 2) << "the steps did not wait, so the test showed nothing";
}

// SaveCheckpoint to a temporary file `name`.
grpc::Status SaveTo(v1::Router::Stub* stub, const std::string& name,
                    v1::SaveCheckpointResponse* resp) {
  grpc::ClientContext ctx;
  v1::SaveCheckpointRequest req;
  req.set_path(moe::testing::TempPath(name));
  return stub->SaveCheckpoint(&ctx, req, resp);
}

// SaveTo; expects every expert's replicas identical and returns the checkpoint read back.
absl::StatusOr<common::Checkpoint> SaveIdentical(v1::Router::Stub* stub, const std::string& name) {
  v1::SaveCheckpointResponse resp;
  grpc::Status st = SaveTo(stub, name, &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(resp.replicas_identical())
      << "replicas differ for experts " << absl::StrJoin(resp.divergent_experts(), ", ");
  return common::LoadCheckpoint(moe::testing::TempPath(name), {});
}

int ShardCount(v1::Router::Stub* stub, bool healthy_only) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  v1::ClusterInfo info;
  if (!stub->GetClusterInfo(&ctx, v1::GetClusterInfoRequest(), &info).ok()) return -1;
  int n = 0;
  for (const auto& s : info.shards()) n += !healthy_only || s.healthy();
  return n;
}

// Seconds until the router has exactly `shards` shards, all in rotation; -1 after `seconds`.
double WaitForShards(v1::Router::Stub* stub, int shards, double seconds) {
  const auto start = Clock::now();
  while (Since(start) < seconds) {
    if (ShardCount(stub, true) == shards && ShardCount(stub, false) == shards) {
      return Since(start);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return -1.0;
}



bool SameWeights(const common::ExpertWeights& x, const common::ExpertWeights& y) {
  return x.w1 == y.w1 && x.w2 == y.w2 && x.w3 == y.w3 && x.b1 == y.b1 && x.b2 == y.b2 &&
         x.b3 == y.b3;
}

// Every weight of `a` and `b`, the gate's and each expert's, bit for bit.
void ExpectSameWeights(const common::Checkpoint& a, const common::Checkpoint& b) {
  EXPECT_EQ(a.gate.weight, b.gate.weight);
  EXPECT_EQ(a.gate.bias, b.gate.bias);
  ASSERT_EQ(a.experts.size(), b.experts.size());
  for (size_t e = 0; e < a.experts.size(); ++e) {
    EXPECT_TRUE(SameWeights(a.experts[e], b.experts[e])) << "expert " << e << " differs";
  }
}

// SaveCheckpoint with a shard gone: the experts it held have live replicas elsewhere, which the
// checkpoint is read from; the dead shard's replicas are reported as unread, not an error.
TEST_F(ClusterTest, SaveCheckpointReadsTheLiveReplicasOfAKilledShard) {
  auto cluster = Start("replicated", 3);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const std::string dead = cluster->shard_addresses()[2];
  cluster->shard(2).Signal(SIGKILL);
  for (int i = 0; i < 100 && ShardCount(stub.get(), true) != 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(ShardCount(stub.get(), true), 2) << "the killed shard never left rotation";
  v1::SaveCheckpointResponse resp;
  const grpc::Status st = SaveTo(stub.get(), "live_replicas", &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(resp.replicas_identical());
  ASSERT_EQ(resp.unread_replicas_size(), Config().num_experts) << "one per expert on " << dead;
  for (int e = 0; e < Config().num_experts; ++e) {
    EXPECT_EQ(resp.unread_replicas(e).rfind(absl::StrCat("expert ", e, " on ", dead, ": "), 0), 0u)
        << resp.unread_replicas(e);
  }
  absl::StatusOr<common::Checkpoint> saved =
      common::LoadCheckpoint(moe::testing::TempPath("live_replicas"), {});
  ASSERT_TRUE(saved.ok()) << saved.status();
  for (int e = 0; e < Config().num_experts; ++e) {
    EXPECT_TRUE(SameWeights(saved->experts[e], ck_->experts[e]))
        << "expert " << e << " differs from the checkpoint's";
  }
}

TEST_F(ClusterTest, RouterFollowsMembershipAndTrainingSurvivesAShardLoss) {
  MembershipCluster mc;
  const int metrics = testing::FreePortBlock(1);
  ASSERT_TRUE(mc.Start(*path_, 2, "replicated", {"--metrics-port", std::to_string(metrics)}).ok());
  auto shard_up = [&](const std::string& shard) {
    return ScrapeMetric(metrics, "moe_shard_up{shard=\"" + shard + "\"}");
  };
  auto stub = client::MakeRouterStub(mc.router_addr);
  auto wait_for = [&](int shards, double seconds) {
    return WaitForShards(stub.get(), shards, seconds);
  };
  ASSERT_GE(wait_for(2, 20), 0) << "the router did not pick up the two shards";
  // A shard that joins is seen without restarts.
  ASSERT_TRUE(mc.AddShard(*path_).ok());
  EXPECT_GE(wait_for(3, 10), 0) << "the third shard was not picked up";
  const std::vector<float> x = common::RandomMatrix(16, Config().d_model, 61);
  v1::InferResponse resp;
  ASSERT_TRUE(Infer(stub.get(), Request(x, 16, "m"), &resp).ok());
  EXPECT_TRUE(Matches(x, 16, resp, *layer_));
  // Train one step on three replicas.
  auto train = [&](uint64_t seed, int deadline_ms) { return Train(stub.get(), seed, deadline_ms); };
  auto save = [&](const std::string& name) { return SaveIdentical(stub.get(), name); };
  ASSERT_TRUE(train(100, 20000).ok());
  auto before = save("member_before.safetensors");
  ASSERT_TRUE(before.ok());
  // A stalled shard makes the next step abort in time, and no weight changes anywhere.
  mc.shards[2].Signal(SIGSTOP);
  const auto start = Clock::now();
  grpc::Status st = train(200, 3000);
  EXPECT_FALSE(st.ok());
  EXPECT_LT(Since(start), 3.5);
  mc.shards[2].Signal(SIGCONT);
  EXPECT_GE(wait_for(3, 10), 0);
  auto unchanged = save("member_unchanged.safetensors");
  ASSERT_TRUE(unchanged.ok());
  ExpectSameWeights(*unchanged, *before);
  for (const std::string& shard : mc.shard_addrs) EXPECT_EQ(shard_up(shard), 1) << shard;
  // A shard that leaves is seen too, and training goes on with the others.
  mc.shards[0].Signal(SIGKILL);
  EXPECT_GE(wait_for(2, 10), 0) << "the killed shard did not leave the membership";
  EXPECT_EQ(ShardCount(stub.get(), false), 2);
  // Its moe_shard_up is gone with it (an alert on moe_shard_up == 0 would fire for good after
  // a planned scale-down); the others' stay.
  EXPECT_EQ(shard_up(mc.shard_addrs[0]), -1) << "the departed shard still has moe_shard_up";
  EXPECT_EQ(shard_up(mc.shard_addrs[1]), 1);
  EXPECT_EQ(shard_up(mc.shard_addrs[2]), 1);
  st = train(300, 20000);
  EXPECT_TRUE(st.ok()) << st.error_message();
  auto after = save("member_after.safetensors");
  ASSERT_TRUE(after.ok());
  EXPECT_NE(after->experts[0].w1, before->experts[0].w1);
  ASSERT_TRUE(Infer(stub.get(), Request(x, 16, "m2"), &resp).ok());
}

// Under `sharded` every expert has one replica. After training, a shard that leaves for good
// takes its experts' training with it: once the membership has dropped it, the router places
// them on the others from the checkpoint (reported as lost training) instead of waiting for
// ever, and serving and training go on.
TEST_F(ClusterTest, ExpertsOfAShardThatLeftForGoodAreReloadedAndTrainingGoesOn) {
  MembershipCluster mc;
  ASSERT_TRUE(mc.Start(*path_, 3, "sharded").ok());
  auto stub = client::MakeRouterStub(mc.router_addr);
  ASSERT_GE(WaitForShards(stub.get(), 3, 20), 0) << "the router did not pick up three shards";
  ASSERT_TRUE(Train(stub.get(), 400, 20000).ok());
  mc.shards[0].Signal(SIGKILL);
  EXPECT_GE(WaitForShards(stub.get(), 2, 15), 0) << "the router kept the shard that left";
  const std::vector<float> x = common::RandomMatrix(16, Config().d_model, 71);
  v1::InferResponse resp;
  const grpc::Status served = Infer(stub.get(), Request(x, 16, "left"), &resp);
  EXPECT_TRUE(served.ok()) << served.error_message();
  const grpc::Status trained = Train(stub.get(), 401, 20000);
  EXPECT_TRUE(trained.ok()) << trained.error_message();
  // A checkpoint saved now names the experts that lost their training: those the killed
  // shard held (sharded over 3 shards: some, not all).
  v1::SaveCheckpointResponse saved;
  const grpc::Status st = SaveTo(stub.get(), "left_for_good.safetensors", &saved);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_GT(saved.lost_training_experts_size(), 0);
  EXPECT_LT(saved.lost_training_experts_size(), Config().num_experts);
}

// A member the router cannot reach (it registered with the coordinator and heartbeats, but its
// address does not answer the router) would fail every switch at the load: before 2026-12-02
// the router tried one each second, and each took a placement version. Now it waits, and the
// next real change (a shard that joins) is the next version.
TEST_F(ClusterTest, AMemberTheRouterCannotReachTakesNoPlacementVersion) {
  MembershipCluster mc;
  ASSERT_TRUE(mc.Start(*path_, 2, "replicated").ok());
  auto stub = client::MakeRouterStub(mc.router_addr);
  ASSERT_GE(WaitForShards(stub.get(), 2, 20), 0) << "the router did not pick up two shards";
  auto version = [&]() -> uint64_t {
    grpc::ClientContext ctx;
    v1::Placement p;
    return stub->GetPlacement(&ctx, v1::GetPlacementRequest(), &p).ok() ? p.version() : 0;
  };
  const uint64_t before = version();
  ASSERT_GT(before, 0u);
  auto coordinator = v1::Coordinator::NewStub(
      grpc::CreateChannel(mc.coordinator_addr, grpc::InsecureChannelCredentials()));
  const std::string ghost = "127.0.0.1:1";  // nothing listens there
  auto join = [&] {
    grpc::ClientContext ctx;
    v1::RegisterRequest req;
    req.set_address(ghost);
    v1::RegisterResponse resp;
    return coordinator->Register(&ctx, req, &resp).ok();
  };
  ASSERT_TRUE(join());
  // Kept a member for 3.5 s (the router's control loop looks every second), then let go. A
  // heartbeat late past the 1 s lease (a loaded or instrumented run) registers it again.
  for (int i = 0; i < 14; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    grpc::ClientContext ctx;
    v1::HeartbeatRequest req;
    req.set_address(ghost);
    v1::HeartbeatResponse resp;
    ASSERT_TRUE(coordinator->Heartbeat(&ctx, req, &resp).ok());
    if (!resp.known()) {
      ASSERT_TRUE(join());
    }
  }
  const std::vector<float> x = common::RandomMatrix(16, Config().d_model, 73);
  v1::InferResponse resp;
  ASSERT_TRUE(Infer(stub.get(), Request(x, 16, "ghost"), &resp).ok());
  EXPECT_TRUE(Matches(x, 16, resp, *layer_));
  EXPECT_EQ(version(), before);
  ASSERT_TRUE(mc.AddShard(*path_).ok());
  ASSERT_GE(WaitForShards(stub.get(), 3, 20), 0) << "the third shard was not picked up";
  EXPECT_EQ(version(), before + 1) << "placement versions were spent on the unreachable member";
}

// A rank lost during a training step's reduction: killed mid all-reduce, stopped with SIGSTOP
// mid all-reduce, or gone before the first message (MOE_FAILPOINT in one shard's environment
// picks the moment, see shard_server.cc). The step fails with ABORTED long before its deadline,
// no weight changes anywhere, and once the membership has settled the next step trains every
// replica alike.
class RingFaultTest : public ClusterTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(RingFaultTest, ARankLostDuringTheReductionAbortsTheStepInTime) {
  const std::string failpoint = GetParam();
  const bool stall = failpoint == "reduce_stall_mid_ring";
  MembershipCluster mc;
  ASSERT_TRUE(mc.Start(*path_, 2, "replicated").ok());
  const absl::Status third = mc.AddShard(*path_, failpoint);
  ASSERT_TRUE(third.ok()) << third;
  auto stub = client::MakeRouterStub(mc.router_addr);
  ASSERT_GE(WaitForShards(stub.get(), 3, 20), 0) << "the router did not pick up three shards";
  absl::StatusOr<common::Checkpoint> before = SaveIdentical(stub.get(), failpoint + "_0");
  ASSERT_TRUE(before.ok()) << before.status();

  // The step is aborted everywhere as soon as one member's reduction fails (the coordinator
  // aborts the step on every shard, which breaks the reductions still waiting there), well
  // before its deadline: at once when the rank died, within the keepalive timeout (1.5 s) when
  // it stalled. The deadline (8 s) only bounds what the test waits.
  constexpr int kDeadlineMs = 8000;
  const auto start = Clock::now();
  grpc::Status st = Train(stub.get(), 8000, kDeadlineMs);
  const double took = Since(start);
  std::fprintf(stderr, "%s: the step failed after %.2f s: %s\n", failpoint.c_str(), took,
               st.error_message().c_str());
  EXPECT_EQ(st.error_code(), grpc::StatusCode::ABORTED) << st.error_message();
  EXPECT_NE(st.error_message().find("aborted, no weight changed"), std::string::npos)
      << st.error_message();
  EXPECT_LT(took, stall ? 4.0 : 2.0);
  if (stall) {
    mc.shards[2].Signal(SIGCONT);
  } else {
    EXPECT_TRUE(mc.shards[2].Wait(absl::Seconds(5)).ok()) << "the failpoint did not fire";
  }
  ASSERT_GE(WaitForShards(stub.get(), stall ? 3 : 2, 20), 0) << "the membership did not settle";
  absl::StatusOr<common::Checkpoint> unchanged = SaveIdentical(stub.get(), failpoint + "_1");
  ASSERT_TRUE(unchanged.ok()) << unchanged.status();
  ExpectSameWeights(*unchanged, *before);

  // The next step succeeds (a shard's last step may still be ending: retried for a while).
  st = Train(stub.get(), 8100, 20000);
  for (const auto again = Clock::now(); !st.ok() && Since(again) < 20;
       st = Train(stub.get(), 8100, 20000)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(st.ok()) << st.error_message();
  absl::StatusOr<common::Checkpoint> after = SaveIdentical(stub.get(), failpoint + "_2");
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_NE(after->gate.weight, before->gate.weight);
  int trained = 0;  // an expert that got no token keeps its weights
  for (int e = 0; e < Config().num_experts; ++e) {
    trained += after->experts[e].w1 != before->experts[e].w1;
  }
  EXPECT_GT(trained, Config().num_experts / 2);
}

INSTANTIATE_TEST_SUITE_P(Failpoints, RingFaultTest,
                         ::testing::Values("reduce_exit_before_ring", "reduce_exit_mid_ring",
                                           "reduce_stall_mid_ring"),
                         [](const ::testing::TestParamInfo<const char*>& info) {
                           return std::string(info.param);
                         });

// A trained cluster whose shards all hold their experts copies none of them. The router's control
// loop once read every shard's status as empty, so each second it saw every expert missing
// everywhere and copied them all again from a peer, also while a step was committing: a replica
// could then miss that step's update (the replicas differed after some steps under load).
TEST_F(ClusterTest, ATrainedClusterWithEveryShardWholeCopiesNoExpert) {
  const int metrics = testing::FreePortBlock(5);
  auto cluster = Start("replicated", 3, {}, {}, metrics);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  // Steps back to back for 3 s, so that about three ticks of the control loop (1 s) fall among
  // them, at least 5 steps.
  const auto start = Clock::now();
  int steps = 0;
  while (Since(start) < 3.0 || steps < 5) {
    // A small rate: random gradients at 0.1 drive the weights to NaN within 100 steps.
    grpc::Status st = Train(stub.get(), 1000 + 2 * steps, 20000, 0.005f);
    ASSERT_TRUE(st.ok()) << "step " << steps << ": " << st.error_message();
    ++steps;
  }
  absl::StatusOr<common::Checkpoint> saved = SaveIdentical(stub.get(), "whole_cluster.safetensors");
  ASSERT_TRUE(saved.ok()) << saved.status();
  for (int e = 0; e < Config().num_experts; ++e) {
    EXPECT_NE(saved->experts[e].w1, ck_->experts[e].w1) << "expert " << e << " did not train";
    for (float v : saved->experts[e].w1) ASSERT_TRUE(std::isfinite(v)) << "expert " << e;
  }
  for (int s = 0; s < 3; ++s) {
    const std::string body = ScrapeBody(metrics + 1 + s);
    EXPECT_EQ(testing::MetricValue(body, "moe_shard_expert_loads_total{source=\"checkpoint\"}"),
              Config().num_experts)
        << "shard " << s;
    EXPECT_EQ(testing::MetricValue(body, "moe_shard_expert_loads_total{source=\"peer\"}"), 0)
        << "shard " << s << " copied experts during " << steps << " steps";
  }
}

// One training step at a small rate (seed `seed`), sent again every 20 ms for up to 20 s while
// its answer is UNAVAILABLE and `refused` (if set) says that answer is a refusal that changed
// nothing; each refusal is printed.
grpc::Status TrainWhileRefused(v1::Router::Stub* stub, uint64_t seed,
                               const std::function<bool(const grpc::Status&)>& refused,
                               v1::TrainStepResponse* out) {
  const auto start = Clock::now();
  grpc::Status st = Train(stub, seed, 20000, 0.005f, out);
  while (st.error_code() == grpc::StatusCode::UNAVAILABLE && (!refused || refused(st)) &&
         Since(start) < 20) {
    std::fprintf(stderr, "step of seed %llu refused, sent again: %s\n",
                 static_cast<unsigned long long>(seed), st.error_message().c_str());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    st = Train(stub, seed, 20000, 0.005f, out);
  }
  return st;
}

// `n` training steps at a small rate, seeded `first_seed`, `first_seed` + 1, ...; the first that
// fails is named. A step refused because a shard is out of rotation (it changes nothing) is sent
// again for up to 20 s, as `moe-client train` does: on a loaded machine (ThreadSanitizer) two of
// a shard's health checks in a row can time out, and the router's log then says so ("shard ...
// is out of rotation: ...").
absl::Status TrainSteps(v1::Router::Stub* stub, uint64_t first_seed, int n) {
  for (int step = 0; step < n; ++step) {
    const grpc::Status st = TrainWhileRefused(stub, first_seed + step, [](const grpc::Status& s) {
      return s.error_message().find("out of rotation: the step could not commit") !=
             std::string::npos;
    });
    if (!st.ok()) {
      const absl::Status failed = common::FromGrpcStatus(st);
      return absl::Status(failed.code(), absl::StrCat("step ", step, ": ", failed.message()));
    }
  }
  return absl::OkStatus();
}

// Kills shard `s` and starts it again on its port, then trains one step (seed `seed`) as soon as
// the router takes steps again (UNAVAILABLE until the shard is back in rotation).
absl::Status KillRestartAndTrain(client::LocalCluster& cluster, int s, v1::Router::Stub* stub,
                                 uint64_t seed, v1::TrainStepResponse* out = nullptr) {
  cluster.shard(s).Signal(SIGKILL);
  if (!cluster.shard(s).Wait(absl::Seconds(5)).ok()) {
    return absl::DeadlineExceededError("the killed shard did not exit");
  }
  RETURN_IF_ERROR(cluster.RestartShard(s));
  return common::FromGrpcStatus(TrainWhileRefused(stub, seed, nullptr, out));
}

// A shard of a trained cluster killed and started again with --experts all (as Kubernetes and
// compose start shards) comes back READY with the checkpoint's weights, at training step 0. The
// next step, sent as soon as the router takes the shard back, must not train those weights as
// if they were current (it would stamp its step on them, and no later check could tell): the
// router copies the replicas behind their expert's latest step from a trained one first, and
// the replicas end identical and trained.
TEST_F(ClusterTest, AShardBackWithTheCheckpointsWeightsIsCopiedFromATrainedReplica) {
  const int metrics = testing::FreePortBlock(5);
  auto cluster = Start("replicated", 3, {}, {"--experts", "all"}, metrics);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const absl::Status trained = TrainSteps(stub.get(), 3000, 3);
  ASSERT_TRUE(trained.ok()) << trained;
  const absl::Status next = KillRestartAndTrain(*cluster, 1, stub.get(), 3050);
  ASSERT_TRUE(next.ok()) << next;
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_stale_replicas_total"), Config().num_experts)
      << "the router did not copy the restarted shard's experts again";
  EXPECT_EQ(ScrapeMetric(metrics + 2, "moe_shard_expert_loads_total{source=\"peer\"}"),
            Config().num_experts);
  absl::StatusOr<common::Checkpoint> saved = SaveIdentical(stub.get(), "stale_back.safetensors");
  ASSERT_TRUE(saved.ok()) << saved.status();
  for (int e = 0; e < Config().num_experts; ++e) {
    EXPECT_NE(saved->experts[e].w1, ck_->experts[e].w1) << "expert " << e << " lost its training";
  }
  // And the next step trains every replica alike.
  ASSERT_TRUE(Train(stub.get(), 3100, 20000, 0.005f).ok());
  EXPECT_TRUE(SaveIdentical(stub.get(), "stale_back_next.safetensors").ok());
}

// Under `sharded`, a trained expert's only replica that restarts with --experts all has nothing
// to be copied from: the router cannot bring the training back, but says so (a log line and
// moe_router_experts_lost_training_total, once per expert) instead of training on silently.
TEST_F(ClusterTest, AnExpertWhoseOnlyReplicaRestartedIsReportedAsHavingLostItsTraining) {
  const int metrics = testing::FreePortBlock(4);
  auto cluster = Start("sharded", 2, {}, {"--experts", "all"}, metrics);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const absl::Status trained = TrainSteps(stub.get(), 4000, 2);
  ASSERT_TRUE(trained.ok()) << trained;
  const std::string lost = "moe_router_experts_lost_training_total";
  EXPECT_EQ(ScrapeMetric(metrics, lost), 0);
  const auto [on_killed, shared] = OnlyAndSharedOn(stub.get(), 0);
  ASSERT_FALSE(on_killed.empty());
  ASSERT_TRUE(shared.empty());
  v1::TrainStepResponse after;
  const absl::Status next = KillRestartAndTrain(*cluster, 0, stub.get(), 4050, &after);
  ASSERT_TRUE(next.ok()) << next;
  // Shard 0 held half of the experts, each its only replica. The step after names them.
  EXPECT_EQ(ScrapeMetric(metrics, lost), Config().num_experts / 2);
  EXPECT_EQ(
      std::set<int>(after.lost_training_experts().begin(), after.lost_training_experts().end()),
      on_killed);
  v1::TrainStepResponse later;
  ASSERT_TRUE(Train(stub.get(), 4060, 20000, 0.005f, &later).ok());
  EXPECT_EQ(ScrapeMetric(metrics, lost), Config().num_experts / 2) << "reported once per expert";
  EXPECT_EQ(later.lost_training_experts_size(), 0) << "named to one step only";
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_stale_replicas_total"), 0) << "no copy to make";
}

// The experts placed on shard `s` alone, and those placed on it and elsewhere.
std::pair<std::set<int>, std::set<int>> OnlyAndSharedOn(v1::Router::Stub* stub, int s) {
  grpc::ClientContext ctx;
  v1::Placement p;
  std::pair<std::set<int>, std::set<int>> out;
  if (!stub->GetPlacement(&ctx, v1::GetPlacementRequest(), &p).ok()) return out;
  for (const v1::ExpertPlacement& ep : p.experts()) {
    if (std::find(ep.shards().begin(), ep.shards().end(), s) == ep.shards().end()) continue;
    (ep.shards_size() == 1 ? out.first : out.second).insert(ep.expert());
  }
  return out;
}

std::map<int, uint64_t> TrainedSteps(const std::string& address);
uint64_t SavedStep(const std::string& path);

// moe-cluster starts its shards with --experts none, so one that is killed and started again
// comes back empty. After training, the experts it held alone (half of `hybrid`'s) have no
// replica to be copied from: the shard loads them as at start, from the checkpoint (the router
// reports the training of those that had any lost, once per expert) or, with --state-dir, from
// its state dir (nothing lost). The router used to leave them unloaded for good (every request
// gating to one failed UNAVAILABLE "expert 8 is not loaded on this shard"). Those another shard
// holds are copied from it, trained.
TEST_F(ClusterTest, AShardRestartedEmptyAfterTrainingGetsEveryExpertBack) {
  for (const bool keep : {false, true}) {
    SCOPED_TRACE(keep ? "with --state-dir" : "without a state dir");
    const int metrics = testing::FreePortBlock(4);
    client::LocalClusterOptions o;
    o.shards = 2;
    o.placement = "hybrid";
    o.metrics_port = metrics;
    if (keep) o.state_dir = testing::TempPath("restarted_empty_state");
    auto cluster = StartWith(o);
    ASSERT_NE(cluster, nullptr);
    auto stub = client::MakeRouterStub(cluster->router_address());
    const auto [alone, shared] = OnlyAndSharedOn(stub.get(), 0);
    ASSERT_FALSE(alone.empty());
    ASSERT_FALSE(shared.empty());
    const absl::Status trained = TrainSteps(stub.get(), 5000, 2);
    ASSERT_TRUE(trained.ok()) << trained;
    // The experts shard 0 held alone that training moved (an expert given no rows stays at 0).
    int moved = 0;
    const std::map<int, uint64_t> before = TrainedSteps(cluster->shard_addresses()[0]);
    for (const auto& [e, step] : before) {
      if (!alone.count(e) || step == 0) continue;
      ++moved;
      if (!keep) continue;
      // Written to the state dir in the background: wait for it before the kill.
      const std::string file = absl::StrCat(o.state_dir, "/shard-0/expert-", e, ".safetensors");
      const auto start = Clock::now();
      while (SavedStep(file) != step && Since(start) < 10) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      ASSERT_EQ(SavedStep(file), step) << file;
    }
    ASSERT_GT(moved, 0);
    const absl::Status next = KillRestartAndTrain(*cluster, 0, stub.get(), 5050);
    ASSERT_TRUE(next.ok()) << next;
    const std::string lost = "moe_router_experts_lost_training_total";
    EXPECT_EQ(ScrapeMetric(metrics, lost), keep ? 0 : moved);
    // Shard 0 holds its whole placement again, every expert at the latest step, as on shard 1.
    const std::map<int, uint64_t> steps = TrainedSteps(cluster->shard_addresses()[0]);
    const std::map<int, uint64_t> other = TrainedSteps(cluster->shard_addresses()[1]);
    ASSERT_FALSE(other.empty());
    uint64_t latest = 0;
    for (const auto& [e, step] : other) latest = std::max(latest, step);
    for (const std::set<int>& experts : {alone, shared}) {
      for (int e : experts) {
        ASSERT_TRUE(steps.count(e)) << "expert " << e << " is not loaded on the restarted shard";
        EXPECT_LE(steps.at(e), latest) << "expert " << e;
        if (shared.count(e)) {
          EXPECT_EQ(steps.at(e), other.at(e)) << "expert " << e << ": copied from shard 1";
        } else if (keep) {
          EXPECT_GE(steps.at(e), before.at(e)) << "expert " << e << ": read back from the state dir";
        }
      }
    }
    // Every expert answers.
    const auto x = common::RandomMatrix(64, Config().d_model, 5100);
    v1::InferResponse resp;
    grpc::Status st = Infer(stub.get(), Request(x, 64, "after"), &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    ASSERT_TRUE(Train(stub.get(), 5060, 20000, 0.005f).ok());
    EXPECT_EQ(ScrapeMetric(metrics, lost), keep ? 0 : moved) << "reported once per expert";
  }
}

// Whether the router lists shard `s` out of rotation within 10 s.
bool WaitOutOfRotation(v1::Router::Stub* stub, int s) {
  const auto start = Clock::now();
  while (Since(start) < 10) {
    grpc::ClientContext ctx;
    v1::ClusterInfo info;
    if (stub->GetClusterInfo(&ctx, v1::GetClusterInfoRequest(), &info).ok() &&
        info.shards_size() > s && !info.shards(s).healthy()) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

// SIGKILLs shard `s` of `cluster` and waits until the router behind `stub` lists it out of
// rotation; a failure says which step did not happen.
::testing::AssertionResult KillOutOfRotation(client::LocalCluster* cluster,
                                             v1::Router::Stub* stub, int s) {
  cluster->shard(s).Signal(SIGKILL);
  if (!cluster->shard(s).Wait(absl::Seconds(5)).ok()) {
    return ::testing::AssertionFailure() << "shard " << s << " did not exit within 5 s";
  }
  if (!WaitOutOfRotation(stub, s)) {
    return ::testing::AssertionFailure()
           << "the router still had the killed shard " << s << " in rotation after 10 s";
  }
  return ::testing::AssertionSuccess();
}

// SIGKILLs the router of `cluster` and starts it again on its port (as after a crash); a failure
// says which step did not happen.
::testing::AssertionResult CrashAndRestartRouter(client::LocalCluster* cluster) {
  cluster->router().Signal(SIGKILL);
  if (!cluster->router().Wait(absl::Seconds(5)).ok()) {
    return ::testing::AssertionFailure() << "the router did not exit within 5 s";
  }
  const absl::Status back = cluster->RestartRouter();
  if (!back.ok()) return ::testing::AssertionFailure() << back;
  return ::testing::AssertionSuccess();
}

// A Rebalance to a static strategy places by formula, down shards included. One that would leave
// an expert with every replica on a shard out of rotation is refused (FAILED_PRECONDITION,
// naming the experts and the shard) and the placement stays; a dry run still shows it, with
// the refusal the call would get (Placement.refusal; until 2026-12-04 it said nothing), and
// `dynamic` places on the shards in rotation. So is one that would load experts onto the down
// shard (`replicated`). The imbalance leaves the down shard out.
TEST_F(ClusterTest, ARebalanceThatWouldStrandExpertsOnADownShardIsRefused) {
  client::LocalClusterOptions o;
  o.shards = 2;
  o.placement = "hybrid";
  o.coordinator = false;  // a fixed --shards list: the dead shard stays in the table
  auto cluster = StartWith(o);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const std::string down = cluster->shard_addresses()[0];
  ASSERT_TRUE(KillOutOfRotation(cluster.get(), stub.get(), 0));
  auto rebalance = [&](const std::string& strategy, bool dry_run, v1::Placement* p) {
    return RebalanceWithin(stub.get(), strategy, dry_run, p, std::chrono::seconds(60));
  };
  v1::Placement p;
  // hybrid again, the live strategy, leaves shard 0's singles unserved: said, not answered
  // with the table as if the call had done its work (it was, until 2026-12-05).
  const std::set<int> singles = OnlyAndSharedOn(stub.get(), 0).first;
  ASSERT_FALSE(singles.empty());
  grpc::Status st = rebalance("hybrid", false, &p);
  ASSERT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_EQ(
      st.error_message(),
      absl::StrCat("hybrid placement (the live one) leaves experts ", absl::StrJoin(singles, ","),
                   " with no replica on a shard in rotation (out of rotation: ", down,
                   "): their requests fail UNAVAILABLE. Bring the shard back, or choose "
                   "dynamic, which places replicas only on shards in rotation"));
  st = rebalance("sharded", false, &p);
  ASSERT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  std::vector<int> first_half(Config().num_experts / 2);  // sharded's block on shard 0
  std::iota(first_half.begin(), first_half.end(), 0);
  EXPECT_NE(st.error_message().find(absl::StrCat("sharded placement would leave experts ",
                                                 absl::StrJoin(first_half, ","),
                                                 " with no replica on a shard in rotation")),
            std::string::npos)
      << st.error_message();
  EXPECT_NE(st.error_message().find(down), std::string::npos) << st.error_message();
  grpc::ClientContext ctx;
  v1::Placement now;
  ASSERT_TRUE(stub->GetPlacement(&ctx, v1::GetPlacementRequest(), &now).ok());
  EXPECT_EQ(now.strategy(), "hybrid");
  // The dry run shows the proposal, and says it would be refused, with the call's own error.
  ASSERT_TRUE(rebalance("sharded", true, &p).ok());
  EXPECT_FALSE(p.applied());
  EXPECT_EQ(p.refusal(), st.error_message());
  {
    // moe-client prints the proposal with why, and exits 1: a script's `--dry-run && --rebalance`
    // stops there (it exited 0, 2026-12-06).
    auto dry = common::Subprocess::Spawn({std::string(MOE_BIN_DIR) + "/moe-client", "placement",
                                          "--router", cluster->router_address(), "--rebalance",
                                          "sharded", "--dry-run"});
    ASSERT_TRUE(dry.ok()) << dry.status();
    const auto line = dry->ReadLineWith("this proposal would be refused now", absl::Seconds(15));
    ASSERT_TRUE(line.ok()) << line.status();
    EXPECT_NE(line->find(st.error_message()), std::string::npos) << *line;
    const auto exit = dry->Wait(absl::Seconds(10));
    ASSERT_TRUE(exit.ok()) << exit.status();
    EXPECT_TRUE(WIFEXITED(*exit) && WEXITSTATUS(*exit) == 1) << "wait status " << *exit;
  }
  ASSERT_TRUE(rebalance("dynamic", true, &p).ok());
  EXPECT_EQ(p.refusal(), "") << "dynamic places on the shards in rotation";
  ASSERT_TRUE(rebalance("dynamic", false, &p).ok());
  for (const v1::ExpertPlacement& ep : p.experts()) {
    EXPECT_EQ(absl::StrJoin(ep.shards(), ","), "1") << "expert " << ep.expert();
  }
  const auto x = common::RandomMatrix(16, Config().d_model, 5200);
  v1::InferResponse resp;
  st = Infer(stub.get(), Request(x, 16, "dynamic"), &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
  // The load is measured over the shards in rotation: all of it on shard 1 is balanced. The
  // down shard counted as an idle one read 1.0 here, and `dynamic` rebalanced for nothing.
  grpc::ClientContext pctx;
  ASSERT_TRUE(stub->GetPlacement(&pctx, v1::GetPlacementRequest(), &now).ok());
  ASSERT_EQ(now.shard_load_size(), 2);
  EXPECT_EQ(now.shard_load(0), 0.0);
  EXPECT_GT(now.shard_load(1), 0.0);
  EXPECT_EQ(now.imbalance(), 0.0);
  // The table tells the down shard from an idle one (both read 0.0 before).
  ASSERT_EQ(now.shard_takes_load_size(), 2);
  EXPECT_FALSE(now.shard_takes_load(0));
  EXPECT_TRUE(now.shard_takes_load(1));
  // `replicated` strands no expert, but would load every expert onto the down shard, where the
  // load fails: refused the same way, before any version is spent.
  st = rebalance("replicated", false, &p);
  ASSERT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_NE(st.error_message().find(absl::StrCat("replicated placement would load experts onto ",
                                                 down, ", out of rotation")),
            std::string::npos)
      << st.error_message();
  const std::string refused = st.error_message();
  ASSERT_TRUE(rebalance("replicated", true, &p).ok());
  EXPECT_EQ(p.refusal(), refused);
  grpc::ClientContext actx;
  v1::Placement after;
  ASSERT_TRUE(stub->GetPlacement(&actx, v1::GetPlacementRequest(), &after).ok());
  EXPECT_EQ(after.strategy(), "dynamic");
  EXPECT_EQ(after.version(), now.version());
}

// The refusal of a switch to `dynamic` that would copy trained experts `experts`, whose every
// replica is on the down shard `down`.
std::string NoSourceRefusal(const std::set<int>& experts, const std::string& down) {
  return absl::StrCat(
      "dynamic placement would copy trained experts ", absl::StrJoin(experts, ","),
      " onto other shards, but every shard that holds them is out of rotation (", down,
      "); the current placement stays. Bring the shard back first (or wait until it serves "
      "again, if it is starting): their training is on it");
}

// Trained experts whose every replica is on a down shard have no weights to copy: a Rebalance
// that would copy them elsewhere is refused before it takes a version (FAILED_PRECONDITION,
// naming the experts and the shard), and its dry run says so. Until 2026-12-05 the switch
// itself refused, UNAVAILABLE, after the dry run had passed clean, and moe-client sent the
// call three times (walk-through helper-72). `dynamic` is not offered where it cannot help.
TEST_F(ClusterTest, ARebalanceThatWouldCopyTrainedExpertsFromADownShardIsRefused) {
  // With the coordinator, and --shards: the dead shard stays listed.
  auto cluster = Start("hybrid", 2);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const absl::Status trained = TrainSteps(stub.get(), 7100, 1);
  ASSERT_TRUE(trained.ok()) << trained;
  const std::set<int> singles = OnlyAndSharedOn(stub.get(), 0).first;
  ASSERT_FALSE(singles.empty());
  const std::string down = cluster->shard_addresses()[0];
  ASSERT_TRUE(KillOutOfRotation(cluster.get(), stub.get(), 0));
  grpc::ClientContext bctx;
  v1::Placement before;
  ASSERT_TRUE(stub->GetPlacement(&bctx, v1::GetPlacementRequest(), &before).ok());
  const std::string no_source = NoSourceRefusal(singles, down);
  v1::Placement p;
  ASSERT_TRUE(RebalanceWithin(stub.get(), "dynamic", true, &p, std::chrono::seconds(60)).ok());
  EXPECT_EQ(p.refusal(), no_source);
  grpc::Status st = RebalanceWithin(stub.get(), "dynamic", false, &p, std::chrono::seconds(60));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_EQ(st.error_message(), no_source);
  st = RebalanceWithin(stub.get(), "hybrid", false, &p, std::chrono::seconds(60));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_EQ(
      st.error_message(),
      absl::StrCat("hybrid placement (the live one) leaves experts ", absl::StrJoin(singles, ","),
                   " with no replica on a shard in rotation (out of rotation: ", down,
                   "): their requests fail UNAVAILABLE. Bring the shard back"));
  // The other refusals do not offer dynamic either: it would be refused as above.
  st = RebalanceWithin(stub.get(), "sharded", false, &p, std::chrono::seconds(60));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_TRUE(absl::StartsWith(st.error_message(), "sharded placement would leave experts "))
      << st.error_message();
  EXPECT_TRUE(
      absl::EndsWith(st.error_message(), "the current placement stays. Bring the shard back"))
      << st.error_message();
  st = RebalanceWithin(stub.get(), "replicated", false, &p, std::chrono::seconds(60));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_EQ(st.error_message(),
            absl::StrCat("replicated placement would load experts onto ", down,
                         ", out of rotation; the current placement stays. Bring the shard back"));
  grpc::ClientContext actx;
  v1::Placement after;
  ASSERT_TRUE(stub->GetPlacement(&actx, v1::GetPlacementRequest(), &after).ok());
  EXPECT_EQ(after.version(), before.version());
  EXPECT_EQ(after.strategy(), "hybrid");
  // A training step is refused at once, naming the experts the down shard holds (a helper's
  // walk-through, 2026-12-07: it named the shard alone, where Infer names the expert).
  const auto on_down = OnlyAndSharedOn(stub.get(), 0);
  std::set<int> held = on_down.first;
  held.insert(on_down.second.begin(), on_down.second.end());
  st = Train(stub.get(), 7101, 20000);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  // Its trained experts with no other replica cannot move (the rebalance above was refused):
  // only the shard's return is offered.
  ASSERT_FALSE(on_down.first.empty());
  EXPECT_EQ(st.error_message(),
            absl::StrCat("replicas of experts ", absl::StrJoin(held, ", "), " on ", down,
                         " are out of rotation: the step could not commit; retry once the shard "
                         "is back (expert",
                         on_down.first.size() == 1 ? " " : "s ", absl::StrJoin(on_down.first, ", "),
                         on_down.first.size() == 1 ? " has" : " have",
                         " no other replica in rotation, and the training is on it)"));
}

// The same refusal from a router started again over the trained cluster: it has taken no step
// itself (steps_done 0, no --state-dir), and knows the experts were trained only from the
// shards' steps, read at its first placement (seen_trained). Without that it took the model
// for untrained: the switch then found no replica to copy from, after taking a version, and
// refused UNAVAILABLE, which moe-client sends again.
TEST_F(ClusterTest, ARestartedRouterKnowsTheDownShardsExpertsWereTrained) {
  auto cluster = Start("hybrid", 2);
  ASSERT_NE(cluster, nullptr);
  {
    auto stub = client::MakeRouterStub(cluster->router_address());
    const absl::Status trained = TrainSteps(stub.get(), 7300, 1);
    ASSERT_TRUE(trained.ok()) << trained;
  }
  ASSERT_TRUE(CrashAndRestartRouter(cluster.get()));
  auto stub = client::MakeRouterStub(cluster->router_address());
  const std::set<int> singles = OnlyAndSharedOn(stub.get(), 0).first;
  ASSERT_FALSE(singles.empty());
  ASSERT_TRUE(KillOutOfRotation(cluster.get(), stub.get(), 0));
  const uint64_t before = PlacementOf(stub.get()).version();
  const std::string no_source = NoSourceRefusal(singles, cluster->shard_addresses()[0]);
  v1::Placement p;
  ASSERT_TRUE(RebalanceWithin(stub.get(), "dynamic", true, &p, std::chrono::seconds(60)).ok());
  EXPECT_EQ(p.refusal(), no_source);
  const grpc::Status st =
      RebalanceWithin(stub.get(), "dynamic", false, &p, std::chrono::seconds(60));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_EQ(st.error_message(), no_source);
  const v1::Placement after = PlacementOf(stub.get());
  EXPECT_EQ(after.version(), before);
  EXPECT_EQ(after.strategy(), "hybrid");
}

// The control loop's own rebalance is checked as an operator's is. With a trained expert's only
// holder down, a dynamic placement past its threshold would copy that expert from nowhere: until
// 2026-12-05 the loop tried that switch on every tick, each try failing after it had taken a
// placement version. Now it is refused without one (counted, said once in the log) and tried
// again after each cooldown, and applied as the next version once the holder is back.
TEST_F(ClusterTest, TheControlLoopSkipsARebalanceThatWouldCopyTrainedExpertsFromNowhere) {
  const int metrics = testing::FreePortBlock(5);  // the router, 3 shards, the coordinator
  const double cooldown = 3;                      // seconds; the loop ticks every second
  auto cluster =
      Start("dynamic", 3,
            {"--rebalance-cooldown-s", absl::StrCat(cooldown), "--imbalance-threshold", "0.1"}, {},
            metrics);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const absl::Status trained = TrainSteps(stub.get(), 7400, 1);
  ASSERT_TRUE(trained.ok()) << trained;
  // A shard holding some experts alone (dynamic's idle placement replicates only some). Training
  // steps count no load: nothing rebalances before the load below.
  int down = -1;
  std::set<int> singles;
  for (int s = 0; s < 3 && singles.empty(); ++s) {
    singles = OnlyAndSharedOn(stub.get(), s).first;
    down = s;
  }
  ASSERT_FALSE(singles.empty());
  ASSERT_TRUE(KillOutOfRotation(cluster.get(), stub.get(), down));
  const uint64_t before = PlacementOf(stub.get()).version();
  // Popularity skewed over the experts still served: the hottest one that only one live shard
  // holds (its load all on that shard: the imbalance is well past the threshold, and another
  // replica of it would even the load out), those on the dead shard coldest. Both of a token's
  // experts are drawn from it, in requests of 4 tokens, most of which do not reach the dead
  // shard's (those that do fail UNAVAILABLE, naming the expert, and count no load).
  std::vector<int> order;
  const v1::Placement placed = PlacementOf(stub.get());
  for (const v1::ExpertPlacement& ep : placed.experts()) {
    const int live_holders = static_cast<int>(
        std::count_if(ep.shards().begin(), ep.shards().end(), [&](int s) { return s != down; }));
    if (live_holders == 1 && order.empty()) order.push_back(ep.expert());
  }
  ASSERT_EQ(order.size(), 1u) << "no expert is held by one live shard alone";
  for (int e = 0; e < Config().num_experts; ++e) {
    if (singles.count(e) == 0 && e != order[0]) order.push_back(e);
  }
  order.insert(order.end(), singles.begin(), singles.end());
  client::ZipfTokens gen(ck_->gate, Config().num_experts, Config().d_model, 2.0, 5, order, 2);
  const std::string skipped = "moe_router_rebalances_skipped_total{reason=\"refused\"}";
  // UNAVAILABLE is expected: the killed shard held experts alone.
  auto load_until = [&](const std::function<bool()>& done, double limit) {
    return LoadUntil(stub.get(), &gen, done, limit, /*tolerate_unavailable=*/true);
  };
  // Two refusals, a cooldown apart (not one a tick).
  grpc::Status st = load_until([&] { return ScrapeMetric(metrics, skipped) >= 1; }, 30);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_GE(ScrapeMetric(metrics, skipped), 1) << "the skewed load did not ask for a rebalance";
  const auto first = Clock::now();
  st = load_until([&] { return ScrapeMetric(metrics, skipped) >= 2; }, 30);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(ScrapeMetric(metrics, skipped), 2);
  EXPECT_GE(Since(first), cooldown - 0.5) << "tried again before the cooldown";
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_rebalances_skipped_total{reason=\"failed\"}"), 0);
  EXPECT_EQ(PlacementOf(stub.get()).version(), before);
  // Back (empty, as moe-cluster starts shards: the router loads its experts again, their training
  // lost), the holder is a source again, and the waiting rebalance is the next version.
  const absl::Status back = cluster->RestartShard(down);
  ASSERT_TRUE(back.ok()) << back;
  st = load_until([&] { return PlacementOf(stub.get()).version() != before; }, 30);
  ASSERT_TRUE(st.ok()) << st.error_message();
  const v1::Placement after = PlacementOf(stub.get());
  EXPECT_EQ(after.version(), before + 1) << "placement versions were taken by failed switches";
  EXPECT_EQ(after.strategy(), "dynamic");
}

// A dead shard that the placement has moved off holds no replica, and takes no part in a step.
// Until 2026-12-04 every shard of the table was sent each step's commit: with a fixed --shards
// list (the dead shard stays in the table) the first step waited out its commit on the dead
// shard, left it "unconfirmed", and every later step and save was refused for good.
TEST_F(ClusterTest, ADeadShardThePlacementMovedOffHoldsNoStepOrSaveBack) {
  // With the coordinator, and --shards: the dead shard stays listed.
  auto cluster = Start("hybrid", 3);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  ASSERT_TRUE(KillOutOfRotation(cluster.get(), stub.get(), 2));
  grpc::ClientContext rctx;
  rctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::RebalanceRequest req;
  req.set_strategy("dynamic");
  v1::Placement p;
  const grpc::Status moved = stub->Rebalance(&rctx, req, &p);
  ASSERT_TRUE(moved.ok()) << moved.error_message();
  for (const v1::ExpertPlacement& ep : p.experts()) {
    EXPECT_EQ(std::count(ep.shards().begin(), ep.shards().end(), 2), 0) << "expert " << ep.expert();
  }
  const absl::Status trained = TrainSteps(stub.get(), 7000, 3);
  ASSERT_TRUE(trained.ok()) << trained;
  absl::StatusOr<common::Checkpoint> saved = SaveIdentical(stub.get(), "dead_shard_moved_off");
  ASSERT_TRUE(saved.ok()) << saved.status();
}

// The status of the shard at `address` (ExpertShard.GetStatus, 5 s), or nullopt.
std::optional<v1::ShardStatus> ShardStatusOf(const std::string& address) {
  auto stub = v1::ExpertShard::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::ShardStatus status;
  if (!stub->GetStatus(&ctx, v1::GetShardStatusRequest(), &status).ok()) return std::nullopt;
  return status;
}

// Each READY expert's training step on the shard at `address`.
std::map<int, uint64_t> TrainedSteps(const std::string& address) {
  std::map<int, uint64_t> steps;
  const std::optional<v1::ShardStatus> status = ShardStatusOf(address);
  if (!status.has_value()) return steps;
  for (const v1::ExpertStatus& e : status->experts()) {
    if (e.state() == v1::ExpertStatus::READY) steps[e.expert()] = e.trained_step();
  }
  return steps;
}

// A switch of the control loop's own that fails: here every copy of a trained expert between
// shards fails (failpoint export_fails on every shard). It is counted as skipped (reason
// "failed"), leaves the placement version as it was, and is tried again a cooldown later, not on
// the next tick (a failed switch has loaded replicas and unloads them again); the requests
// meanwhile are all answered.
TEST_F(ClusterTest, TheControlLoopWaitsItsCooldownAfterItsOwnSwitchFails) {
  const int metrics = testing::FreePortBlock(5);  // the router, 3 shards, the coordinator
  const double cooldown = 3;                      // seconds; the loop ticks every second
  ASSERT_EQ(setenv("MOE_FAILPOINT", "export_fails", 1), 0);
  auto cluster =
      Start("dynamic", 3,
            {"--rebalance-cooldown-s", absl::StrCat(cooldown), "--imbalance-threshold", "0.1"}, {},
            metrics);
  unsetenv("MOE_FAILPOINT");
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  // Trained: a new replica is copied from a live one, not read from the checkpoint.
  const absl::Status trained = TrainSteps(stub.get(), 7500, 1);
  ASSERT_TRUE(trained.ok()) << trained;
  const v1::Placement placed = PlacementOf(stub.get());
  // The hottest expert is one that a single shard holds: more replicas of it would even the load
  // out, and each would be a copy.
  std::vector<int> order;
  for (const v1::ExpertPlacement& ep : placed.experts()) {
    if (ep.shards_size() == 1 && order.empty()) order.push_back(ep.expert());
  }
  ASSERT_EQ(order.size(), 1u) << "dynamic's first placement holds every expert twice or more";
  for (int e = 0; e < Config().num_experts; ++e) {
    if (e != order[0]) order.push_back(e);
  }
  client::ZipfTokens gen(ck_->gate, Config().num_experts, Config().d_model, 2.0, 5, order, 2);
  const std::string failed = "moe_router_rebalances_skipped_total{reason=\"failed\"}";
  int answered = 0;
  auto load_until = [&](const std::function<bool()>& done, double limit) {
    return LoadUntil(stub.get(), &gen, done, limit, /*tolerate_unavailable=*/false, &answered);
  };
  grpc::Status st = load_until([&] { return ScrapeMetric(metrics, failed) >= 1; }, 30);
  ASSERT_TRUE(st.ok()) << st.error_code() << ": " << st.error_message();
  ASSERT_GE(ScrapeMetric(metrics, failed), 1)
      << "no failed switch after " << answered << " requests";
  const auto first = Clock::now();
  st = load_until([&] { return ScrapeMetric(metrics, failed) >= 2; }, 30);
  ASSERT_TRUE(st.ok()) << st.error_code() << ": " << st.error_message();
  EXPECT_EQ(ScrapeMetric(metrics, failed), 2);
  // (Noticed up to a request and a scrape after it happened: the margin is 1 s, where a try each
  // tick would come 1 s after the first.)
  EXPECT_GE(Since(first), cooldown - 1.0) << "tried again before the cooldown";
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_rebalances_skipped_total{reason=\"refused\"}"), 0)
      << "the check before the switch refused it (the holders are all live)";
  const v1::Placement after = PlacementOf(stub.get());
  EXPECT_EQ(after.version(), placed.version()) << "a failed switch was applied";
  EXPECT_EQ(after.strategy(), "dynamic");
  // What the failed switches did load (nothing: every copy failed) is not left behind: each
  // shard holds what the placement gives it.
  for (int s = 0; s < 3; ++s) {
    std::set<int> want;
    for (const v1::ExpertPlacement& ep : after.experts()) {
      if (std::count(ep.shards().begin(), ep.shards().end(), s)) want.insert(ep.expert());
    }
    std::set<int> held;
    for (const auto& [e, step] : TrainedSteps(cluster->shard_addresses()[s])) held.insert(e);
    EXPECT_EQ(held, want) << "shard " << s;
  }
}

// The training step in a state dir's file for an expert, 0 when there is none (yet).
uint64_t SavedStep(const std::string& path) {
  auto reader = common::SafetensorsReader::Open(path);
  if (!reader.ok()) return 0;
  auto it = (*reader)->metadata().find("moe_trained_step");
  return it == (*reader)->metadata().end() ? 0 : std::stoull(it->second);
}

// Waits (10 s at most) until `dir` keeps each expert of `steps` trained (step > 0) at its step;
// returns how many are, or which one is not.
absl::StatusOr<int> AwaitKept(const std::string& dir, const std::map<int, uint64_t>& steps) {
  int kept = 0;
  for (const auto& [e, step] : steps) {
    if (step == 0) continue;
    ++kept;
    const std::string file = absl::StrCat(dir, "/expert-", e, ".safetensors");
    const auto start = Clock::now();
    while (SavedStep(file) != step && Since(start) < 10) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (SavedStep(file) != step) {
      return absl::DeadlineExceededError(
          absl::StrCat(file, " keeps step ", SavedStep(file), ", not ", step, ", after 10 s"));
    }
  }
  return kept;
}

// With --state-dir (moe-cluster --state-dir), a shard keeps its trained experts on disk. Under
// `sharded` an expert's only replica that is killed and started again, as in the test above,
// comes back with its training, read from its state dir rather than the checkpoint: answers
// after the restart equal those before it bit for bit, and no training is reported lost.
TEST_F(ClusterTest, AShardWithAStateDirKeepsItsTrainingAcrossARestart) {
  const int metrics = testing::FreePortBlock(4);
  client::LocalClusterOptions o;
  o.shards = 2;
  o.placement = "sharded";
  o.shard_args = {"--experts", "all"};
  o.metrics_port = metrics;
  o.state_dir = testing::TempPath("cluster_state");
  auto cluster = StartWith(o);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const absl::Status trained = TrainSteps(stub.get(), 6000, 2);
  ASSERT_TRUE(trained.ok()) << trained;
  const int64_t n = 64;
  const v1::InferRequest req = Request(common::RandomMatrix(n, Config().d_model, 61), n, "same");
  v1::InferResponse before;
  ASSERT_TRUE(Infer(stub.get(), req, &before).ok());
  // Shard 0's trained experts reach its state dir (written in the background).
  const std::map<int, uint64_t> steps = TrainedSteps(cluster->shard_addresses()[0]);
  const absl::StatusOr<int> trained_experts = AwaitKept(o.state_dir + "/shard-0", steps);
  ASSERT_TRUE(trained_experts.ok()) << trained_experts.status();
  ASSERT_EQ(*trained_experts, Config().num_experts / 2) << "shard 0 holds half of the experts";

  cluster->shard(0).Signal(SIGKILL);
  ASSERT_TRUE(cluster->shard(0).Wait(absl::Seconds(5)).ok());
  const absl::Status back = cluster->RestartShard(0);
  ASSERT_TRUE(back.ok()) << back;
  v1::InferResponse after;
  grpc::Status st = Infer(stub.get(), req, &after);
  for (const auto start = Clock::now();
       st.error_code() == grpc::StatusCode::UNAVAILABLE && Since(start) < 20;
       st = Infer(stub.get(), req, &after)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(after.output().data() == before.output().data())
      << "the restarted shard answers with other weights than the trained ones";
  EXPECT_EQ(ScrapeMetric(metrics + 1, "moe_shard_expert_loads_total{source=\"state_dir\"}"),
            *trained_experts);
  // The trained experts are back at their steps (others, which --experts all also loads, come
  // and go with the router's unloads and are left out).
  std::map<int, uint64_t> trained_before, trained_after;
  for (const auto& [e, step] : steps) {
    if (step > 0) trained_before[e] = step;
  }
  for (const auto& [e, step] : TrainedSteps(cluster->shard_addresses()[0])) {
    if (step > 0) trained_after[e] = step;
  }
  EXPECT_EQ(trained_after, trained_before);
  // Training goes on from there (once the router takes steps again), with nothing lost or
  // copied.
  st = Train(stub.get(), 6050, 20000, 0.005f);
  for (const auto start = Clock::now();
       st.error_code() == grpc::StatusCode::UNAVAILABLE && Since(start) < 20;
       st = Train(stub.get(), 6050, 20000, 0.005f)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_experts_lost_training_total"), 0);
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_stale_replicas_total"), 0);
}

// Options of a cluster of 2 shards under `sharded` whose services keep their training in
// STATE_DIR `name` (emptied first).
client::LocalClusterOptions TwoShardedWithStateDir(const std::string& name) {
  client::LocalClusterOptions o;
  o.shards = 2;
  o.placement = "sharded";
  o.state_dir = testing::TempPath(name);
  std::filesystem::remove_all(o.state_dir);
  return o;
}

// A shard gone for good whose --state-dir is given to a new shard at another address (a pod
// rescheduled with its volume): the new member registers holding the trained experts it read
// from there, and the router copies them from it. Until 2026-12-06 (a helper's walk-through) it
// said they had lost their training ("every shard that held it has left"), loaded the
// checkpoint's weights onto the shard the placement gave them, and answered with them.
TEST_F(ClusterTest, AShardStartedAtAnotherAddressWithItsStateDirBringsItsTraining) {
  const client::LocalClusterOptions o = TwoShardedWithStateDir("moved_state");
  auto cluster = StartWith(o);
  ASSERT_NE(cluster, nullptr);
  // A router that follows the coordinator alone (LocalCluster's also has a fixed --shards list,
  // which keeps the dead shard in the table), in place of the cluster's.
  cluster->router().Signal(SIGKILL);
  ASSERT_TRUE(cluster->router().Wait(absl::Seconds(5)).ok());
  const int metrics = testing::FreePortBlock(1);
  auto router = common::Subprocess::Spawn({std::string(MOE_BIN_DIR) + "/moe-router", "--checkpoint",
                                           *path_, "--port", "0", "--coordinator",
                                           cluster->coordinator_address(), "--placement", "sharded",
                                           "--metrics-port", std::to_string(metrics)});
  ASSERT_TRUE(router.ok()) << router.status();
  const absl::StatusOr<int> router_port = router->ReadListeningPort(absl::Seconds(30));
  ASSERT_TRUE(router_port.ok()) << router_port.status();
  auto stub = client::MakeRouterStub(absl::StrCat("127.0.0.1:", *router_port));
  const auto serves = [&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::Placement p;
    return stub->GetPlacement(&ctx, v1::GetPlacementRequest(), &p).ok() && p.version() > 0;
  };
  ASSERT_GE(WaitFor(serves, 30), 0) << "the router placed nothing within 30 s";
  const absl::Status trained = TrainSteps(stub.get(), 6300, 2);
  ASSERT_TRUE(trained.ok()) << trained;
  const int64_t n = 64;
  const v1::InferRequest req = Request(common::RandomMatrix(n, Config().d_model, 63), n, "moved");
  v1::InferResponse before;
  ASSERT_TRUE(Infer(stub.get(), req, &before).ok());
  const absl::StatusOr<int> kept =
      AwaitKept(o.state_dir + "/shard-0", TrainedSteps(cluster->shard_addresses()[0]));
  ASSERT_TRUE(kept.ok()) << kept.status();
  ASSERT_EQ(*kept, Config().num_experts / 2);

  cluster->shard(0).Signal(SIGKILL);
  ASSERT_TRUE(cluster->shard(0).Wait(absl::Seconds(5)).ok());
  const int port = testing::FreePortBlock(1);
  auto moved = common::Subprocess::Spawn({std::string(MOE_BIN_DIR) + "/moe-expert-server",
                                          "--checkpoint", *path_, "--port", std::to_string(port),
                                          "--coordinator", cluster->coordinator_address(),
                                          "--state-dir", o.state_dir + "/shard-0"});
  ASSERT_TRUE(moved.ok()) << moved.status();
  const std::string moved_address = absl::StrCat("127.0.0.1:", port);
  // Once the old member's lease has passed and the new one is placed, every request is answered
  // as before the kill, bit for bit.
  v1::InferResponse after;
  grpc::Status st;
  const auto start = Clock::now();
  bool placed = false;
  do {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const v1::Placement p = PlacementOf(stub.get());
    placed = std::count(p.shard_addresses().begin(), p.shard_addresses().end(), moved_address) &&
             !std::count(p.shard_addresses().begin(), p.shard_addresses().end(),
                         cluster->shard_addresses()[0]);
    if (placed) st = Infer(stub.get(), req, &after);
  } while ((!placed || !st.ok()) && Since(start) < 30);
  ASSERT_TRUE(placed) << "the new member did not replace the old one within 30 s: "
                      << PlacementOf(stub.get()).DebugString();
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(after.output().data() == before.output().data())
      << "the cluster answers with other weights than the trained ones";
  EXPECT_EQ(ScrapeMetric(metrics, "moe_router_experts_lost_training_total"), 0);
  absl::StatusOr<common::Checkpoint> saved = SaveIdentical(stub.get(), "moved_state_saved");
  ASSERT_TRUE(saved.ok()) << saved.status();
  moved->Signal(SIGTERM);
  EXPECT_TRUE(moved->Wait(absl::Seconds(10)).ok());
  std::filesystem::remove_all(o.state_dir);
}

// The coordinator dies after its commit reached one shard and before it answered the router
// (MOE_FAILPOINT=coordinator_exit_mid_commit makes it exit at that point). The router learns
// from that shard that the verdict was commit and finishes the commit on the other: the step
// succeeds, and both replicas of every expert hold the same trained weights.
TEST_F(ClusterTest, ACoordinatorThatDiesMidCommitLeavesTheStepCommittedEverywhere) {
  auto cluster = StartWithFailpoint("coordinator_exit_mid_commit", "replicated", 2);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const grpc::Status st = Train(stub.get(), 7000, 20000, 0.005f);
  ASSERT_TRUE(st.ok()) << st.error_message();
  // The failpoint did fire: the coordinator exited between the commit's first shard and the rest.
  const absl::StatusOr<int> exited = cluster->coordinator().Wait(absl::Seconds(5));
  ASSERT_TRUE(exited.ok()) << exited.status();
  EXPECT_EQ(common::DescribeWaitStatus(*exited), "exited with status 3");
  absl::StatusOr<common::Checkpoint> saved = SaveIdentical(stub.get(), "mid_commit.safetensors");
  ASSERT_TRUE(saved.ok()) << saved.status();
  for (int e = 0; e < Config().num_experts; ++e) {
    EXPECT_NE(saved->experts[e].w1, ck_->experts[e].w1) << "expert " << e << " did not train";
  }
}

// Replicas that differ are reported by SaveCheckpoint, expert by expert. One shard of two
// stamps its first commit on its experts without moving their weights
// (MOE_FAILPOINT=commit_skip_update_once), so nothing else notices: the save names exactly the
// experts whose weights differ between the two shards, read from each shard directly.
TEST_F(ClusterTest, SaveCheckpointNamesTheExpertsWhoseReplicasDiffer) {
  MembershipCluster mc;
  ASSERT_TRUE(mc.Start(*path_, 1, "replicated").ok());
  const absl::Status second = mc.AddShard(*path_, "commit_skip_update_once");
  ASSERT_TRUE(second.ok()) << second;
  auto stub = client::MakeRouterStub(mc.router_addr);
  ASSERT_GE(WaitForShards(stub.get(), 2, 20), 0) << "the router did not pick up two shards";
  const grpc::Status st = Train(stub.get(), 9100, 20000);
  ASSERT_TRUE(st.ok()) << st.error_message();
  v1::SaveCheckpointResponse resp;
  ASSERT_TRUE(SaveTo(stub.get(), "divergent", &resp).ok());
  EXPECT_FALSE(resp.replicas_identical());
  // The reference: each expert's bytes as each shard exports them.
  grpc::ClientContext ictx;
  v1::ClusterInfo info;
  ASSERT_TRUE(stub->GetClusterInfo(&ictx, v1::GetClusterInfoRequest(), &info).ok());
  ASSERT_EQ(info.shards_size(), 2);
  std::vector<int> differ;
  for (int e = 0; e < Config().num_experts; ++e) {
    std::vector<common::ExpertWeights> weights;
    for (const auto& shard : info.shards()) {
      auto peer = v1::ExpertShard::NewStub(
          grpc::CreateChannel(shard.address(), grpc::InsecureChannelCredentials()));
      absl::StatusOr<common::ExpertWeights> w = testing::ExportedWeights(peer.get(), Config(), e);
      ASSERT_TRUE(w.ok()) << shard.address() << " expert " << e << ": " << w.status();
      weights.push_back(*std::move(w));
    }
    if (!SameWeights(weights[0], weights[1])) differ.push_back(e);
  }
  EXPECT_FALSE(differ.empty());
  EXPECT_EQ(std::vector<int>(resp.divergent_experts().begin(), resp.divergent_experts().end()),
            differ);
}

// `--allreduce-wire bf16`: the replicas' ring carries BF16, half the bytes (the coordinator
// counts them), every replica still ends bit-identical, and the update is FP32's within BF16's
// rounding of the summed gradients.
TEST_F(ClusterTest, ABf16AllReduceHalvesTheBytesAndTrainsReplicasAlike) {
  int64_t elements = 0;  // every expert's parameters: replicated, one group holds them all
  for (const auto& w : ck_->experts) {
    elements += static_cast<int64_t>(w.w1.size() + w.w2.size() + w.w3.size() + w.b1.size() +
                                     w.b2.size() + w.b3.size());
  }
  std::map<std::string, common::Checkpoint> trained;
  std::map<std::string, double> bytes;
  for (const std::string wire : {"fp32", "bf16"}) {
    const int metrics = testing::FreePortBlock(4);
    auto cluster = Start("replicated", 2, {"--allreduce-wire", wire}, {}, metrics);
    ASSERT_NE(cluster, nullptr);
    auto stub = client::MakeRouterStub(cluster->router_address());
    const grpc::Status st = Train(stub.get(), 9000, 20000);
    ASSERT_TRUE(st.ok()) << wire << ": " << st.error_message();
    absl::StatusOr<common::Checkpoint> saved = SaveIdentical(stub.get(), "wire_" + wire);
    ASSERT_TRUE(saved.ok()) << saved.status();
    trained[wire] = *std::move(saved);
    bytes[wire] = ScrapeMetric(metrics + 3, "moe_coordinator_allreduce_bytes_total");
  }
  EXPECT_EQ(bytes["fp32"], 4.0 * static_cast<double>(elements));
  EXPECT_EQ(bytes["bf16"], 2.0 * static_cast<double>(elements));
  double diff = 0, norm = 0;
  for (int e = 0; e < Config().num_experts; ++e) {
    const auto& base = ck_->experts[e].w1;
    for (size_t i = 0; i < base.size(); ++i) {
      const double want = trained["fp32"].experts[e].w1[i] - base[i];
      const double got = trained["bf16"].experts[e].w1[i] - base[i];
      diff += (got - want) * (got - want);
      norm += want * want;
    }
  }
  ASSERT_GT(norm, 0);
  EXPECT_GT(diff, 0) << "BF16 on the wire changed nothing: was it used?";
  EXPECT_LT(std::sqrt(diff / norm), 1e-2);
}

// Before a step the router reads every replica's training step (a replica behind is copied
// first); a shard in rotation whose status cannot be read (MOE_FAILPOINT=shard_status_unavailable
// makes every status call fail while the shard serves) might hold stale weights, so the step is
// refused with UNAVAILABLE naming the shard, no weight changes, and inference goes on.
TEST_F(ClusterTest, AStepIsRefusedWhileAShardsReplicasCannotBeChecked) {
  auto cluster = StartWithFailpoint("shard_status_unavailable", "replicated", 2);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const grpc::Status st = Train(stub.get(), 7100, 20000);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  for (const std::string& part :
       {absl::StrCat("cannot check the replicas on ", cluster->shard_addresses()[0],
                     " before the step"),
        std::string("the step is refused, try again")}) {
    EXPECT_NE(st.error_message().find(part), std::string::npos) << st.error_message();
  }
  const std::vector<float> x = common::RandomMatrix(8, Config().d_model, 7102);
  v1::InferResponse resp;
  ASSERT_TRUE(Infer(stub.get(), Request(x, 8, "serving"), &resp).ok());
  EXPECT_TRUE(Matches(x, 8, resp, *layer_));
  absl::StatusOr<common::Checkpoint> saved = SaveIdentical(stub.get(), "refused.safetensors");
  ASSERT_TRUE(saved.ok()) << saved.status();
  EXPECT_EQ(saved->gate.weight, ck_->gate.weight);
  for (int e = 0; e < Config().num_experts; ++e) {
    EXPECT_EQ(saved->experts[e].w1, ck_->experts[e].w1) << "expert " << e << " changed";
    EXPECT_EQ(saved->experts[e].w2, ck_->experts[e].w2) << "expert " << e << " changed";
  }
}

// A router started again over a trained cluster has taken no step itself, but the shards' steps
// tell it the experts were trained: a shard that then restarts empty gets its experts copied
// from a trained replica, never read from the checkpoint (which would serve untrained weights
// until the stale check copied them again).
TEST_F(ClusterTest, ARestartedRouterGivesARestartedShardTrainedWeights) {
  const int metrics = testing::FreePortBlock(5);
  auto cluster = Start("replicated", 3, {}, {}, metrics);
  ASSERT_NE(cluster, nullptr);
  {
    auto stub = client::MakeRouterStub(cluster->router_address());
    const absl::Status trained = TrainSteps(stub.get(), 5000, 2);
    ASSERT_TRUE(trained.ok()) << trained;
  }
  ASSERT_TRUE(CrashAndRestartRouter(cluster.get()));
  cluster->shard(1).Signal(SIGKILL);
  ASSERT_TRUE(cluster->shard(1).Wait(absl::Seconds(5)).ok());
  const absl::Status shard_back = cluster->RestartShard(1);
  ASSERT_TRUE(shard_back.ok()) << shard_back;
  const auto start = Clock::now();
  while (ScrapeMetric(metrics + 2, "moe_shard_experts_loaded") < Config().num_experts &&
         Since(start) < 20) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(ScrapeMetric(metrics + 2, "moe_shard_experts_loaded"), Config().num_experts);
  EXPECT_EQ(ScrapeMetric(metrics + 2, "moe_shard_expert_loads_total{source=\"checkpoint\"}"), 0)
      << "the restarted shard read untrained weights from the checkpoint";
  EXPECT_EQ(ScrapeMetric(metrics + 2, "moe_shard_expert_loads_total{source=\"peer\"}"),
            Config().num_experts);
  auto stub = client::MakeRouterStub(cluster->router_address());
  absl::StatusOr<common::Checkpoint> saved = SaveIdentical(stub.get(), "router_back.safetensors");
  ASSERT_TRUE(saved.ok()) << saved.status();
  for (int e = 0; e < Config().num_experts; ++e) {
    EXPECT_NE(saved->experts[e].w1, ck_->experts[e].w1) << "expert " << e << " lost its training";
  }
}

// The router keeps its trained gate in --state-dir: started again after a crash it serves the
// trained gate with the shards' trained experts (the same answers, bit for bit), and its
// checkpoint has the trained gate and the step count. Until 2026-12-02 it went back to the
// checkpoint's gate without a word: trained experts behind an untrained gate.
TEST_F(ClusterTest, ARestartedRouterWithAStateDirServesItsTrainedGate) {
  const client::LocalClusterOptions o = TwoShardedWithStateDir("router_gate_state");
  auto cluster = StartWith(o);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const absl::Status trained = TrainSteps(stub.get(), 6100, 2);
  ASSERT_TRUE(trained.ok()) << trained;
  absl::StatusOr<common::Checkpoint> before_ck = SaveIdentical(stub.get(), "gate_state_0");
  ASSERT_TRUE(before_ck.ok()) << before_ck.status();
  ASSERT_NE(before_ck->gate.weight, ck_->gate.weight) << "training left the gate as it was";
  const int64_t n = 32;
  const v1::InferRequest req = Request(common::RandomMatrix(n, Config().d_model, 62), n, "gate");
  v1::InferResponse before;
  ASSERT_TRUE(Infer(stub.get(), req, &before).ok());

  ASSERT_TRUE(CrashAndRestartRouter(cluster.get()));
  stub = client::MakeRouterStub(cluster->router_address());
  v1::InferResponse after;
  ASSERT_TRUE(Infer(stub.get(), req, &after).ok());
  EXPECT_TRUE(after.output().data() == before.output().data())
      << "the restarted router answers with another gate than the trained one";
  grpc::ClientContext ctx;
  v1::SaveCheckpointRequest save;
  save.set_path(testing::TempPath("gate_state_1"));
  v1::SaveCheckpointResponse saved;
  const grpc::Status st = stub->SaveCheckpoint(&ctx, save, &saved);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(saved.step(), 2u) << "the restarted router lost its count of training steps";
  absl::StatusOr<common::Checkpoint> after_ck = common::LoadCheckpoint(save.path(), {});
  ASSERT_TRUE(after_ck.ok()) << after_ck.status();
  EXPECT_EQ(after_ck->gate.weight, before_ck->gate.weight);
  EXPECT_EQ(after_ck->gate.bias, before_ck->gate.bias);
  std::filesystem::remove_all(o.state_dir);
}

// A cluster started again with fewer shards, on the same --state-dir: a shard reads only its
// own directory, so of the experts sharded placement now puts on shards 0 and 1 (0-3 and 4-7),
// those their directories do not keep (2-7: they held 0-1 and 2-3) are served from the
// checkpoint. The router, which keeps each expert's training step with its gate, says so: its
// checkpoint names those experts as having lost their training, and its metric counts them.
// Until 2026-12-04 it said nothing, and saved the trained gate with untrained experts as a
// trained model (found by a new user's walk-through).
TEST_F(ClusterTest, AClusterStartedAgainOnShardsThatDoNotHoldItsTrainingSaysSo) {
  client::LocalClusterOptions o;
  o.shards = 4;
  o.placement = "sharded";  // experts 2s and 2s+1 on shard s only
  o.state_dir = testing::TempPath("fewer_shards_state");
  std::filesystem::remove_all(o.state_dir);
  std::set<int> trained;
  {
    auto cluster = StartWith(o);
    ASSERT_NE(cluster, nullptr);
    auto stub = client::MakeRouterStub(cluster->router_address());
    const absl::Status st = TrainSteps(stub.get(), 6200, 2);
    ASSERT_TRUE(st.ok()) << st;
    absl::StatusOr<common::Checkpoint> ck = SaveIdentical(stub.get(), "fewer_shards_0");
    ASSERT_TRUE(ck.ok()) << ck.status();
    for (int e = 0; e < Config().num_experts; ++e) {
      if (ck->experts[e].w1 != ck_->experts[e].w1) trained.insert(e);
    }
  }
  std::set<int> lost_expected;
  for (int e : trained) {
    if (e >= 2) lost_expected.insert(e);  // not kept in the directory of its shard now
  }
  ASSERT_FALSE(lost_expected.empty()) << "no expert of shards 1-3 was trained";
  o.shards = 2;
  o.metrics_port = testing::FreePortBlock(3);
  auto cluster = StartWith(o);
  ASSERT_NE(cluster, nullptr);
  auto stub = client::MakeRouterStub(cluster->router_address());
  v1::SaveCheckpointResponse resp;
  const grpc::Status st = SaveTo(stub.get(), "fewer_shards_1", &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  const std::set<int> lost(resp.lost_training_experts().begin(),
                           resp.lost_training_experts().end());
  EXPECT_EQ(lost, lost_expected);
  EXPECT_EQ(ScrapeMetric(o.metrics_port, "moe_router_experts_lost_training_total"),
            static_cast<double>(lost_expected.size()));
  // The experts shard 0 kept are served trained.
  absl::StatusOr<common::Checkpoint> ck =
      common::LoadCheckpoint(testing::TempPath("fewer_shards_1"), {});
  ASSERT_TRUE(ck.ok()) << ck.status();
  for (int e : trained) {
    if (e < 2) {
      EXPECT_NE(ck->experts[e].w1, ck_->experts[e].w1) << "expert " << e;
    }
  }
  std::filesystem::remove_all(o.state_dir);
}

// A restarted router starts from what the shards hold. Here the shards were switched to sharded
// placement and trained; the router comes back with --placement hybrid, which moves experts:
// - its first placement version is past every shard's (the shards reached version 6 by the
//   rebalances; a router counting from 1 again was refused until it had counted up to 6);
// - every expert that moves is copied from its trained replica, none read from the checkpoint
//   (experts 4 and 5 had their only replica on shard 1: they lost their training silently);
// - what hybrid drops from a shard is unloaded.
TEST_F(ClusterTest, ARestartedRouterContinuesFromWhatTheShardsHold) {
  const int metrics = testing::FreePortBlock(5);
  auto cluster = Start("hybrid", 2, {}, {}, metrics);
  ASSERT_NE(cluster, nullptr);
  {
    auto stub = client::MakeRouterStub(cluster->router_address());
    for (const char* s : {"sharded", "hybrid", "sharded", "hybrid", "sharded"}) {
      grpc::ClientContext ctx;
      v1::RebalanceRequest req;
      req.set_strategy(s);
      v1::Placement p;
      const grpc::Status st = stub->Rebalance(&ctx, req, &p);
      ASSERT_TRUE(st.ok()) << s << ": " << st.error_message();
    }
    const absl::Status trained = TrainSteps(stub.get(), 5500, 2);
    ASSERT_TRUE(trained.ok()) << trained;
  }
  const double shard_version = ScrapeMetric(metrics + 1, "moe_shard_placement_version");
  EXPECT_EQ(shard_version, 6);
  const double from_checkpoint =
      ScrapeMetric(metrics + 1, "moe_shard_expert_loads_total{source=\"checkpoint\"}") +
      ScrapeMetric(metrics + 2, "moe_shard_expert_loads_total{source=\"checkpoint\"}");
  ASSERT_TRUE(CrashAndRestartRouter(cluster.get()));

  auto stub = client::MakeRouterStub(cluster->router_address());
  grpc::ClientContext ctx;
  v1::ClusterInfo info;
  ASSERT_TRUE(stub->GetClusterInfo(&ctx, v1::GetClusterInfoRequest(), &info).ok());
  EXPECT_EQ(info.placement_strategy(), "hybrid");
  EXPECT_EQ(info.placement_version(), shard_version + 1);
  // Without --state-dir it has the checkpoint's gate: said to `info` too, not only in its log.
  ASSERT_EQ(info.warnings_size(), 1);
  EXPECT_EQ(info.warnings(0),
            "the shards' experts were trained, but this router serves its checkpoint's gate, not "
            "the gate trained with them (a router keeps that only with --state-dir); give the "
            "router the --state-dir of the one that trained them, or start the cluster from a "
            "checkpoint written by save-checkpoint");
  EXPECT_EQ(ScrapeMetric(metrics + 1, "moe_shard_expert_loads_total{source=\"checkpoint\"}") +
                ScrapeMetric(metrics + 2, "moe_shard_expert_loads_total{source=\"checkpoint\"}"),
            from_checkpoint)
      << "the restarted router read experts from the checkpoint over trained replicas";
  // hybrid over 2 shards: experts 0-3 on both, 4-5 on shard 0, 6-7 on shard 1.
  EXPECT_EQ(ScrapeMetric(metrics + 1, "moe_shard_experts_loaded"), 6);
  EXPECT_EQ(ScrapeMetric(metrics + 2, "moe_shard_experts_loaded"), 6);
  absl::StatusOr<common::Checkpoint> saved =
      SaveIdentical(stub.get(), "router_continues.safetensors");
  ASSERT_TRUE(saved.ok()) << saved.status();
  for (int e = 0; e < Config().num_experts; ++e) {
    EXPECT_NE(saved->experts[e].w1, ck_->experts[e].w1) << "expert " << e << " lost its training";
  }
  // Once this router trains, its gate trains with the experts: the warning (whose advice would
  // throw that step away) is gone.
  const absl::Status again = TrainSteps(stub.get(), 5600, 1);
  ASSERT_TRUE(again.ok()) << again;
  grpc::ClientContext after_ctx;
  ASSERT_TRUE(stub->GetClusterInfo(&after_ctx, v1::GetClusterInfoRequest(), &info).ok());
  EXPECT_EQ(info.warnings_size(), 0);
}

// A router started again while a shard stays drained leaves that shard out from its first
// placement, as the running router did. It used to place by the formula over all the shards:
// it loaded experts onto the drained shard, held up SERVING 5 s waiting for it to come into
// rotation, and then moved them off again. An undo places it.
TEST_F(ClusterTest, ARouterStartedAgainWhileAShardStaysDrainedLeavesItOut) {
  auto cluster = Start("hybrid", 3);
  ASSERT_NE(cluster, nullptr);
  const std::string shard = cluster->shard_addresses()[1];
  ASSERT_TRUE(DrainWithClient(shard, 10));
  // The drain ends once the shard has left the placement; its replicas are unloaded just after.
  const auto drained = Clock::now();
  while (!TrainedSteps(shard).empty() && Since(drained) < 10) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(TrainedSteps(shard).empty()) << "the drained shard still holds experts";
  ASSERT_TRUE(CrashAndRestartRouter(cluster.get()));
  auto router = client::MakeRouterStub(cluster->router_address());
  // Nothing placed on it, nor loaded onto it; hybrid over shards 0 and 2.
  using Held = std::pair<std::set<int>, std::set<int>>;
  EXPECT_EQ(OnlyAndSharedOn(router.get(), 1), Held({}, {}));
  EXPECT_TRUE(TrainedSteps(shard).empty()) << "experts were loaded onto the drained shard";
  EXPECT_EQ(OnlyAndSharedOn(router.get(), 0), Held({4, 5}, {0, 1, 2, 3}));
  EXPECT_EQ(OnlyAndSharedOn(router.get(), 2), Held({6, 7}, {0, 1, 2, 3}));
  const std::vector<float> x = common::RandomMatrix(16, Config().d_model, 9900);
  v1::InferResponse resp;
  ASSERT_TRUE(Infer(router.get(), Request(x, 16, "restarted"), &resp).ok());
  EXPECT_TRUE(Matches(x, 16, resp, *layer_));
  // Undone: hybrid over all three again (blocks of 2: shard 1 holds experts 6 and 7 alone).
  v1::DrainResponse undone;
  ASSERT_TRUE(UndoDrain(shard, &undone).ok());
  EXPECT_FALSE(undone.not_draining());
  EXPECT_EQ(AwaitOnlyAndSharedOn(router.get(), 1, Held({6, 7}, {0, 1, 2, 3}), 15),
            Held({6, 7}, {0, 1, 2, 3}));
}

// The coordinator's second phase is bounded (5 s): a shard that does not confirm the commit in
// time is named in unconfirmed_shards (the router sends it FinishStep again) and does not hold
// up the others.
TEST_F(ClusterTest, CoordinatorNamesAShardThatDidNotConfirmACommit) {
  auto c = common::Subprocess::Spawn({MOE_BIN_DIR "/moe-coordinator", "--host", "127.0.0.1",
                                      "--port", "0"});
  ASSERT_TRUE(c.ok()) << c.status();
  auto cport = c->ReadListeningPort(absl::Seconds(30));
  ASSERT_TRUE(cport.ok()) << cport.status();
  auto shard = common::Subprocess::Spawn({MOE_BIN_DIR "/moe-expert-server", "--checkpoint", *path_,
                                          "--host", "127.0.0.1", "--port", "0"});
  ASSERT_TRUE(shard.ok()) << shard.status();
  auto sport = shard->ReadListeningPort(absl::Seconds(30));
  ASSERT_TRUE(sport.ok()) << sport.status();
  const std::string live = absl::StrCat("127.0.0.1:", *sport), gone = "127.0.0.1:1";
  auto stub = v1::Coordinator::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", *cport), grpc::InsecureChannelCredentials()));
  v1::CommitStepRequest req;
  req.set_train_step(42);
  req.set_learning_rate(0.1f);
  req.add_shards(live);
  req.add_shards(gone);
  req.set_timeout_ms(500);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  v1::CommitStepResponse resp;
  const auto start = Clock::now();
  grpc::Status st = stub->CommitStep(&ctx, req, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_LT(Since(start), 15.0);  // 5 s for the gone shard, not the step's 30 s
  EXPECT_TRUE(resp.committed());
  ASSERT_EQ(resp.unconfirmed_shards_size(), 1);
  EXPECT_EQ(resp.unconfirmed_shards(0), gone);
  EXPECT_NE(resp.reason().find("commit on " + gone + " not confirmed"), std::string::npos)
      << resp.reason();
}

// gRPC sees that a client channel's connection attempt has ended only while a thread polls for
// it, and a process that serves nothing (moe-client, a user's client; this test process) has
// none between fail-fast calls. gRPC's backup poller, every 5 s by default, then was the one to
// see it, and the attempt's timer took it for timed out meanwhile: a channel whose server had
// restarted came back 4-5 s after the server served. common::SetGrpcProcessDefaults has the
// poller run every 100 ms; the bound leaves room for a reconnect backoff (up to 1 s) and a slow
// start under the sanitizers. Three restarts: without the setting one may be back soon by luck.
// Set before any test starts gRPC (it reads the setting once): run whole, this binary's earlier
// tests would start it first.
const bool kGrpcDefaults = (common::SetGrpcProcessDefaults(), true);

TEST_F(ClusterTest, AChannelOfAProcessThatOnlyCallsIsBackSoonAfterItsServerRestarts) {
  ASSERT_TRUE(kGrpcDefaults);
  const int port = testing::FreePortBlock(1);
  ASSERT_GT(port, 0);
  const std::string address = absl::StrCat("127.0.0.1:", port);
  auto start = [&]() -> absl::StatusOr<common::Subprocess> {
    ASSIGN_OR_RETURN(
        common::Subprocess p,
        common::Subprocess::Spawn({MOE_BIN_DIR "/moe-expert-server", "--checkpoint", *path_,
                                   "--host", "127.0.0.1", "--port", absl::StrCat(port)}));
    RETURN_IF_ERROR(p.ReadListeningPort(absl::Seconds(30)).status());
    return p;
  };
  auto serving = [](grpc::Channel* channel) {
    absl::StatusOr<common::HealthState> h = common::CheckHealth(channel, absl::Milliseconds(200));
    return h.ok() && *h == common::HealthState::kServing;
  };
  absl::StatusOr<common::Subprocess> shard = start();
  ASSERT_TRUE(shard.ok()) << shard.status();
  auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(),
                                           common::UserChannelArgs());
  ASSERT_TRUE(testing::Eventually([&] { return serving(channel.get()); }));
  for (int restart = 0; restart < 3; ++restart) {
    shard->Signal(SIGKILL);
    ASSERT_TRUE(shard->Wait(absl::Seconds(10)).ok());
    // Calls while it is down fail at once: the channel backs off between attempts.
    const auto down = Clock::now();
    while (Since(down) < 0.5) {
      EXPECT_FALSE(serving(channel.get()));
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    shard = start();  // listening; it serves its few small experts moments later
    ASSERT_TRUE(shard.ok()) << shard.status();
    // Only this channel's calls: another channel's connection would be polled for, and the
    // poll would see this channel's attempt end too.
    const auto back = Clock::now();
    ASSERT_TRUE(testing::Eventually([&] { return serving(channel.get()); }));
    EXPECT_LT(Since(back), 2.5) << "restart " << restart
                                << ": the channel came back long after its server";
  }
}

// One router places a cluster's shards at a time (the coordinator's placement lease). A second
// router following the same coordinator stands by: NOT_SERVING, each request refused UNAVAILABLE
// naming the router that holds the lease, while that one answers right. A coordinator that
// restarts keeps the holder it had (also one that took over from another). When the holder
// stops, it gives the lease up, and the one standing by takes over at once. A holder that stalls
// for a whole lease is replaced by the router standing by, and once it runs again it learns so
// and exits 1, saying which router holds the lease (it placed nothing more meanwhile: the new
// holder's answers stay right).
TEST_F(ClusterTest, OneRouterPlacesTheShardsAtATimeAndAnotherStandsBy) {
  const int metrics = testing::FreePortBlock(4);  // router, 2 shards, coordinator
  auto cluster = Start("hybrid", 2, {}, {}, metrics);
  ASSERT_NE(cluster, nullptr);
  const int coordinator_metrics = metrics + 3;
  auto grants = [&](const std::string& previous) {
    return ScrapeMetric(
        coordinator_metrics,
        "moe_coordinator_placement_lease_grants_total{previous=\"" + previous + "\"}");
  };
  const std::string bin = std::string(MOE_BIN_DIR) + "/moe-router";
  const std::vector<std::string> args = {
      "--checkpoint", *path_,  "--port", "0", "--coordinator", cluster->coordinator_address(),
      "--placement",  "hybrid"};
  // Router b's stderr goes to a file: its last line is read once it has exited.
  const std::string b_log = testing::TempPath("standby_router_b.log");
  std::string b_cmd = "exec '" + bin + "'";
  for (const std::string& a : args) b_cmd += " '" + a + "'";
  const int b_metrics = testing::FreePortBlock(1);
  b_cmd += " --metrics-port " + std::to_string(b_metrics) + " 2>'" + b_log + "'";
  auto b = common::Subprocess::Spawn({"/bin/sh", "-c", b_cmd});
  ASSERT_TRUE(b.ok()) << b.status();
  const absl::StatusOr<int> b_port = b->ReadListeningPort(absl::Seconds(30));
  ASSERT_TRUE(b_port.ok()) << b_port.status();
  auto a_stub = client::MakeRouterStub(cluster->router_address());
  auto b_stub = client::MakeRouterStub(absl::StrCat("127.0.0.1:", *b_port));
  auto info = [](v1::Router::Stub* stub) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::ClusterInfo i;
    EXPECT_TRUE(stub->GetClusterInfo(&ctx, v1::GetClusterInfoRequest(), &i).ok());
    return i;
  };
  auto lease_of = [&](v1::Router::Stub* stub) { return info(stub).placement_lease(); };
  auto stands_by = [&](v1::Router::Stub* stub) {
    return absl::StartsWith(lease_of(stub), "standing by: router ");
  };
  ASSERT_GE(WaitFor([&] { return stands_by(b_stub.get()); }, 20), 0) << lease_of(b_stub.get());
  const v1::ClusterInfo standby = info(b_stub.get());
  EXPECT_NE(standby.not_ready().find("the router does not serve: standing by: router "),
            std::string::npos)
      << standby.not_ready();
  EXPECT_NE(standby.not_ready().find("holds the placement lease at coordinator " +
                                     cluster->coordinator_address()),
            std::string::npos)
      << standby.not_ready();
  EXPECT_EQ(standby.placement_version(), 0u);
  EXPECT_EQ(ScrapeMetric(b_metrics, "moe_router_placement_lease_held"), 0);
  EXPECT_TRUE(absl::StartsWith(lease_of(a_stub.get()), "held (renewed ")) << lease_of(a_stub.get());
  EXPECT_EQ(grants("none"), 1);
  const int64_t n = 32;
  const std::vector<float> x = common::RandomMatrix(n, Config().d_model, 71);
  v1::InferResponse resp;
  grpc::Status st = Infer(b_stub.get(), Request(x, n, "standby"), &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(st.error_message().find("standing by: router "), std::string::npos)
      << st.error_message();
  const uint64_t a_version = PlacementOf(a_stub.get()).version();
  auto serves = [&](v1::Router::Stub* stub, const std::string& id) {
    v1::InferResponse r;
    return Infer(stub, Request(x, n, id), &r).ok() && Matches(x, n, r, *layer_);
  };
  EXPECT_TRUE(serves(a_stub.get(), "holder"));
  EXPECT_EQ(PlacementOf(a_stub.get()).version(), a_version);
  // The shards' placement lease epoch (ShardStatus.lease_epoch): one, the holder's, on every
  // shard, sent also where the holder loads nothing (a router taking over a placed cluster).
  auto epoch = [&] {
    std::set<uint64_t> seen;
    for (const std::string& address : cluster->shard_addresses()) {
      const std::optional<v1::ShardStatus> status = ShardStatusOf(address);
      seen.insert(status.has_value() ? status->lease_epoch() : 0);
    }
    return seen.size() == 1 ? *seen.begin() : 0;
  };
  uint64_t a_epoch = epoch();
  EXPECT_GT(a_epoch, 0u) << "the shards do not all have a's epoch";
  // A holder granted again by a restarted coordinator gets a later epoch, and sends it to every
  // shard (at a tick: it has nothing to load): returns it.
  auto epoch_after_restart = [&](uint64_t before) {
    uint64_t now = 0;
    EXPECT_GE(WaitFor([&] { return (now = epoch()) > before; }, 10), 0)
        << "the holder's epoch from the restarted coordinator did not reach every shard";
    return now;
  };

  // The coordinator is killed and started again: it knows no holder, and the router standing
  // by, which knows of one, is refused until the holder has asked again and holds the lease.
  auto coordinator = v1::Coordinator::NewStub(
      grpc::CreateChannel(cluster->coordinator_address(), grpc::InsecureChannelCredentials()));
  auto restart_coordinator = [&] {
    cluster->coordinator().Signal(SIGKILL);
    ASSERT_TRUE(cluster->coordinator().Wait(absl::Seconds(5)).ok());
    ASSERT_TRUE(cluster->RestartCoordinator().ok());
    auto settling = [&] {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      v1::Membership m;
      return !coordinator->ListMembers(&ctx, v1::ListMembersRequest(), &m).ok() || m.settling();
    };
    ASSERT_GE(WaitFor([&] { return !settling(); }, 20), 0) << "the coordinator still settles";
  };
  restart_coordinator();
  EXPECT_TRUE(absl::StartsWith(lease_of(a_stub.get()), "held (renewed ")) << lease_of(a_stub.get());
  EXPECT_TRUE(stands_by(b_stub.get())) << lease_of(b_stub.get());
  EXPECT_TRUE(serves(a_stub.get(), "holder"));
  a_epoch = epoch_after_restart(a_epoch);

  // The holder stops: it gives the lease up, and b takes over.
  cluster->router().Signal(SIGTERM);
  ASSERT_TRUE(cluster->router().Wait(absl::Seconds(10)).ok());
  ASSERT_GE(WaitFor([&] { return absl::StartsWith(lease_of(b_stub.get()), "held"); }, 20), 0)
      << lease_of(b_stub.get());
  EXPECT_EQ(grants("released"), 1) << "not given up at the holder's shutdown";
  EXPECT_EQ(grants("lapsed"), 0);
  ASSERT_GE(WaitFor([&] { return serves(b_stub.get(), "b"); }, 30), 0)
      << "b did not serve within 30 s of holding the lease";
  EXPECT_EQ(ScrapeMetric(b_metrics, "moe_router_placement_lease_held"), 1);
  uint64_t b_epoch = 0;
  EXPECT_GE(WaitFor([&] { return (b_epoch = epoch()) > a_epoch; }, 10), 0)
      << "b's epoch did not reach every shard";

  // c stands by. The coordinator restarts again: b, which stood by before, keeps the lease.
  auto c = common::Subprocess::Spawn([&] {
    std::vector<std::string> v = {bin};
    v.insert(v.end(), args.begin(), args.end());
    return v;
  }());
  ASSERT_TRUE(c.ok()) << c.status();
  const absl::StatusOr<int> c_port = c->ReadListeningPort(absl::Seconds(30));
  ASSERT_TRUE(c_port.ok()) << c_port.status();
  auto c_stub = client::MakeRouterStub(absl::StrCat("127.0.0.1:", *c_port));
  ASSERT_GE(WaitFor([&] { return stands_by(c_stub.get()); }, 20), 0) << lease_of(c_stub.get());
  restart_coordinator();
  EXPECT_TRUE(absl::StartsWith(lease_of(b_stub.get()), "held (renewed ")) << lease_of(b_stub.get());
  EXPECT_TRUE(stands_by(c_stub.get())) << lease_of(c_stub.get());
  b_epoch = epoch_after_restart(b_epoch);

  // b stalls past the lease (3 s): c takes over, and b, running again, exits.
  b->Signal(SIGSTOP);
  const bool c_serves = WaitFor([&] { return serves(c_stub.get(), "c"); }, 30) >= 0;
  b->Signal(SIGCONT);
  ASSERT_TRUE(c_serves) << "c did not take over within 30 s of b's stall: "
                        << info(c_stub.get()).not_ready();
  EXPECT_EQ(grants("lapsed"), 1);
  // c's epoch is on every shard: a load or unload of b's (one of a switch b was making when
  // it stalled) is refused.
  uint64_t c_epoch = 0;
  EXPECT_GE(WaitFor([&] { return (c_epoch = epoch()) > b_epoch; }, 10), 0)
      << "c's epoch did not reach every shard";
  {
    auto shard = v1::ExpertShard::NewStub(
        grpc::CreateChannel(cluster->shard_addresses()[0], grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::UnloadExpertsRequest req;
    req.add_experts(0);
    req.set_lease_epoch(b_epoch);
    v1::ShardStatus status;
    const grpc::Status refused = shard->UnloadExperts(&ctx, req, &status);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_NE(refused.error_message().find(
                  absl::StrCat("placement lease epoch ", b_epoch, " is older than ", c_epoch)),
              std::string::npos)
        << refused.error_message();
  }
  const absl::StatusOr<int> b_exit = b->Wait(absl::Seconds(15));
  ASSERT_TRUE(b_exit.ok()) << "b kept running after c took the lease over";
  EXPECT_TRUE(WIFEXITED(*b_exit) && WEXITSTATUS(*b_exit) == 1) << "wait status " << *b_exit;
  std::ifstream log_in(b_log);
  const std::string log((std::istreambuf_iterator<char>(log_in)), std::istreambuf_iterator<char>());
  const std::string lost = "holds the placement lease at coordinator " +
                           cluster->coordinator_address() + " now (this router last renewed it ";
  const size_t at = log.find(lost);
  EXPECT_NE(at, std::string::npos) << log;
  EXPECT_EQ(log.find(lost, at + 1), std::string::npos) << "said twice:\n" << log;
  EXPECT_NE(log.find("start it again to stand by"), std::string::npos) << log;
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(serves(c_stub.get(), "c-after"));
  c->Signal(SIGTERM);
  EXPECT_TRUE(c->Wait(absl::Seconds(10)).ok());
  std::remove(b_log.c_str());
}

}  // namespace
}  // namespace moe
