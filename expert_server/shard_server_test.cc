#include "expert_server/shard_server.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/health_check_service_interface.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "services/common/random_checkpoint.h"
#include "services/common/safetensors.h"
#include "services/common/server_util.h"
#include "services/common/tensor_codec.h"
#include "tests/reference/loopback_server.h"
#include "tests/reference/registry_value.h"
#include "tests/reference/shard_export.h"
#include "tests/reference/test_util.h"

namespace moe::expert {
namespace {

using Stream = grpc::ClientReaderWriter<v1::DispatchRequest, v1::DispatchResponse>;

common::ModelConfig TestConfig() {
  common::ModelConfig c;
  c.num_experts = 4;
  c.d_model = 32;
  c.d_ff = 64;
  c.top_k = 2;
  c.activation = common::Activation::kSilu;
  c.gated = true;
  return c;
}

class ShardServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ck_ = new common::Checkpoint(common::MakeRandomCheckpoint({TestConfig(), true, 17}));
    path_ = new std::string(::moe::testing::TempPath("shard_test.safetensors"));
    ASSERT_TRUE(common::SaveCheckpoint(*path_, *ck_).ok());
    setup_ok_ = true;
  }

  // A failure in SetUpTestSuite would only skip the tests; fail them instead.
  void SetUp() override { ASSERT_TRUE(setup_ok_) << "suite set-up failed"; }

  // Options for a shard that starts holding no expert.
  static ShardServerOptions WithoutExperts() {
    ShardServerOptions o;
    o.initial_experts = std::vector<int>{};
    return o;
  }

  std::unique_ptr<ShardServer> StartServer(ShardServerOptions o = {}) {
    o.checkpoint = *path_;
    auto s = ShardServer::Start(o);
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return nullptr;
    EXPECT_TRUE((*s)->WaitUntilLoaded(absl::Seconds(30)).ok());
    return std::move(*s);
  }

  static std::unique_ptr<v1::ExpertShard::Stub> Stub(const ShardServer& s) {
    return v1::ExpertShard::NewStub(grpc::CreateChannel(s.address(),
                                                        grpc::InsecureChannelCredentials()));
  }

  // A batch of `rows` random rows; expert e gets the rows listed in `assign[e]`.
  static v1::DispatchRequest Batch(uint64_t id, int64_t rows,
                                   const std::map<int, std::vector<int>>& assign,
                                   uint64_t seed = 1) {
    v1::DispatchRequest r;
    r.set_batch_id(id);
    common::EncodeTensor(common::RandomMatrix(rows, TestConfig().d_model, seed + id),
                         {rows, TestConfig().d_model}, common::WireType::kFloat32,
                         r.mutable_rows());
    for (const auto& [e, idx] : assign) {
      v1::ExpertRows* er = r.add_experts();
      er->set_expert(e);
      for (int i : idx) er->add_rows(i);
    }
    return r;
  }

  // The in-process kernel's output for expert e on the listed rows of `req`.
  static std::vector<float> Reference(const v1::DispatchRequest& req, int e,
                                      const common::ExpertWeights* weights = nullptr) {
    const int64_t d = TestConfig().d_model;
    auto view = common::DecodeTensor(req.rows(), "rows");
    std::vector<float> all = common::ViewToFloat(*view);
    std::vector<float> in;
    for (const auto& er : req.experts()) {
      if (er.expert() != e) continue;
      for (int r : er.rows()) in.insert(in.end(), all.begin() + r * d, all.begin() + (r + 1) * d);
    }
    auto ffn = ExpertFfn::Create(TestConfig(), weights ? *weights : ck_->experts[e]);
    const int64_t m = static_cast<int64_t>(in.size()) / d;
    std::vector<float> out(m * d);
    EXPECT_TRUE((*ffn)->Forward(in.data(), m, out.data()).ok());
    return out;
  }

  static std::vector<float> Output(const v1::DispatchResponse& resp, int e) {
    for (const auto& o : resp.outputs()) {
      if (o.expert() == e) return common::ViewToFloat(*common::DecodeTensor(o.output(), "out"));
    }
    ADD_FAILURE() << "no output for expert " << e;
    return {};
  }

  // Each listed expert's output in `resp` is bit-identical to the in-process kernel's.
  static void ExpectBitIdentical(const v1::DispatchRequest& req, const v1::DispatchResponse& resp,
                                 std::initializer_list<int> experts) {
    for (int e : experts) {
      const std::vector<float> got = Output(resp, e), want = Reference(req, e);
      ASSERT_EQ(got.size(), want.size()) << "expert " << e;
      EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * 4), 0) << "expert " << e;
    }
  }

  static double Metric(prometheus::Registry& reg, const std::string& name,
                       const std::map<std::string, std::string>& labels = {}) {
    return ::moe::testing::RegistryValue(reg, name, labels);
  }

  static common::Checkpoint* ck_;
  static std::string* path_;
  static bool setup_ok_;
};

bool ShardServerTest::setup_ok_ = false;
common::Checkpoint* ShardServerTest::ck_ = nullptr;
std::string* ShardServerTest::path_ = nullptr;

TEST_F(ShardServerTest, OutputsBitIdenticalToInProcessKernel) {
  auto server = StartServer();
  auto stub = Stub(*server);
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  // Row 2 goes to experts 0 and 1 and travels once.
  const v1::DispatchRequest req = Batch(7, 10, {{0, {0, 2, 5}}, {1, {1, 2, 3, 9}}});
  ASSERT_TRUE(stream->Write(req));
  v1::DispatchResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_EQ(resp.batch_id(), 7u);
  EXPECT_EQ(resp.code(), 0) << resp.message();
  ASSERT_EQ(resp.outputs_size(), 2);
  ExpectBitIdentical(req, resp, {0, 1});
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ShardServerTest, ManyBatchesInFlightOnOneStreamAndBf16) {
  ShardServerOptions o;
  o.pool.threads = 2;
  auto server = StartServer(o);
  auto stub = Stub(*server);
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  constexpr int kBatches = 40;
  std::map<uint64_t, v1::DispatchRequest> sent;
  for (int i = 0; i < kBatches; ++i) {
    v1::DispatchRequest req = Batch(100 + i, 6, {{i % 4, {0, 1, 2}}, {(i + 1) % 4, {3, 4, 5, 0}}});
    if (i % 2 == 1) req.set_output_dtype(v1::BFLOAT16);
    sent[req.batch_id()] = req;
    ASSERT_TRUE(stream->Write(req));
  }
  stream->WritesDone();
  int got = 0;
  v1::DispatchResponse resp;
  while (stream->Read(&resp)) {
    ASSERT_EQ(resp.code(), 0) << resp.message();
    const v1::DispatchRequest& req = sent.at(resp.batch_id());
    for (const auto& er : req.experts()) {
      const std::vector<float> out = Output(resp, er.expert()), want = Reference(req, er.expert());
      ASSERT_EQ(out.size(), want.size());
      const double tol = req.output_dtype() == v1::BFLOAT16 ? 1e-2 : 1e-5;
      for (size_t i = 0; i < out.size(); ++i) {
        ASSERT_NEAR(out[i], want[i], tol * (1 + std::fabs(want[i])));
      }
    }
    ++got;
  }
  EXPECT_EQ(got, kBatches);
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ShardServerTest, SeveralStreamsAtOnce) {
  ShardServerOptions o;
  o.pool.threads = 2;
  auto server = StartServer(o);
  auto stub = Stub(*server);
  std::vector<std::thread> clients;
  std::atomic<int> ok{0};
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c] {
      grpc::ClientContext ctx;
      auto stream = stub->Dispatch(&ctx);
      std::map<uint64_t, v1::DispatchRequest> sent;
      for (int i = 0; i < 15; ++i) {
        v1::DispatchRequest req = Batch(c * 1000 + i, 4, {{(c + i) % 4, {0, 1, 2, 3}}}, c);
        sent[req.batch_id()] = req;
        stream->Write(req);
      }
      stream->WritesDone();
      v1::DispatchResponse resp;
      while (stream->Read(&resp)) {
        const auto& req = sent.at(resp.batch_id());
        const int e = req.experts(0).expert();
        const auto out = Output(resp, e), want = Reference(req, e);
        bool same = out.size() == want.size();
        for (size_t i = 0; same && i < out.size(); ++i) {
          same = std::fabs(out[i] - want[i]) <= 1e-5 * (1 + std::fabs(want[i]));
        }
        if (resp.code() == 0 && same) ++ok;
      }
      stream->Finish();
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(ok.load(), 60);
}

TEST_F(ShardServerTest, ConcurrentBatchesForOneExpertAreCoalesced) {
  ShardServerOptions o;
  o.pool.threads = 1;
  o.pool.batch_delay = absl::Milliseconds(200);
  auto server = StartServer(o);
  auto stub = Stub(*server);
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  std::map<uint64_t, v1::DispatchRequest> sent;
  for (int i = 0; i < 8; ++i) {
    v1::DispatchRequest req = Batch(i, 5, {{2, {0, 1, 2, 3, 4}}});
    sent[i] = req;
    ASSERT_TRUE(stream->Write(req));
  }
  stream->WritesDone();
  v1::DispatchResponse resp;
  int n = 0;
  while (stream->Read(&resp)) {
    ASSERT_EQ(resp.code(), 0) << resp.message();
    const auto out = Output(resp, 2), want = Reference(sent.at(resp.batch_id()), 2);
    for (size_t i = 0; i < out.size(); ++i) {
      ASSERT_NEAR(out[i], want[i], 1e-5 * (1 + std::fabs(want[i])));
    }
    ++n;
  }
  EXPECT_EQ(n, 8);
  EXPECT_TRUE(stream->Finish().ok());
  // All 8 batches (40 rows) reached the queue within the delay: fewer matmuls than batches.
  const double matmuls = Metric(*server->registry(), "moe_shard_coalesced_rows");
  EXPECT_GE(matmuls, 1);
  EXPECT_LT(matmuls, 8);
  EXPECT_EQ(Metric(*server->registry(), "moe_shard_tokens_total", {{"expert", "2"}}), 40);
  EXPECT_EQ(Metric(*server->registry(), "moe_shard_batches_total", {{"expert", "2"}}), 8);
}

// Sends `req` on a fresh stream and returns the response.
v1::DispatchResponse RoundTrip(v1::ExpertShard::Stub* stub, const v1::DispatchRequest& req) {
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  EXPECT_TRUE(stream->Write(req));
  v1::DispatchResponse resp;
  EXPECT_TRUE(stream->Read(&resp));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  return resp;
}

TEST_F(ShardServerTest, BadBatchesGetClearErrorsAndTheStreamKeepsServing) {
  ShardServerOptions o;
  o.initial_experts = std::vector<int>{0, 1};
  o.max_batch_rows = 64;
  auto server = StartServer(o);
  auto stub = Stub(*server);
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  struct Case {
    const char* name;
    v1::DispatchRequest req;
    int code;
    const char* needle;
  };
  std::vector<Case> cases;
  {
    v1::DispatchRequest r = Batch(1, 2, {{0, {0, 1}}});
    r.mutable_rows()->set_shape(1, 31);
    r.mutable_rows()->mutable_data()->resize(2 * 31 * 4);
    cases.push_back({"wrong row width", r, grpc::INVALID_ARGUMENT, "must be [N, 32]"});
  }
  cases.push_back({"unknown expert", Batch(2, 2, {{99, {0}}}), grpc::INVALID_ARGUMENT,
                   "unknown expert 99"});
  cases.push_back({"not loaded", Batch(3, 2, {{2, {0}}}), grpc::FAILED_PRECONDITION,
                   "expert 2 is not loaded on this shard (placement version 0)"});
  // Every expert of the batch not held here is named, in the message and in missing_experts
  // (checked below): the router sends their rows elsewhere and the rest back here.
  cases.push_back({"some not loaded", Batch(14, 3, {{3, {0}}, {0, {1}}, {2, {2}}}),
                   grpc::FAILED_PRECONDITION,
                   "batch 14: expert 2 is not loaded on this shard (placement version 0); the "
                   "batch's experts not held here: 2, 3"});
  {
    v1::DispatchRequest r = Batch(4, 2, {{0, {0}}});
    r.mutable_rows()->mutable_data()->resize(7);
    cases.push_back({"malformed tensor", r, grpc::INVALID_ARGUMENT, "data has 7 bytes"});
  }
  {
    v1::DispatchRequest r = Batch(5, 2, {});
    cases.push_back({"no experts", r, grpc::INVALID_ARGUMENT, "is empty"});
  }
  {
    v1::DispatchRequest r = Batch(6, 0, {{0, {}}});
    cases.push_back({"zero rows", r, grpc::INVALID_ARGUMENT, "0 rows"});
  }
  {
    v1::DispatchRequest r = Batch(7, 1, {{0, {0}}});
    r.mutable_rows()->set_shape(0, int64_t{1} << 40);
    cases.push_back({"huge declared size", r, grpc::RESOURCE_EXHAUSTED, "elements"});
  }
  {
    std::vector<int> many(100, 0);
    cases.push_back({"too many rows", Batch(8, 1, {{0, many}}), grpc::RESOURCE_EXHAUSTED,
                     "more than the shard's limit of 64"});
  }
  cases.push_back({"row out of range", Batch(9, 3, {{0, {0, 3}}}), grpc::INVALID_ARGUMENT,
                   "row index 3 is out of range [0, 3)"});
  cases.push_back({"duplicate expert", Batch(10, 3, {{0, {0}}, {1, {1}}}), grpc::INVALID_ARGUMENT,
                   "twice"});
  cases.back().req.mutable_experts(1)->set_expert(0);
  {
    v1::DispatchRequest r = Batch(11, 2, {{0, {0}}});
    r.mutable_rows()->set_dtype(static_cast<v1::DataType>(9));
    cases.push_back({"unknown dtype", r, grpc::INVALID_ARGUMENT, "dtype 9"});
  }
  // From a router of another model (DispatchRequest.num_experts set): refused as a shard in the
  // wrong place, which the router fails over, not as the client's bad input.
  {
    v1::DispatchRequest r = Batch(12, 2, {{0, {0}}});
    r.set_num_experts(5);
    cases.push_back({"another model's experts", r, grpc::FAILED_PRECONDITION,
                     "batch 12 is for a model of 5 experts of d_model 32; this shard serves 4 of "
                     "d_model 32: start it from the router's checkpoint"});
  }
  {
    v1::DispatchRequest r = Batch(13, 2, {{0, {0}}});
    r.set_num_experts(4);
    r.mutable_rows()->set_shape(1, 31);
    r.mutable_rows()->mutable_data()->resize(2 * 31 * 4);
    cases.push_back({"another model's width", r, grpc::FAILED_PRECONDITION,
                     "is for a model of 4 experts of d_model 31; this shard serves 4 of d_model 32"});
  }
  for (const Case& c : cases) ASSERT_TRUE(stream->Write(c.req)) << c.name;
  // A good batch after all of them.
  const v1::DispatchRequest good = Batch(50, 3, {{1, {0, 1, 2}}});
  ASSERT_TRUE(stream->Write(good));
  stream->WritesDone();
  std::map<uint64_t, v1::DispatchResponse> got;
  v1::DispatchResponse resp;
  while (stream->Read(&resp)) got[resp.batch_id()] = resp;
  EXPECT_TRUE(stream->Finish().ok());
  for (const Case& c : cases) {
    ASSERT_TRUE(got.count(c.req.batch_id())) << c.name;
    const auto& r = got[c.req.batch_id()];
    EXPECT_EQ(r.code(), c.code) << c.name << ": " << r.message();
    EXPECT_NE(r.message().find(c.needle), std::string::npos) << c.name << ": " << r.message();
  }
  EXPECT_EQ(std::vector<int>(got[3].missing_experts().begin(), got[3].missing_experts().end()),
            std::vector<int>{2});
  EXPECT_EQ(std::vector<int>(got[14].missing_experts().begin(), got[14].missing_experts().end()),
            (std::vector<int>{2, 3}));
  EXPECT_EQ(got[4].missing_experts_size(), 0) << "named for a refusal of another kind";
  ASSERT_TRUE(got.count(50));
  EXPECT_EQ(got[50].code(), 0);
  EXPECT_EQ(Output(got[50], 1), Reference(good, 1));
  EXPECT_GE(Metric(*server->registry(), "moe_shard_rejected_batches_total", {{"reason", "invalid"}}), 7);
  EXPECT_EQ(
      Metric(*server->registry(), "moe_shard_rejected_batches_total", {{"reason", "not_loaded"}}),
      2);
  EXPECT_EQ(Metric(*server->registry(), "moe_shard_rejected_batches_total", {{"reason", "other_model"}}), 2);
}

TEST_F(ShardServerTest, GarbageThenVanishingStreamDoesNotHurtOthers) {
  auto server = StartServer();
  {
    auto channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
    grpc::GenericStub generic(channel);
    grpc::ClientContext ctx;
    grpc::CompletionQueue cq;
    auto call = generic.PrepareCall(&ctx, "/moe.v1.ExpertShard/Dispatch", &cq);
    void* tag;
    bool ok;
    call->StartCall(reinterpret_cast<void*>(1));
    cq.Next(&tag, &ok);
    const std::string junk = "\xff\xff\xff\xff\x0f garbage that is not a DispatchRequest";
    grpc::Slice slice(junk);
    grpc::ByteBuffer buf(&slice, 1);
    call->Write(buf, reinterpret_cast<void*>(2));
    cq.Next(&tag, &ok);
    ctx.TryCancel();  // and vanish
    grpc::Status st;
    call->Finish(&st, reinterpret_cast<void*>(3));
    while (cq.Next(&tag, &ok)) {
      if (tag == reinterpret_cast<void*>(3)) break;
    }
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
  }
  auto stub = Stub(*server);
  const v1::DispatchRequest req = Batch(1, 2, {{3, {0, 1}}});
  const v1::DispatchResponse resp = RoundTrip(stub.get(), req);
  EXPECT_EQ(resp.code(), 0) << resp.message();
  EXPECT_EQ(Output(resp, 3), Reference(req, 3));
}

TEST_F(ShardServerTest, FullQueueRejectsExactlyWhatDoesNotFitAtOnce) {
  ShardServerOptions o;
  o.pool.threads = 1;
  o.pool.batch_delay = absl::Milliseconds(300);
  o.pool.max_queue_rows = 100;
  auto server = StartServer(o);
  auto stub = Stub(*server);
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  std::vector<int> rows30(30);
  for (int i = 0; i < 30; ++i) rows30[i] = i;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(stream->Write(Batch(i, 30, {{0, rows30}})));
  stream->WritesDone();
  std::map<uint64_t, std::pair<int, double>> got;
  v1::DispatchResponse resp;
  while (stream->Read(&resp)) {
    got[resp.batch_id()] = {resp.code(), std::chrono::duration<double>(
                                             std::chrono::steady_clock::now() - start).count()};
    if (resp.code() != 0) {
      EXPECT_NE(resp.message().find("queue is full"), std::string::npos) << resp.message();
    }
  }
  EXPECT_TRUE(stream->Finish().ok());
  ASSERT_EQ(got.size(), 10u);
  // 3 batches of 30 rows fit in 100; the other 7 are refused, before the delay has passed.
  for (int i = 0; i < 10; ++i) {
    if (i < 3) {
      EXPECT_EQ(got[i].first, 0) << i;
    } else {
      EXPECT_EQ(got[i].first, grpc::RESOURCE_EXHAUSTED) << i;
      EXPECT_LT(got[i].second, 0.25) << "batch " << i << " was not refused at once";
    }
  }
  EXPECT_EQ(Metric(*server->registry(), "moe_shard_rejected_batches_total", {{"reason", "queue_full"}}), 7);
  // A flood of batches that do not fit is refused without the server's memory growing: the
  // queue stays bounded and refused batches are not decoded.
  auto rss_mb = [] {
    long pages = 0, resident = 0;
    FILE* f = std::fopen("/proc/self/statm", "r");
    if (f != nullptr) {
      if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
      std::fclose(f);
    }
    return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1 << 20);
  };
  grpc::ClientContext ctx2;
  auto flood = stub->Dispatch(&ctx2);
  std::vector<int> rows90(90);
  for (int i = 0; i < 90; ++i) rows90[i] = i;
  ASSERT_TRUE(flood->Write(Batch(1000, 90, {{0, rows90}})));  // fills the queue
  const v1::DispatchRequest big = Batch(1001, 60, {{0, std::vector<int>(rows90.begin(), rows90.begin() + 60)}});
  const double before = rss_mb();
  int refused = 0;
  for (int i = 0; i < 100; ++i) {
    v1::DispatchRequest r = big;
    r.set_batch_id(2000 + i);
    ASSERT_TRUE(flood->Write(r));
    v1::DispatchResponse resp;
    ASSERT_TRUE(flood->Read(&resp));
    refused += resp.code() == grpc::RESOURCE_EXHAUSTED;
  }
  EXPECT_EQ(refused, 100);
  EXPECT_LT(rss_mb() - before, 20.0) << "memory grew under overload";
  EXPECT_LE(server->pool().queued_rows(), 100);
  flood->WritesDone();
  v1::DispatchResponse last;
  while (flood->Read(&last)) {
  }
  flood->Finish();
}

TEST_F(ShardServerTest, CancelledStreamStopsItsPendingWork) {
  ShardServerOptions o;
  o.pool.threads = 1;
  // Long enough that all five batches are queued before the worker would compute the first, also
  // under TSan (where reading five batches took more than 50 ms).
  o.pool.batch_delay = absl::Seconds(2);
  auto server = StartServer(o);
  auto stub = Stub(*server);
  {
    grpc::ClientContext ctx;
    auto stream = stub->Dispatch(&ctx);
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(stream->Write(Batch(i, 4, {{1, {0, 1, 2, 3}}})));
    // Items stay queued while the worker waits out the delay.
    ASSERT_TRUE(::moe::testing::Eventually([&] { return server->pool().queued_batches() == 5; }))
        << "the shard queued " << server->pool().queued_batches() << " of the 5 batches";
    ctx.TryCancel();
    stream->Finish();
  }
  // Past the delay the worker must drop the items rather than compute them.
  auto cancelled = [&] {
    return Metric(*server->registry(), "moe_shard_rejected_batches_total", {{"reason", "cancelled"}});
  };
  EXPECT_TRUE(::moe::testing::Eventually([&] { return cancelled() >= 5; }));
  EXPECT_EQ(cancelled(), 5);
  EXPECT_EQ(Metric(*server->registry(), "moe_shard_tokens_total", {{"expert", "1"}}), 0);
  EXPECT_EQ(server->pool().queued_batches(), 0);
}

// DispatchRequest.cancel drops the one batch it names: answered CANCELLED, never computed, while
// the stream and its other batches go on. A cancel of a batch already answered does nothing.
TEST_F(ShardServerTest, ACancelledBatchIsDroppedAndTheStreamGoesOn) {
  ShardServerOptions o;
  o.pool.threads = 1;
  o.pool.batch_delay = absl::Seconds(1);  // both batches queued before the first is computed
  auto server = StartServer(o);
  auto stub = Stub(*server);
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  ASSERT_TRUE(stream->Write(Batch(7, 4, {{1, {0, 1, 2, 3}}})));
  ASSERT_TRUE(stream->Write(Batch(8, 2, {{2, {0, 1}}})));
  ASSERT_TRUE(::moe::testing::Eventually([&] { return server->pool().queued_batches() == 2; }));
  v1::DispatchRequest cancel;
  cancel.set_batch_id(7);
  cancel.set_cancel(true);
  ASSERT_TRUE(stream->Write(cancel));
  std::map<uint64_t, v1::DispatchResponse> answers;
  for (int i = 0; i < 2; ++i) {
    v1::DispatchResponse r;
    ASSERT_TRUE(stream->Read(&r));
    answers[r.batch_id()] = r;
  }
  EXPECT_EQ(answers[7].code(), grpc::CANCELLED) << answers[7].message();
  EXPECT_NE(answers[7].message().find("cancelled batch 7"), std::string::npos)
      << answers[7].message();
  EXPECT_EQ(answers[8].code(), grpc::OK) << answers[8].message();
  EXPECT_EQ(answers[8].outputs_size(), 1);
  // Answered already: the second cancel of 7 and one of 8 change nothing; the stream serves on.
  ASSERT_TRUE(stream->Write(cancel));
  cancel.set_batch_id(8);
  ASSERT_TRUE(stream->Write(cancel));
  ASSERT_TRUE(stream->Write(Batch(9, 1, {{2, {0}}})));
  v1::DispatchResponse r;
  ASSERT_TRUE(stream->Read(&r));
  EXPECT_EQ(r.batch_id(), 9u);
  EXPECT_EQ(r.code(), grpc::OK) << r.message();
  EXPECT_EQ(
      Metric(*server->registry(), "moe_shard_rejected_batches_total", {{"reason", "cancelled"}}),
      1);
  EXPECT_EQ(Metric(*server->registry(), "moe_shard_tokens_total", {{"expert", "1"}}), 0);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ShardServerTest, PassedDeadlineStopsPendingWork) {
  ShardServerOptions o;
  o.pool.threads = 1;
  o.pool.batch_delay = absl::Milliseconds(200);
  auto server = StartServer(o);
  auto stub = Stub(*server);
  v1::DispatchRequest req = Batch(1, 2, {{0, {0, 1}}});
  req.set_timeout_ms(50);
  const v1::DispatchResponse resp = RoundTrip(stub.get(), req);
  EXPECT_EQ(resp.code(), grpc::DEADLINE_EXCEEDED) << resp.message();
  EXPECT_EQ(Metric(*server->registry(), "moe_shard_tokens_total", {{"expert", "0"}}), 0);
}

TEST_F(ShardServerTest, SecondShardCopiesAnExpertFromAPeer) {
  auto a = StartServer();
  ShardServerOptions o;
  o.initial_experts = std::vector<int>{};
  auto b = StartServer(o);
  auto stub_b = Stub(*b);
  {
    v1::LoadExpertsRequest req;
    req.add_experts(2);
    req.set_placement_version(3);
    req.set_source_peer(a->address());
    req.set_wait(true);
    v1::ShardStatus st;
    // The copy fails fast when its link to the peer breaks (the cluster's 1 s keepalive, which a
    // TSan build under load can miss: CI saw UNAVAILABLE once); the router tries again on its
    // next tick, and so does this test, a few times.
    grpc::Status loaded;
    for (int attempt = 0; attempt < 5; ++attempt) {
      grpc::ClientContext ctx;
      st.Clear();
      loaded = stub_b->LoadExperts(&ctx, req, &st);
      if (loaded.error_code() != grpc::StatusCode::UNAVAILABLE) break;
    }
    ASSERT_TRUE(loaded.ok()) << loaded.error_code() << " " << loaded.error_message();
    ASSERT_EQ(st.experts_size(), 1);
    EXPECT_EQ(st.experts(0).state(), v1::ExpertStatus::READY);
    EXPECT_EQ(st.placement_version(), 3u);
    EXPECT_TRUE(st.serving());
  }
  const v1::DispatchRequest req = Batch(1, 5, {{2, {0, 1, 2, 3, 4}}});
  const auto from_b = RoundTrip(stub_b.get(), req);
  const auto from_a = RoundTrip(Stub(*a).get(), req);
  ASSERT_EQ(from_b.code(), 0) << from_b.message();
  EXPECT_EQ(Output(from_b, 2), Output(from_a, 2));
  EXPECT_EQ(Output(from_b, 2), Reference(req, 2));
  // An older placement version is refused; a missing peer expert fails clearly.
  grpc::ClientContext ctx;
  v1::LoadExpertsRequest old;
  old.add_experts(1);
  old.set_placement_version(2);
  v1::ShardStatus st;
  EXPECT_EQ(stub_b->LoadExperts(&ctx, old, &st).error_code(), grpc::FAILED_PRECONDITION);
  // Replacing newer weights is a copy's option: there is nothing to replace them with otherwise.
  grpc::ClientContext rctx;
  v1::LoadExpertsRequest back;
  back.add_experts(2);
  back.set_placement_version(3);
  back.set_replace_newer(true);
  const grpc::Status refused = stub_b->LoadExperts(&rctx, back, &st);
  EXPECT_EQ(refused.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_EQ(refused.error_message(), "replace_newer needs a source_peer to copy from");
}

TEST_F(ShardServerTest, ACopyFromAPeerThatIsGoneFailsAtOnce) {
  // A port that was just listening and is closed now: nothing answers there.
  std::string gone;
  {
    auto peer = StartServer();
    gone = peer->address();
    peer->Shutdown();
  }
  ShardServerOptions o;
  o.initial_experts = std::vector<int>{};
  auto b = StartServer(o);
  auto stub_b = Stub(*b);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::LoadExpertsRequest req;
  req.add_experts(2);
  req.set_placement_version(1);
  req.set_source_peer(gone);
  req.set_wait(true);
  v1::ShardStatus st;
  const auto start = std::chrono::steady_clock::now();
  grpc::Status s = stub_b->LoadExperts(&ctx, req, &st);
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // The load fails in about a connection attempt, not at the copy's 120 s deadline (which held
  // up the router's placement switch when a source shard had just died).
  EXPECT_LT(took, 10.0);
  EXPECT_EQ(s.error_code(), grpc::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("copying expert 2 from " + gone), std::string::npos)
      << s.error_message();
}

// An unloaded expert leaves the status (its last batch has long finished: nothing to drain), and
// a batch of it names the placement version that took it away.
TEST_F(ShardServerTest, UnloadDrainsAndStatusReportsState) {
  auto server = StartServer();
  auto stub = Stub(*server);
  {
    grpc::ClientContext ctx;
    v1::UnloadExpertsRequest req;
    req.add_experts(3);
    req.set_placement_version(5);
    v1::ShardStatus st;
    ASSERT_TRUE(stub->UnloadExperts(&ctx, req, &st).ok());
    EXPECT_EQ(st.placement_version(), 5u);
    ASSERT_EQ(st.experts_size(), 3) << "experts 0, 1 and 2 stay";
    for (const auto& e : st.experts()) EXPECT_NE(e.expert(), 3);
    EXPECT_EQ(st.num_experts(), 4);
    EXPECT_EQ(st.d_model(), 32);
    EXPECT_EQ(st.threads(), 1);
  }
  const auto resp = RoundTrip(stub.get(), Batch(1, 1, {{3, {0}}}));
  EXPECT_EQ(resp.code(), grpc::FAILED_PRECONDITION);
  EXPECT_NE(resp.message().find("placement version 5"), std::string::npos) << resp.message();
}

TEST_F(ShardServerTest, HealthFollowsLoadingAndShutdown) {
  auto server = StartServer(WithoutExperts());
  auto channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
  auto health = [&] {
    auto h = common::CheckHealth(channel.get(), absl::Seconds(5));
    EXPECT_TRUE(h.ok()) << h.status();
    return h.ok() ? *h : common::HealthState::kUnknown;
  };
  EXPECT_EQ(health(), common::HealthState::kNotServing);
  grpc::ClientContext ctx;
  v1::LoadExpertsRequest req;
  req.add_experts(0);
  req.set_wait(true);
  v1::ShardStatus st;
  ASSERT_TRUE(Stub(*server)->LoadExperts(&ctx, req, &st).ok());
  EXPECT_EQ(health(), common::HealthState::kServing);
  server->Shutdown(absl::Milliseconds(100));
  // Once shutdown starts the server either answers NOT_SERVING or no longer answers at all.
  auto after = common::CheckHealth(channel.get(), absl::Seconds(2));
  if (after.ok()) {
    EXPECT_EQ(*after, common::HealthState::kNotServing);
  }
}

// With no stream open, a drain is not known to be done before routers have had 1 s to see the
// shard NOT_SERVING (one that still places experts on it opens a stream then): a shorter timeout
// answers not drained, with no stream open (it answered "drained" at once, before any router
// had moved its experts off). From 1 s on it is drained.
TEST_F(ShardServerTest, ADrainShorterThanRoutersTakeToNoticeIsNotDrained) {
  auto server = StartServer();
  auto stub = Stub(*server);
  v1::DrainRequest req;
  req.set_timeout_ms(50);
  v1::DrainResponse resp;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub->Drain(&ctx, req, &resp).ok());
  EXPECT_FALSE(resp.drained());
  EXPECT_EQ(resp.open_streams(), 0);
  req.set_timeout_ms(1000);
  grpc::ClientContext again;
  ASSERT_TRUE(stub->Drain(&again, req, &resp).ok());
  EXPECT_TRUE(resp.drained());
}

// A Dispatch stream open on a shard (one batch answered), and a Drain of 30 s waiting for it on
// a thread of its own. The thread is joined however the test ends (a failed ASSERT returns
// early), the call cancelled first if still waiting.
class DrainWaitingOnAStream {
 public:
  explicit DrainWaitingOnAStream(v1::ExpertShard::Stub* stub) : stub_(stub) {}
  ~DrainWaitingOnAStream() {
    if (!thread_.joinable()) return;
    drain_ctx_.TryCancel();
    thread_.join();
  }
  // Opens the stream, starts the drain, and returns whether the shard reads draining within
  // 10 s (failures are reported).
  bool Start(const v1::DispatchRequest& batch) {
    stream_ = stub_->Dispatch(&stream_ctx_);
    v1::DispatchResponse out;
    if (!stream_->Write(batch) || !stream_->Read(&out) || out.code() != 0) {
      ADD_FAILURE() << "the stream did not answer its first batch: " << out.message();
      return false;
    }
    thread_ = std::thread([this] {
      v1::DrainRequest req;
      req.set_timeout_ms(30000);
      status_ = stub_->Drain(&drain_ctx_, req, &resp_);
    });
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!Draining() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    EXPECT_TRUE(Draining()) << "the drain did not start";
    return Draining();
  }
  bool Draining() {
    grpc::ClientContext ctx;
    v1::ShardStatus st;
    return stub_->GetStatus(&ctx, v1::GetShardStatusRequest(), &st).ok() && st.draining();
  }
  // Waits for the Drain's answer.
  void Join() { thread_.join(); }
  const grpc::Status& status() const { return status_; }
  const v1::DrainResponse& response() const { return resp_; }
  grpc::ClientReaderWriter<v1::DispatchRequest, v1::DispatchResponse>& stream() { return *stream_; }
  void CancelStream() { stream_ctx_.TryCancel(); }

 private:
  v1::ExpertShard::Stub* stub_;
  grpc::ClientContext stream_ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::DispatchRequest, v1::DispatchResponse>> stream_;
  grpc::ClientContext drain_ctx_;
  grpc::Status status_;
  v1::DrainResponse resp_;
  std::thread thread_;
};

// A shard that begins shutting down while a drain waits ends that wait: ABORTED, not drained
// (the streams it waited for were cut, not closed by their routers).
TEST_F(ShardServerTest, AShutdownEndsAWaitingDrainAborted) {
  auto server = StartServer();
  auto stub = Stub(*server);
  DrainWaitingOnAStream drain(stub.get());
  ASSERT_TRUE(drain.Start(Batch(1, 2, {{0, {0, 1}}})));
  server->Shutdown(absl::Milliseconds(100));
  drain.Join();
  EXPECT_EQ(drain.status().error_code(), grpc::StatusCode::ABORTED)
      << drain.status().error_message();
  EXPECT_NE(drain.status().error_message().find("shard is shutting down"), std::string::npos)
      << drain.status().error_message();
  EXPECT_FALSE(drain.response().drained());
  drain.CancelStream();
  drain.stream().Finish();  // cut by the shutdown: its status is not the point
}

// A drain waits for the open Dispatch streams. An undo meanwhile ends that wait at once: the
// Drain call answers undone and not drained (a preStop hook must not go on to stop a shard that
// serves again), the undo's answer says it was taken, and the stream kept open serves on.
TEST_F(ShardServerTest, AnUndoEndsAWaitingDrainAtOnce) {
  auto server = StartServer();
  auto stub = Stub(*server);
  DrainWaitingOnAStream drain(stub.get());
  ASSERT_TRUE(drain.Start(Batch(1, 2, {{0, {0, 1}}})));

  const auto t0 = std::chrono::steady_clock::now();
  grpc::ClientContext ctx;
  v1::DrainRequest undo;
  undo.set_undo(true);
  v1::DrainResponse undone;
  ASSERT_TRUE(stub->Drain(&ctx, undo, &undone).ok());
  EXPECT_TRUE(undone.undone());
  EXPECT_TRUE(undone.serving());
  EXPECT_FALSE(undone.not_draining());
  drain.Join();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(waited, 5.0) << "the drain went on waiting (for up to 30 s) after the undo";
  ASSERT_TRUE(drain.status().ok()) << drain.status().error_message();
  EXPECT_TRUE(drain.response().undone());
  EXPECT_FALSE(drain.response().drained());
  EXPECT_EQ(drain.response().open_streams(), 1);
  EXPECT_FALSE(drain.Draining());
  // An undo with no drain to take back says so and changes nothing.
  grpc::ClientContext again_ctx;
  v1::DrainResponse nothing;
  ASSERT_TRUE(stub->Drain(&again_ctx, undo, &nothing).ok());
  EXPECT_TRUE(nothing.undone());
  EXPECT_TRUE(nothing.not_draining());
  EXPECT_TRUE(nothing.serving());
  EXPECT_FALSE(drain.Draining());

  const v1::DispatchRequest again = Batch(2, 3, {{1, {0, 2}}});
  v1::DispatchResponse out;
  ASSERT_TRUE(drain.stream().Write(again));
  ASSERT_TRUE(drain.stream().Read(&out));
  ASSERT_EQ(out.code(), 0) << out.message();
  ExpectBitIdentical(again, out, {1});
  drain.stream().WritesDone();
  EXPECT_TRUE(drain.stream().Finish().ok());
}

// A peer for copies: it forwards expert 0 from a real shard, and holds the copy of any other
// expert until Release(), then fails it.
class HeldPeer final : public v1::ExpertShard::Service {
 public:
  explicit HeldPeer(std::string source) : source_(std::move(source)) {}
  void Release() {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    cv_.notify_all();
  }
  grpc::Status ExportExpert(grpc::ServerContext*, const v1::ExportExpertRequest* req,
                            grpc::ServerWriter<v1::ExpertChunk>* writer) override {
    if (req->expert() != 0) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return released_; });
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "held peer released");
    }
    auto stub = v1::ExpertShard::NewStub(
        grpc::CreateChannel(source_, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    auto reader = stub->ExportExpert(&ctx, *req);
    v1::ExpertChunk chunk;
    while (reader->Read(&chunk)) writer->Write(chunk);
    return reader->Finish();
  }

 private:
  const std::string source_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool released_ = false;
};

// A shard turns SERVING once it holds an expert and no load runs: the placement going live would
// otherwise send rows to an expert still loading. Here a shard that started empty copies
// experts 0 and 1 in one load; with 0 READY and 1 still copying it stays NOT_SERVING, and once
// the copy of 1 has ended (failed, here) it serves 0.
TEST_F(ShardServerTest, TurnsServingOnlyOnceNoLoadRuns) {
  auto source = StartServer();
  HeldPeer peer(source->address());
  moe::testing::LoopbackServer peer_server(&peer);
  ASSERT_TRUE(peer_server.ok());
  // Released however the test ends: the server's shutdown waits for the held copy.
  struct ReleaseAtEnd {
    HeldPeer* peer;
    ~ReleaseAtEnd() { peer->Release(); }
  } release_at_end{&peer};
  auto shard = StartServer(WithoutExperts());
  auto stub = Stub(*shard);
  auto channel = grpc::CreateChannel(shard->address(), grpc::InsecureChannelCredentials());
  auto health = [&] {
    auto h = common::CheckHealth(channel.get(), absl::Seconds(5));
    EXPECT_TRUE(h.ok()) << h.status();
    return h.ok() ? *h : common::HealthState::kUnknown;
  };
  auto state_of = [&](int expert) {
    grpc::ClientContext ctx;
    v1::ShardStatus st;
    EXPECT_TRUE(stub->GetStatus(&ctx, v1::GetShardStatusRequest(), &st).ok());
    for (const auto& e : st.experts()) {
      if (e.expert() == expert) return e.state();
    }
    return v1::ExpertStatus::STATE_UNSPECIFIED;
  };
  EXPECT_EQ(health(), common::HealthState::kNotServing);
  {
    grpc::ClientContext ctx;
    v1::LoadExpertsRequest req;
    req.add_experts(0);
    req.add_experts(1);
    req.set_placement_version(1);
    req.set_source_peer(peer_server.address());
    v1::ShardStatus st;
    ASSERT_TRUE(stub->LoadExperts(&ctx, req, &st).ok());  // answers at once (no wait)
  }
  const auto start = std::chrono::steady_clock::now();
  while (state_of(0) != v1::ExpertStatus::READY &&
         std::chrono::steady_clock::now() - start < std::chrono::seconds(30)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(state_of(0), v1::ExpertStatus::READY);
  EXPECT_EQ(state_of(1), v1::ExpertStatus::LOADING);
  EXPECT_EQ(health(), common::HealthState::kNotServing) << "SERVING with expert 1 still loading";
  peer.Release();
  while (state_of(1) == v1::ExpertStatus::LOADING &&
         std::chrono::steady_clock::now() - start < std::chrono::seconds(30)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(state_of(1), v1::ExpertStatus::FAILED);
  // The shard turns SERVING just after the store reports the copy's end (outside its lock).
  while (health() != common::HealthState::kServing &&
         std::chrono::steady_clock::now() - start < std::chrono::seconds(30)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(health(), common::HealthState::kServing);
  shard->Shutdown(absl::Milliseconds(100));
}

// A placement that unloads experts of the shard's initial load while that load runs (the
// router's first placement does not want them here) cuts the load short with ABORTED; the shard
// still turns SERVING with what it holds, or, holding nothing, once the router loads an expert.
// Until 2026-12-01 it stayed NOT_SERVING for good.
TEST_F(ShardServerTest, AnInitialLoadCutShortByAnUnloadStillServesWhatItHolds) {
  // Experts large enough (3 MiB each) that the unload lands while the first is being read.
  common::ModelConfig c = TestConfig();
  c.num_experts = 8;
  c.d_model = 256;
  c.d_ff = 1024;
  const std::string path = ::moe::testing::TempPath("shard_test_big.safetensors");
  ASSERT_TRUE(
      common::SaveCheckpoint(path, common::MakeRandomCheckpoint({c, false, 5})).ok());
  const std::vector<int> all = {0, 1, 2, 3, 4, 5, 6, 7};
  ShardServerOptions o;
  o.checkpoint = path;
  o.initial_experts = all;
  for (const bool unload_all : {false, true}) {
    SCOPED_TRACE(unload_all ? "every expert unloaded" : "one expert unloaded");
    auto started = ShardServer::Start(o);
    ASSERT_TRUE(started.ok()) << started.status();
    ShardServer& server = **started;
    const std::vector<int> unload = unload_all ? all : std::vector<int>{7};
    ASSERT_TRUE(server.store().Unload(unload, 0).ok());
    const absl::Status loaded = server.WaitUntilLoaded(absl::Seconds(60));
    EXPECT_EQ(loaded.code(), absl::StatusCode::kAborted) << loaded;
    EXPECT_EQ(server.store().ready_count(), unload_all ? 0 : 7);
    auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
    auto health = [&] {
      auto h = common::CheckHealth(channel.get(), absl::Seconds(5));
      EXPECT_TRUE(h.ok()) << h.status();
      return h.ok() ? *h : common::HealthState::kUnknown;
    };
    if (unload_all) {
      EXPECT_EQ(health(), common::HealthState::kNotServing);
      grpc::ClientContext ctx;
      v1::LoadExpertsRequest req;
      req.add_experts(3);
      req.set_wait(true);
      v1::ShardStatus st;
      ASSERT_TRUE(v1::ExpertShard::NewStub(channel)->LoadExperts(&ctx, req, &st).ok());
    }
    EXPECT_EQ(health(), common::HealthState::kServing);
  }
  std::remove(path.c_str());
}

// A shard whose initial load fails for one expert (a malformed tensor of expert 2) serves the
// experts it did load and reports the failed one FAILED with the reason. Until 2026-12-01 it
// stayed NOT_SERVING until the router happened to load an expert onto it: a placement that
// left its other experts where they were left them unserved for good.
TEST_F(ShardServerTest, AnExpertThatFailsToLoadLeavesTheShardServingTheOthers) {
  const std::string bad = ::moe::testing::TempPath("shard_test_bad_expert.safetensors");
  {
    auto reader = common::SafetensorsReader::Open(*path_);
    ASSERT_TRUE(reader.ok()) << reader.status();
    common::SafetensorsWriter w;
    for (const auto& [k, v] : (*reader)->metadata()) w.SetMetadata(k, v);
    for (const common::StTensor& t : (*reader)->tensors()) {
      if (t.name == "experts.2.w1.bias") continue;
      auto v = (*reader)->ReadFloat(t.name);
      ASSERT_TRUE(v.ok()) << v.status();
      ASSERT_TRUE(w.AddF32(t.name, t.shape, *v).ok());
    }
    ASSERT_TRUE(w.AddF32("experts.2.w1.bias", {7}, std::vector<float>(7)).ok());
    ASSERT_TRUE(w.Write(bad).ok());
  }
  ShardServerOptions o;
  o.checkpoint = bad;  // initial_experts unset: every expert
  auto started = ShardServer::Start(o);
  ASSERT_TRUE(started.ok()) << started.status();
  ShardServer& server = **started;
  const absl::Status loaded = server.WaitUntilLoaded(absl::Seconds(30));
  EXPECT_EQ(loaded.code(), absl::StatusCode::kInvalidArgument) << loaded;
  EXPECT_NE(loaded.message().find("experts.2.w1.bias"), std::string::npos) << loaded;
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  auto health = common::CheckHealth(channel.get(), absl::Seconds(5));
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, common::HealthState::kServing);
  auto stub = v1::ExpertShard::NewStub(channel);
  {
    grpc::ClientContext ctx;
    v1::ShardStatus status;
    ASSERT_TRUE(stub->GetStatus(&ctx, v1::GetShardStatusRequest(), &status).ok());
    std::map<int, v1::ExpertStatus::State> states;
    for (const auto& e : status.experts()) {
      states[e.expert()] = e.state();
      if (e.expert() == 2) {
        EXPECT_NE(e.error().find("experts.2.w1.bias"), std::string::npos) << e.error();
      }
    }
    EXPECT_EQ(states, (std::map<int, v1::ExpertStatus::State>{{0, v1::ExpertStatus::READY},
                                                             {1, v1::ExpertStatus::READY},
                                                             {2, v1::ExpertStatus::FAILED},
                                                             {3, v1::ExpertStatus::READY}}));
  }
  // The experts that loaded compute, bit for bit as the in-process kernel.
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  const v1::DispatchRequest req = Batch(3, 6, {{0, {0, 4}}, {3, {1, 2, 5}}});
  ASSERT_TRUE(stream->Write(req));
  v1::DispatchResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_EQ(resp.code(), 0) << resp.message();
  ExpectBitIdentical(req, resp, {0, 3});
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  server.Shutdown(absl::Milliseconds(100));
  std::remove(bad.c_str());
}

// Reads expert e's current weights from a shard through ExportExpert.
common::ExpertWeights Export(v1::ExpertShard::Stub* stub, int e) {
  absl::StatusOr<common::ExpertWeights> w = testing::ExportedWeights(stub, TestConfig(), e);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? *w : common::ExpertWeights();
}

// A backward whose gradient overflows (here a grad_output at float's largest) is refused
// OUT_OF_RANGE, naming the expert and the first value that is not finite: committed, it would
// leave the expert's weights NaN for good.
TEST_F(ShardServerTest, ABackwardWhoseGradientIsNotFiniteIsRefused) {
  auto server = StartServer();
  auto stub = Stub(*server);
  const int64_t d = TestConfig().d_model;
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  v1::DispatchRequest req = Batch(7, 6, {{1, {0, 2, 3}}});
  req.set_train_step(1);
  ASSERT_TRUE(stream->Write(req));
  v1::DispatchResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_EQ(resp.code(), 0) << resp.message();
  v1::BackwardRequest back;
  back.set_train_step(1);
  back.set_batch_id(7);
  v1::ExpertOutput* g = back.add_grads();
  g->set_expert(1);
  const std::vector<float> dy(3 * d, std::numeric_limits<float>::max());
  common::EncodeTensor(dy, {3, d}, common::WireType::kFloat32, g->mutable_output());
  grpc::ClientContext bctx;
  v1::BackwardResponse bresp;
  const grpc::Status st = stub->Backward(&bctx, back, &bresp);
  EXPECT_EQ(st.error_code(), grpc::OUT_OF_RANGE) << st.error_message();
  EXPECT_EQ(st.error_message().rfind("the gradient of expert 1 is not finite (w", 0), 0u)
      << st.error_message();
  EXPECT_NE(st.error_message().find("lower the learning rate"), std::string::npos);
  // It keeps serving.
  v1::DispatchRequest again = Batch(8, 6, {{1, {0}}});
  ASSERT_TRUE(stream->Write(again));
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_EQ(resp.code(), 0) << resp.message();

  // A finite gradient whose update at the step's learning rate overflows is refused alike, and
  // the step can then only be dropped: a commit would leave weights that are not finite.
  v1::DispatchRequest step2 = Batch(9, 6, {{1, {0, 2, 3}}});
  step2.set_train_step(2);
  ASSERT_TRUE(stream->Write(step2));
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_EQ(resp.code(), 0) << resp.message();
  back.set_train_step(2);
  back.set_batch_id(9);
  back.set_learning_rate(1e36f);
  std::vector<float> big = common::RandomMatrix(3, d, 71);
  for (float& v : big) v *= 1e6f;  // gradients near 1e5, finite; times 1e36 they are not
  common::EncodeTensor(big, {3, d}, common::WireType::kFloat32, g->mutable_output());
  grpc::ClientContext uctx;
  const grpc::Status up = stub->Backward(&uctx, back, &bresp);
  EXPECT_EQ(up.error_code(), grpc::OUT_OF_RANGE) << up.error_message();
  EXPECT_EQ(
      up.error_message().rfind(
          "the update of expert 1 by its gradient at learning rate 1e+36 is not finite (w", 0),
      0u)
      << up.error_message();
  v1::FinishStepRequest commit;
  commit.set_train_step(2);
  commit.set_commit(true);
  commit.set_learning_rate(1e36f);
  v1::FinishStepResponse fresp;
  grpc::ClientContext fctx;
  const grpc::Status fin = stub->FinishStep(&fctx, commit, &fresp);
  EXPECT_EQ(fin.error_code(), grpc::ABORTED) << fin.error_message();
  EXPECT_NE(fin.error_message().find("step id 2 failed on this shard"), std::string::npos)
      << fin.error_message();
  // The expert still answers as the checkpoint's.
  const v1::DispatchRequest after = Batch(10, 6, {{1, {0}}});
  ASSERT_TRUE(stream->Write(after));
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_EQ(resp.code(), 0) << resp.message();
  const std::vector<float> x = common::ViewToFloat(*common::DecodeTensor(after.rows(), "rows"));
  auto ffn = ExpertFfn::Create(TestConfig(), ck_->experts[1]);
  std::vector<float> y(d);
  ASSERT_TRUE((*ffn)->Forward(x.data(), 1, y.data()).ok());
  EXPECT_EQ(Output(resp, 1), y);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// A commit's update is applied once per expert, also when FinishStep comes again.
TEST_F(ShardServerTest, TrainingForwardBackwardCommitAndAbort) {
  auto server = StartServer();
  auto stub = Stub(*server);
  const int64_t d = TestConfig().d_model;
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  v1::DispatchRequest req = Batch(5, 6, {{1, {0, 2, 3}}, {2, {1, 2, 5}}});
  req.set_train_step(1);
  ASSERT_TRUE(stream->Write(req));
  v1::DispatchResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_EQ(resp.code(), 0) << resp.message();
  // The reference: the same kernel's training forward and backward on the same rows.
  const std::vector<float> all = common::ViewToFloat(*common::DecodeTensor(req.rows(), "rows"));
  v1::BackwardRequest back;
  back.set_train_step(1);
  back.set_batch_id(5);
  std::map<int, common::ExpertWeights> ref_grads;
  std::map<int, std::vector<float>> ref_dx;
  for (const auto& er : req.experts()) {
    std::vector<float> in;
    for (int r : er.rows()) in.insert(in.end(), all.begin() + r * d, all.begin() + (r + 1) * d);
    const int64_t m = er.rows_size();
    auto ffn = ExpertFfn::Create(TestConfig(), ck_->experts[er.expert()]);
    ForwardCache cache;
    std::vector<float> y(m * d), dx(m * d);
    ASSERT_TRUE((*ffn)->ForwardTrain(in.data(), m, y.data(), &cache).ok());
    EXPECT_EQ(Output(resp, er.expert()), y) << "expert " << er.expert();
    const std::vector<float> dy = common::RandomMatrix(m, d, 70 + er.expert());
    ASSERT_TRUE((*ffn)->Backward(in.data(), dy.data(), cache, dx.data(), &ref_grads[er.expert()]).ok());
    ref_dx[er.expert()] = dx;
    v1::ExpertOutput* g = back.add_grads();
    g->set_expert(er.expert());
    common::EncodeTensor(dy, {m, d}, common::WireType::kFloat32, g->mutable_output());
  }
  {
    grpc::ClientContext bctx;
    v1::BackwardResponse bresp;
    grpc::Status st = stub->Backward(&bctx, back, &bresp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    ASSERT_EQ(bresp.grad_inputs_size(), 2);
    for (const auto& gi : bresp.grad_inputs()) {
      EXPECT_EQ(common::ViewToFloat(*common::DecodeTensor(gi.output(), "dx")), ref_dx[gi.expert()]);
    }
  }
  {
    // The forward is used once: a second backward of the same batch is refused.
    grpc::ClientContext bctx;
    v1::BackwardResponse bresp;
    grpc::Status st = stub->Backward(&bctx, back, &bresp);
    EXPECT_EQ(st.error_code(), grpc::FAILED_PRECONDITION);
    EXPECT_NE(st.error_message().find("no training forward of batch 5"), std::string::npos);
  }
  // What the shard reports of a step (GetStep, asked when a coordinator's verdict was lost).
  auto outcome = [&](uint64_t step) {
    grpc::ClientContext octx;
    v1::GetStepRequest q;
    q.set_train_step(step);
    v1::StepOutcome o;
    EXPECT_TRUE(stub->GetStep(&octx, q, &o).ok());
    return o.state();
  };
  EXPECT_EQ(outcome(1), v1::StepOutcome::OPEN);
  EXPECT_EQ(outcome(99), v1::StepOutcome::UNKNOWN);
  v1::FinishStepRequest fin;
  fin.set_train_step(1);
  fin.set_commit(true);
  fin.set_learning_rate(0.25f);
  auto finish = [&](v1::FinishStepResponse* fresp) {
    grpc::ClientContext fctx;
    return stub->FinishStep(&fctx, fin, fresp);
  };
  {
    // Expert 2 leaves before the commit: expert 1 is updated, and the step keeps expert 2's
    // gradient for a repeat.
    grpc::ClientContext uctx;
    v1::UnloadExpertsRequest unload;
    unload.add_experts(2);
    v1::ShardStatus status;
    ASSERT_TRUE(stub->UnloadExperts(&uctx, unload, &status).ok());
    v1::FinishStepResponse fresp;
    grpc::Status st = finish(&fresp);
    EXPECT_EQ(st.error_code(), grpc::FAILED_PRECONDITION);
    EXPECT_NE(st.error_message().find("expert 2 left this shard before its update"),
              std::string::npos)
        << st.error_message();
    EXPECT_EQ(outcome(1), v1::StepOutcome::COMMITTED) << "a commit applied in part";
    grpc::ClientContext lctx;
    v1::LoadExpertsRequest load;
    load.add_experts(2);
    load.set_wait(true);
    ASSERT_TRUE(stub->LoadExperts(&lctx, load, &status).ok());
  }
  {
    // The repeat (the router sends one when a commit went unconfirmed), twice at once: expert 2
    // is updated once, expert 1 not again; a later repeat has nothing left to do.
    v1::FinishStepResponse a, b, c;
    grpc::Status sa, sb;
    std::thread other([&] { sb = finish(&b); });
    sa = finish(&a);
    other.join();
    ASSERT_TRUE(sa.ok()) << sa.error_message();
    ASSERT_TRUE(sb.ok()) << sb.error_message();
    ASSERT_EQ(a.updated_experts_size() + b.updated_experts_size(), 1);
    EXPECT_EQ(a.updated_experts_size() ? a.updated_experts(0) : b.updated_experts(0), 2);
    ASSERT_TRUE(finish(&c).ok());
    EXPECT_EQ(c.updated_experts_size(), 0);
    EXPECT_EQ(outcome(1), v1::StepOutcome::COMMITTED);
  }
  for (int e : {1, 2}) {
    // Every tensor, updated once by SGD with the kernel's own gradients.
    const common::ExpertWeights now = Export(stub.get(), e);
    const auto got = now.Tensors();
    const auto was = ck_->experts[e].Tensors();
    const auto grad = std::as_const(ref_grads[e]).Tensors();
    for (size_t t = 0; t < got.size(); ++t) {
      const auto& [name, w] = got[t];
      ASSERT_EQ(w->size(), was[t].second->size()) << e << " " << name;
      ASSERT_EQ(w->size(), grad[t].second->size()) << e << " " << name;
      for (size_t i = 0; i < w->size(); ++i) {
        ASSERT_EQ((*w)[i], (*was[t].second)[i] - 0.25f * (*grad[t].second)[i])
            << e << " " << name << " " << i;
      }
    }
  }
  EXPECT_EQ(Export(stub.get(), 0).w1, ck_->experts[0].w1);  // untouched
  // The shard reports the step each expert's weights are at (the router compares replicas).
  auto trained_steps = [&] {
    grpc::ClientContext sctx;
    v1::ShardStatus status;
    EXPECT_TRUE(stub->GetStatus(&sctx, v1::GetShardStatusRequest(), &status).ok());
    std::map<int, uint64_t> at;
    for (const auto& e : status.experts()) at[e.expert()] = e.trained_step();
    return at;
  };
  EXPECT_EQ(trained_steps(), (std::map<int, uint64_t>{{0, 0}, {1, 1}, {2, 1}, {3, 0}}));
  // An aborted step changes nothing.
  const common::ExpertWeights kept = Export(stub.get(), 1);
  req.set_train_step(2);
  req.set_batch_id(6);
  ASSERT_TRUE(stream->Write(req));
  ASSERT_TRUE(stream->Read(&resp));
  back.set_train_step(2);
  back.set_batch_id(6);
  {
    grpc::ClientContext bctx;
    v1::BackwardResponse bresp;
    ASSERT_TRUE(stub->Backward(&bctx, back, &bresp).ok());
    grpc::ClientContext fctx;
    v1::FinishStepRequest fin;
    fin.set_train_step(2);
    fin.set_commit(false);
    v1::FinishStepResponse fresp;
    EXPECT_EQ(outcome(2), v1::StepOutcome::OPEN);
    ASSERT_TRUE(stub->FinishStep(&fctx, fin, &fresp).ok());
    EXPECT_EQ(fresp.updated_experts_size(), 0);
    EXPECT_EQ(outcome(2), v1::StepOutcome::ABORTED);
  }
  EXPECT_EQ(Export(stub.get(), 1).w1, kept.w1);
  EXPECT_EQ(trained_steps(), (std::map<int, uint64_t>{{0, 0}, {1, 1}, {2, 1}, {3, 0}}));
  stream->WritesDone();
  while (stream->Read(&resp)) {
  }
  stream->Finish();
}

// A reduction of `step` for expert 1 in which this shard (rank 0 of `server`) waits on a peer
// that never answers.
v1::ReduceGradientsRequest ReduceWithSilentPeer(const ShardServer& server, uint64_t step,
                                                uint32_t timeout_ms) {
  v1::ReduceGradientsRequest rr;
  rr.set_train_step(step);
  rr.set_group(absl::StrCat("step", step, "-group0"));
  rr.set_generation(1);
  rr.set_rank(0);
  rr.add_members(absl::StrCat("127.0.0.1:", server.port()));
  rr.add_members("127.0.0.1:1");  // a peer that never answers: the ring waits for it
  rr.add_experts(1);
  rr.set_timeout_ms(timeout_ms);
  return rr;
}

// An abort of a step (from the coordinator as soon as one member's reduction failed, or from
// the router) breaks the step's reduction still waiting on a peer here: it fails with ABORTED in
// moments instead of at its deadline, and the step reports ABORTED.
TEST_F(ShardServerTest, AnAbortBreaksTheStepsReductionStillWaitingOnItsPeer) {
  auto server = StartServer();
  auto stub = Stub(*server);
  const v1::ReduceGradientsRequest rr = ReduceWithSilentPeer(*server, 7, 20000);
  grpc::Status reduced;
  double took = 0;
  std::thread reduce([&] {
    grpc::ClientContext ctx;
    v1::ReduceGradientsResponse resp;
    const auto start = std::chrono::steady_clock::now();
    reduced = stub->ReduceGradients(&ctx, rr, &resp);
    took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  });
  auto outcome = [&] {
    grpc::ClientContext octx;
    v1::GetStepRequest q;
    q.set_train_step(7);
    v1::StepOutcome o;
    EXPECT_TRUE(stub->GetStep(&octx, q, &o).ok());
    return o.state();
  };
  // The reduction has opened the step.
  for (int i = 0; i < 200 && outcome() != v1::StepOutcome::OPEN; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(outcome(), v1::StepOutcome::OPEN);
  grpc::ClientContext fctx;
  v1::FinishStepRequest fin;
  fin.set_train_step(7);
  fin.set_commit(false);
  v1::FinishStepResponse fresp;
  ASSERT_TRUE(stub->FinishStep(&fctx, fin, &fresp).ok());
  reduce.join();
  EXPECT_EQ(reduced.error_code(), grpc::StatusCode::ABORTED) << reduced.error_message();
  EXPECT_NE(reduced.error_message().find("ring step7-group0"), std::string::npos)
      << reduced.error_message();
  EXPECT_LT(took, 5.0);
  EXPECT_EQ(outcome(), v1::StepOutcome::ABORTED);
}

// Replicas' gradients, each finite and each with a finite update when sent (no learning rate
// given with the backward, as a router that predates the field), whose sum's update at the
// step's learning rate is not finite: both ring members refuse the reduction, OUT_OF_RANGE, and
// the step can no longer commit.
TEST_F(ShardServerTest, AReducedGradientWhoseUpdateIsNotFiniteIsRefused) {
  const int64_t d = TestConfig().d_model;
  std::unique_ptr<ShardServer> servers[2] = {StartServer(), StartServer()};
  for (int r = 0; r < 2; ++r) {
    auto stub = Stub(*servers[r]);
    grpc::ClientContext ctx;
    auto stream = stub->Dispatch(&ctx);
    v1::DispatchRequest req = Batch(3, 4, {{1, {0, 1}}}, /*seed=*/10 + r);
    req.set_train_step(5);
    ASSERT_TRUE(stream->Write(req));
    v1::DispatchResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    ASSERT_EQ(resp.code(), 0) << resp.message();
    stream->WritesDone();
    ASSERT_TRUE(stream->Finish().ok());
    v1::BackwardRequest back;
    back.set_train_step(5);
    back.set_batch_id(3);
    v1::ExpertOutput* g = back.add_grads();
    g->set_expert(1);
    std::vector<float> dy = common::RandomMatrix(2, d, 80 + r);
    for (float& v : dy) v *= 1e6f;
    common::EncodeTensor(dy, {2, d}, common::WireType::kFloat32, g->mutable_output());
    grpc::ClientContext bctx;
    v1::BackwardResponse bresp;
    const grpc::Status st = stub->Backward(&bctx, back, &bresp);
    ASSERT_TRUE(st.ok()) << st.error_message();
  }
  grpc::Status reduced[2];
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      v1::ReduceGradientsRequest rr;
      rr.set_train_step(5);
      rr.set_group("step5-group0");
      rr.set_generation(1);
      rr.set_rank(r);
      for (const auto& s : servers) rr.add_members(absl::StrCat("127.0.0.1:", s->port()));
      rr.add_experts(1);
      rr.set_timeout_ms(20000);
      rr.set_learning_rate(1e36f);
      grpc::ClientContext ctx;
      v1::ReduceGradientsResponse resp;
      reduced[r] = Stub(*servers[r])->ReduceGradients(&ctx, rr, &resp);
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(reduced[r].error_code(), grpc::OUT_OF_RANGE) << reduced[r].error_message();
    EXPECT_EQ(reduced[r].error_message().rfind("the update of expert 1 by its summed gradient at "
                                               "learning rate 1e+36 is not finite (w",
                                               0),
              0u)
        << reduced[r].error_message();
    grpc::ClientContext fctx;
    v1::FinishStepRequest fin;
    fin.set_train_step(5);
    fin.set_commit(true);
    fin.set_learning_rate(1e36f);
    v1::FinishStepResponse fresp;
    const grpc::Status st = Stub(*servers[r])->FinishStep(&fctx, fin, &fresp);
    EXPECT_EQ(st.error_code(), grpc::ABORTED) << st.error_message();
  }
}

// An expert listed twice would have its gradient taken once and zeros reduced in its place over
// the same buffers: the reduction is refused, and the step can no longer commit.
TEST_F(ShardServerTest, AReductionThatListsAnExpertTwiceIsRefused) {
  auto server = StartServer();
  auto stub = Stub(*server);
  v1::ReduceGradientsRequest rr = ReduceWithSilentPeer(*server, 9, 2000);
  rr.add_experts(1);
  grpc::ClientContext ctx;
  v1::ReduceGradientsResponse resp;
  const grpc::Status st = stub->ReduceGradients(&ctx, rr, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_NE(st.error_message().find("an expert is listed twice"), std::string::npos)
      << st.error_message();
  grpc::ClientContext fctx;
  v1::FinishStepRequest fin;
  fin.set_train_step(9);
  fin.set_commit(true);
  fin.set_learning_rate(0.1f);
  v1::FinishStepResponse fresp;
  const grpc::Status fst = stub->FinishStep(&fctx, fin, &fresp);
  EXPECT_EQ(fst.error_code(), grpc::StatusCode::ABORTED) << "a failed step committed";
  EXPECT_NE(fst.error_message().find("step id 9 failed on this shard"), std::string::npos)
      << fst.error_message();
}

// A shard the router sent rows of a step, asked to reduce it without any record of it (it
// restarted in between), refuses: zeros in place of its gradients would commit a wrong sum.
TEST_F(ShardServerTest, AReductionOfAStepThisShardHasNoRecordOfIsRefused) {
  auto server = StartServer();
  auto stub = Stub(*server);
  v1::ReduceGradientsRequest rr = ReduceWithSilentPeer(*server, 11, 2000);
  rr.set_expect_step_state(true);
  grpc::ClientContext ctx;
  v1::ReduceGradientsResponse resp;
  const grpc::Status st = stub->ReduceGradients(&ctx, rr, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::ABORTED) << st.error_message();
  EXPECT_NE(st.error_message().find("has no state on this shard"), std::string::npos)
      << st.error_message();
}

TEST_F(ShardServerTest, AStepNobodyFinishesIsDroppedOnceStale) {
  ShardServerOptions o;
  o.step_ttl = absl::Seconds(1);
  auto server = StartServer(o);
  auto stub = Stub(*server);
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  const int64_t d = TestConfig().d_model;
  auto forward = [&](uint64_t step, uint64_t batch) {
    v1::DispatchRequest req = Batch(batch, 2, {{1, {0, 1}}});
    req.set_train_step(step);
    ASSERT_TRUE(stream->Write(req));
    v1::DispatchResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    ASSERT_EQ(resp.code(), 0) << resp.message();
  };
  auto backward = [&](uint64_t step, uint64_t batch) {
    v1::BackwardRequest back;
    back.set_train_step(step);
    back.set_batch_id(batch);
    v1::ExpertOutput* g = back.add_grads();
    g->set_expert(1);
    common::EncodeTensor(common::RandomMatrix(2, d, 3), {2, d}, common::WireType::kFloat32,
                         g->mutable_output());
    grpc::ClientContext bctx;
    v1::BackwardResponse bresp;
    return stub->Backward(&bctx, back, &bresp);
  };
  forward(1, 10);
  forward(2, 20);  // a new step within the TTL leaves step 1 alone
  EXPECT_TRUE(backward(1, 10).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));  // let steps 1 and 2 go stale
  forward(3, 30);  // opening step 3 drops them
  grpc::Status st = backward(2, 20);
  EXPECT_EQ(st.error_code(), grpc::FAILED_PRECONDITION);
  EXPECT_NE(st.error_message().find("no training forward of batch 20"), std::string::npos)
      << st.error_message();
  forward(1, 11);  // a late forward of a dropped step is not kept
  st = backward(1, 11);
  EXPECT_EQ(st.error_code(), grpc::FAILED_PRECONDITION);
  EXPECT_TRUE(backward(3, 30).ok());
  stream->WritesDone();
  v1::DispatchResponse resp;
  while (stream->Read(&resp)) {
  }
  stream->Finish();
}

TEST_F(ShardServerTest, ReflectionListsTheShardService) {
  auto server = StartServer();
  auto channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::CompletionQueue cq;
  auto call = generic.PrepareCall(
      &ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  // ServerReflectionRequest{list_services: ""}: field 7, length-delimited, empty.
  const std::string req("\x3a\x00", 2);
  grpc::Slice slice(req);
  grpc::ByteBuffer out(&slice, 1);
  call->Write(out, reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::ByteBuffer in;
  call->Read(&in, reinterpret_cast<void*>(3));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(in.Dump(&slices).ok());
  std::string bytes;
  for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_NE(bytes.find("moe.v1.ExpertShard"), std::string::npos);
  EXPECT_NE(bytes.find("grpc.health.v1.Health"), std::string::npos);
  ctx.TryCancel();
  grpc::Status st;
  call->Finish(&st, reinterpret_cast<void*>(4));
  while (cq.Next(&tag, &ok) && tag != reinterpret_cast<void*>(4)) {
  }
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
}

TEST_F(ShardServerTest, SigtermEndsOpenStreamsAndExitsPromptly) {
  int out[2];
  ASSERT_EQ(pipe(out), 0);
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    close(out[0]);
    execl(MOE_EXPERT_SERVER_BIN, MOE_EXPERT_SERVER_BIN, "--checkpoint", path_->c_str(), "--port",
          "0", "--host", "127.0.0.1", static_cast<char*>(nullptr));
    _exit(127);
  }
  close(out[1]);
  FILE* f = fdopen(out[0], "r");
  char line[256] = {0};
  ASSERT_NE(fgets(line, sizeof(line), f), nullptr);
  const char* colon = std::strrchr(line, ':');
  ASSERT_NE(colon, nullptr) << line;
  const std::string addr = "127.0.0.1:" + std::to_string(std::atoi(colon + 1));
  auto stub = v1::ExpertShard::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  // Wait until the experts are loaded and the stream works.
  v1::DispatchResponse resp;
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(stream->Write(Batch(i, 1, {{0, {0}}})));
    ASSERT_TRUE(stream->Read(&resp));
    if (resp.code() == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(resp.code(), 0) << resp.message();
  const auto start = std::chrono::steady_clock::now();
  kill(pid, SIGTERM);
  while (stream->Read(&resp)) {
  }
  const grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::UNAVAILABLE) << st.error_message();
  auto since = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  // The stream ends within the shutdown's grace (500 ms) and some slack.
  EXPECT_LT(since(), 2.0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  // The process exits soon after; a ThreadSanitizer build's exit alone has taken over 1.5 s on
  // a loaded 2-core machine (a stuck thread would hold it for the 10 s of a drain or more).
  EXPECT_LT(since(), 5.0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  fclose(f);
}

}  // namespace
}  // namespace moe::expert
