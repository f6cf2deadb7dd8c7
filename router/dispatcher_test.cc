#include "router/dispatcher.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "router/moe_layer.h"
#include "router/trainer.h"
#include "services/common/clock.h"
#include "services/common/notification.h"
#include "services/common/random_checkpoint.h"
#include "services/common/status_macros.h"

namespace moe::router {
namespace {

common::ModelConfig Config() {
  common::ModelConfig c;
  c.num_experts = 4;
  c.d_model = 16;
  c.d_ff = 24;
  c.top_k = 2;
  c.activation = common::Activation::kRelu;
  return c;
}

// A shard in memory: computes its experts with ExpertFfn, or fails as told.
class FakeShard : public ShardClient {
 public:
  FakeShard(std::string name, const common::Checkpoint& ck) : name_(std::move(name)) {
    for (const auto& w : ck.experts) experts_.push_back(*expert::ExpertFfn::Create(ck.config, w));
  }
  void Dispatch(std::shared_ptr<const v1::DispatchRequest> req, int64_t,
                DispatchDone done) override {
    if (before_dispatch) before_dispatch();
    ++batches;
    requests.push_back(*req);
    if (fail_with != absl::StatusCode::kOk) {
      done(absl::Status(fail_with, name_ + " failed"));
      return;
    }
    if (never_answer) {
      parked.push_back(std::move(done));
      return;
    }
    v1::DispatchResponse refusal;  // as the shard server: every expert it lacks, named
    for (const auto& er : req->experts()) {
      if (lacks.count(er.expert()) != 0) refusal.add_missing_experts(er.expert());
    }
    if (refusal.missing_experts_size() > 0) {
      refusal.set_batch_id(req->batch_id());
      refusal.set_code(static_cast<int>(absl::StatusCode::kFailedPrecondition));
      refusal.set_message(absl::StrCat(name_, ": expert ", refusal.missing_experts(0),
                                       " is not loaded on this shard"));
      done(refusal);
      return;
    }
    const int64_t d = Config().d_model;
    auto view = common::DecodeTensor(req->rows(), "rows");
    std::vector<float> rows = common::ViewToFloat(*view);
    v1::DispatchResponse resp;
    resp.set_batch_id(req->batch_id());
    for (const auto& er : req->experts()) {
      std::vector<float> in, out(er.rows_size() * d);
      for (int r : er.rows()) in.insert(in.end(), rows.begin() + r * d, rows.begin() + (r + 1) * d);
      EXPECT_TRUE(experts_[er.expert()]->Forward(in.data(), er.rows_size(), out.data()).ok());
      auto* o = resp.add_outputs();
      o->set_expert(er.expert());
      common::EncodeTensor(out, {er.rows_size(), d}, common::WireType::kFloat32, o->mutable_output());
    }
    if (repeat_first_output && resp.outputs_size() > 1) {
      *resp.mutable_outputs(1) = resp.outputs(0);  // the first expert twice, the second never
    }
    done(resp);
  }
  void CancelBatch(uint64_t batch_id) override {
    // As GrpcShardClient's stream: a batch not sent yet is not cancelled.
    const bool sent =
        std::any_of(requests.begin(), requests.end(),
                    [&](const v1::DispatchRequest& r) { return r.batch_id() == batch_id; });
    if (sent || !cancels_only_sent) cancelled.push_back(batch_id);
  }
  bool healthy() const override { return healthy_; }
  void CheckHealthNow() override {}
  int64_t outstanding_rows() const override { return outstanding; }
  const std::string& address() const override { return name_; }
  absl::StatusOr<v1::ShardStatus> LoadExperts(const std::vector<int>& experts, uint64_t version,
                                              const std::string& source, absl::Duration) override {
    RETURN_IF_ERROR(CheckVersion(version));
    loads.push_back({experts, source});
    return v1::ShardStatus();
  }
  // Gives the experts the weights (the steps) of their replicas on `source`, one of `peers`.
  absl::StatusOr<v1::ShardStatus> RollBackExperts(const std::vector<int>& experts,
                                                  uint64_t version, const std::string& source,
                                                  absl::Duration) override {
    RETURN_IF_ERROR(CheckVersion(version));
    rollbacks.push_back({experts, source});
    const FakeShard* from = peers != nullptr && peers->count(source) ? peers->at(source) : nullptr;
    for (int e : experts) {
      if (from != nullptr && from->trained.count(e)) {
        trained[e] = from->trained.at(e);
      } else {
        trained.erase(e);
      }
    }
    return v1::ShardStatus();
  }
  absl::StatusOr<v1::ShardStatus> UnloadExperts(const std::vector<int>&, uint64_t version,
                                                absl::Duration) override {
    RETURN_IF_ERROR(CheckVersion(version));
    return v1::ShardStatus();
  }
  // A placement version as a shard's store checks it: an older one is refused, 0 never is.
  absl::Status CheckVersion(uint64_t v) {
    if (v != 0 && v < version) {
      return absl::FailedPreconditionError(absl::StrCat(
          name_, ": placement version ", v, " is older than the shard's version ", version));
    }
    version = std::max(version, v);
    return absl::OkStatus();
  }
  // Every expert, with the last step whose commit this fake applied to it.
  absl::StatusOr<v1::ShardStatus> GetStatus(absl::Duration) override {
    v1::ShardStatus st;
    for (int e = 0; e < Config().num_experts; ++e) {
      v1::ExpertStatus* x = st.add_experts();
      x->set_expert(e);
      if (loading.count(e)) {  // a loading expert's step is not known yet
        x->set_state(v1::ExpertStatus::LOADING);
        continue;
      }
      x->set_state(v1::ExpertStatus::READY);
      auto it = trained.find(e);
      x->set_trained_step(it == trained.end() ? 0 : it->second);
    }
    return st;
  }
  // dX of zeros, shaped like each expert's gradient rows (the trainer's plumbing, not its math).
  absl::StatusOr<v1::BackwardResponse> Backward(const v1::BackwardRequest& req,
                                                absl::Duration) override {
    {
      std::lock_guard<std::mutex> lock(backward_mu);  // the trainer's threads, one per batch
      backward_batches.push_back(req.batch_id());
      backward_rates.push_back(req.learning_rate());
    }
    v1::BackwardResponse resp;
    resp.set_batch_id(req.batch_id());
    for (const v1::ExpertOutput& g : req.grads()) {
      auto view = common::DecodeMatrix(g.output(), "grad", Config().d_model);
      if (!view.ok()) return view.status();
      v1::ExpertOutput* o = resp.add_grad_inputs();
      o->set_expert(g.expert());
      common::EncodeTensor(std::vector<float>(view->dim(0) * Config().d_model, 0.f),
                           {view->dim(0), Config().d_model}, common::WireType::kFloat32,
                           o->mutable_output());
    }
    return resp;
  }
  struct Finish {
    uint64_t step;
    bool commit;
    float learning_rate;
  };
  absl::Status FinishStep(uint64_t step, bool commit, float learning_rate,
                          absl::Duration) override {
    finishes.push_back({step, commit, learning_rate});
    if (finish_failures > 0) {
      --finish_failures;
      return absl::DeadlineExceededError(name_ + " did not answer");
    }
    if (commit) {
      for (int e = 0; e < Config().num_experts; ++e) trained[e] = step;
    }
    return absl::OkStatus();
  }
  // The verdict of the first FinishStep of `step`, as a shard keeps it (OPEN before any).
  absl::StatusOr<v1::StepOutcome::State> GetStep(uint64_t step, absl::Duration) override {
    ++step_queries;
    if (step_failures > 0) {
      --step_failures;
      return absl::UnavailableError(name_ + " is unreachable");
    }
    for (const Finish& f : finishes) {
      if (f.step == step) return f.commit ? v1::StepOutcome::COMMITTED : v1::StepOutcome::ABORTED;
    }
    return v1::StepOutcome::OPEN;
  }
  absl::StatusOr<std::string> ExportExpert(int, absl::Duration) override {
    return absl::UnimplementedError("fake");
  }

  bool healthy_ = true;
  absl::StatusCode fail_with = absl::StatusCode::kOk;
  bool never_answer = false;
  std::set<int> lacks;  // experts it refuses a batch for, naming them (missing_experts)
  std::function<void()> before_dispatch;  // run as a batch is handed over, before it is sent
  bool cancels_only_sent = false;         // a cancellation before its batch is dropped
  bool repeat_first_output = false;  // answers a batch of several experts malformed
  int64_t outstanding = 0;  // what outstanding_rows() reports
  uint64_t version = 0;     // the highest placement version taken
  int finish_failures = 0;  // FinishStep fails this many more times
  int step_failures = 0;    // GetStep fails this many more times
  std::vector<std::pair<std::vector<int>, std::string>> loads;  // experts, source peer
  std::vector<std::pair<std::vector<int>, std::string>> rollbacks;  // experts, source peer
  std::map<int, uint64_t> trained;  // expert -> the step of the last commit applied to it
  std::set<int> loading;             // experts GetStatus reports LOADING
  const std::map<std::string, FakeShard*>* peers = nullptr;  // by address, for copies
  std::vector<Finish> finishes;
  int step_queries = 0;
  int batches = 0;
  std::vector<v1::DispatchRequest> requests;
  std::vector<DispatchDone> parked;
  std::vector<uint64_t> cancelled;  // CancelBatch's ids
  std::mutex backward_mu;
  std::vector<uint64_t> backward_batches;  // the batch id of each Backward, backward_mu
  std::vector<float> backward_rates;       // the learning rate each Backward carried, backward_mu

 private:
  std::string name_;
  std::vector<std::unique_ptr<expert::ExpertFfn>> experts_;
};

struct Rig {
  Rig(Strategy s, int shards) : ck(common::MakeRandomCheckpoint({Config(), false, 9})) {
    layer = *MoeLayer::Create(ck);
    table.placement = *ComputePlacement(s, 4, shards, std::vector<double>(4, 1.0));
    table.placement.version = 3;
    for (int i = 0; i < shards; ++i) {
      fakes.push_back(std::make_shared<FakeShard>("shard" + std::to_string(i), ck));
      table.shards.push_back(fakes.back());
      by_address[fakes.back()->address()] = fakes.back().get();
      fakes.back()->peers = &by_address;
    }
  }
  Rig(const Rig&) = delete;  // the fakes point at by_address
  absl::StatusOr<std::vector<float>> Run(const std::vector<float>& x, int64_t n,
                                         absl::Duration timeout = absl::Seconds(10),
                                         DispatchStats* stats = nullptr) {
    return RunOn(dispatcher, x, n, timeout, stats);
  }
  // The same through `d` (a dispatcher of other options).
  absl::StatusOr<std::vector<float>> RunOn(Dispatcher& d, const std::vector<float>& x, int64_t n,
                                           absl::Duration timeout = absl::Seconds(10),
                                           DispatchStats* stats = nullptr) {
    GatingResult g = Route(layer->gate_params(), x.data(), n, GatingOptions{2, true, 0, {}});
    return d.Run(table, x.data(), n, g, common::MonotonicNow() + timeout, stats);
  }
  common::Checkpoint ck;
  std::unique_ptr<MoeLayer> layer;
  RoutingTable table;
  std::vector<std::shared_ptr<FakeShard>> fakes;
  std::map<std::string, FakeShard*> by_address;
  Dispatcher dispatcher{Config(), DispatcherOptions{}};
};

// `y`, the dispatcher's output for tokens x [n, d_model], is the in-process layer's.
void ExpectLayerOutput(const Rig& rig, const std::vector<float>& x, int64_t n,
                       const std::vector<float>& y) {
  auto want = rig.layer->Forward(x.data(), n);
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_EQ(y.size(), static_cast<size_t>(n * Config().d_model));
  ASSERT_EQ(y.size(), want->y.size());
  for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], want->y[i], 1e-5) << "value " << i;
}

TEST(Dispatcher, MatchesTheInProcessLayerForEveryStrategy) {
  for (Strategy s : {Strategy::kReplicated, Strategy::kSharded, Strategy::kHybrid}) {
    Rig setup(s, 3);
    const int64_t n = 40;
    const std::vector<float> x = common::RandomMatrix(n, 16, 3);
    auto y = setup.Run(x, n);
    ASSERT_TRUE(y.ok()) << y.status();
    ExpectLayerOutput(setup, x, n, *y);
  }
}

TEST(Dispatcher, EachTokenRowTravelsOncePerShard) {
  Rig setup(Strategy::kSharded, 1);  // one shard holds every expert
  const int64_t n = 10;
  ASSERT_TRUE(setup.Run(common::RandomMatrix(n, 16, 4), n).ok());
  ASSERT_EQ(setup.fakes[0]->requests.size(), 1u);
  const auto& req = setup.fakes[0]->requests[0];
  EXPECT_EQ(req.rows().shape(0), n);  // 10 tokens, 20 assignments, 10 rows on the wire
  int assigned = 0;
  for (const auto& er : req.experts()) assigned += er.rows_size();
  EXPECT_EQ(assigned, 2 * n);
  EXPECT_EQ(req.placement_version(), 3u);
  EXPECT_GT(req.timeout_ms(), 0u);
}

int Assigned(const v1::DispatchRequest& req) {
  int assigned = 0;
  for (const auto& er : req.experts()) assigned += er.rows_size();
  return assigned;
}

TEST(SplitShardPlan, CutsInOrderWithinTheLimitAndKeepsEveryPosition) {
  const std::map<int, std::vector<int64_t>> plan = {{1, {0, 1, 2, 3, 4}}, {4, {5, 6}}, {7, {7}}};
  EXPECT_EQ(SplitShardPlan(plan, 8), (std::vector<std::map<int, std::vector<int64_t>>>{plan}));
  EXPECT_EQ(SplitShardPlan(plan, 3),
            (std::vector<std::map<int, std::vector<int64_t>>>{
                {{1, {0, 1, 2}}}, {{1, {3, 4}}, {4, {5}}}, {{4, {6}}, {7, {7}}}}));
  EXPECT_EQ(SplitShardPlan(plan, 1).size(), 8u);
  EXPECT_TRUE(SplitShardPlan({}, 3).empty());
}

TEST(MaxBatchAssignments, TheShardsLimitThenTheBytesOfItsRows) {
  const common::Checkpoint ck = common::MakeRandomCheckpoint({Config(), false, 9});
  FakeShard shard("s", ck);
  EXPECT_EQ(MaxBatchAssignments(shard, 16, kMaxDispatchBytes), kDefaultShardBatchRows);
  shard.SetBatchLimits(100, 64 << 20);
  EXPECT_EQ(MaxBatchAssignments(shard, 16, kMaxDispatchBytes), 100);
  // Mixtral's d_model 4096: 1024 FP32 rows fill 16 MiB.
  shard.SetBatchLimits(8192, 64 << 20);
  EXPECT_EQ(MaxBatchAssignments(shard, 4096, kMaxDispatchBytes), 1024);
  EXPECT_EQ(MaxBatchAssignments(shard, 1 << 30, kMaxDispatchBytes), 1);
  // A shard run with --max-message-mb 8: a quarter of it, 2 MiB, is 128 rows.
  shard.SetBatchLimits(8192, 8 << 20);
  EXPECT_EQ(MaxBatchAssignments(shard, 4096, kMaxDispatchBytes), 128);
}

// Each shard's plan is cut by that shard's own limit, in shard order; a shard with nothing planned
// gets no batch, and every position is kept, once, in order.
TEST(CutIntoBatches, EachShardByItsOwnLimit) {
  const common::Checkpoint ck = common::MakeRandomCheckpoint({Config(), false, 9});
  auto a = std::make_shared<FakeShard>("a", ck);
  auto b = std::make_shared<FakeShard>("b", ck);
  auto c = std::make_shared<FakeShard>("c", ck);
  a->SetBatchLimits(3, 64 << 20);
  c->SetBatchLimits(100, 64 << 20);
  const std::vector<std::shared_ptr<ShardClient>> shards = {a, b, c};
  std::vector<std::map<int, std::vector<int64_t>>> plan(3);
  plan[0] = {{0, {0, 1}}, {2, {5, 6, 7, 8}}};  // 6 positions, 3 at most per batch
  plan[2] = {{1, {2, 3, 4}}};
  const std::vector<ShardBatch> batches = CutIntoBatches(plan, shards, 16, kMaxDispatchBytes);
  ASSERT_EQ(batches.size(), 3u);
  EXPECT_EQ(batches[0].shard, 0);
  EXPECT_EQ(batches[0].plan, (std::map<int, std::vector<int64_t>>{{0, {0, 1}}, {2, {5}}}));
  EXPECT_EQ(batches[1].shard, 0);
  EXPECT_EQ(batches[1].plan, (std::map<int, std::vector<int64_t>>{{2, {6, 7, 8}}}));
  EXPECT_EQ(batches[2].shard, 2);
  EXPECT_EQ(batches[2].plan, plan[2]);
}

// A request whose share for one shard passes the shard's --max-batch-rows (a one-shard cluster,
// or a replica down) goes as several batches, where one would be refused "split it" every time.
TEST(Dispatcher, AShardsShareIsCutIntoBatchesWithinItsLimit) {
  Rig setup(Strategy::kSharded, 1);
  setup.fakes[0]->SetBatchLimits(7, 64 << 20);
  const int64_t n = 20;  // 40 assignments: 6 batches
  const std::vector<float> x = common::RandomMatrix(n, 16, 31);
  DispatchStats stats;
  auto y = setup.Run(x, n, absl::Seconds(10), &stats);
  ASSERT_TRUE(y.ok()) << y.status();
  ExpectLayerOutput(setup, x, n, *y);
  ASSERT_EQ(setup.fakes[0]->requests.size(), 6u);
  EXPECT_EQ(stats.shard_batches, 6);
  int total = 0;
  for (const auto& req : setup.fakes[0]->requests) {
    EXPECT_LE(Assigned(req), 7);
    total += Assigned(req);
  }
  EXPECT_EQ(total, 2 * n);
}

// The same by bytes: no batch, nor its answer (a row per assignment), passes max_batch_bytes.
TEST(Dispatcher, NoBatchPassesTheByteLimit) {
  Rig setup(Strategy::kSharded, 1);
  DispatcherOptions o;
  o.max_batch_bytes = 5 * 16 * sizeof(float);  // five rows of d_model 16
  Dispatcher dispatcher(Config(), o);
  const int64_t n = 9;
  const std::vector<float> x = common::RandomMatrix(n, 16, 32);
  auto y = setup.RunOn(dispatcher, x, n);
  ASSERT_TRUE(y.ok()) << y.status();
  ExpectLayerOutput(setup, x, n, *y);
  ASSERT_EQ(setup.fakes[0]->requests.size(), 4u);  // 18 assignments
  for (const auto& req : setup.fakes[0]->requests) EXPECT_LE(Assigned(req), 5);
}

int64_t RowsSent(const FakeShard& s) {
  int64_t rows = 0;
  for (const auto& req : s.requests) {
    for (const auto& er : req.experts()) rows += er.rows_size();
  }
  return rows;
}

TEST(Dispatcher, AFewRowsOfAnExpertGoWholeToOneReplica) {
  Rig setup(Strategy::kReplicated, 2);  // every expert on both shards
  const int64_t n = 10;                 // 20 assignments: under 64 rows per expert
  const std::vector<float> x = common::RandomMatrix(n, 16, 21);
  auto y = setup.Run(x, n);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(RowsSent(*setup.fakes[0]) + RowsSent(*setup.fakes[1]), 2 * n);
  std::vector<int> holders(4, 0);
  for (const auto& fake : setup.fakes) {
    for (const auto& req : fake->requests) {
      for (const auto& er : req.experts()) ++holders[er.expert()];
    }
  }
  for (int e = 0; e < 4; ++e) EXPECT_LE(holders[e], 1) << "expert " << e << " was split";
  ExpectLayerOutput(setup, x, n, *y);
}

TEST(Dispatcher, RowsGoToTheReplicaWithLessOutstandingWork) {
  Rig setup(Strategy::kReplicated, 2);
  setup.fakes[0]->outstanding = 1000;
  const int64_t n = 10;
  ASSERT_TRUE(setup.Run(common::RandomMatrix(n, 16, 23), n).ok());
  EXPECT_EQ(setup.fakes[0]->batches, 0);
  EXPECT_EQ(RowsSent(*setup.fakes[1]), 2 * n);
}

TEST(Dispatcher, AnIdleClusterSendsEachExpertToItsHomeReplicaEveryTime) {
  Rig setup(Strategy::kReplicated, 4);  // every expert on all four shards
  // home[e]: the shard that got expert e's rows; it must stay the same over many batches so the
  // weights it reads stay in that shard's cache, and the experts' homes must not all coincide.
  std::vector<int> home(4, -1);
  for (int b = 0; b < 12; ++b) {
    for (auto& f : setup.fakes) f->requests.clear();
    ASSERT_TRUE(setup.Run(common::RandomMatrix(2, 16, 40 + b), 2).ok());
    for (int s = 0; s < 4; ++s) {
      for (const auto& req : setup.fakes[s]->requests) {
        for (const auto& er : req.experts()) {
          if (home[er.expert()] < 0) home[er.expert()] = s;
          EXPECT_EQ(home[er.expert()], s) << "expert " << er.expert() << " moved in batch " << b;
        }
      }
    }
  }
  std::set<int> homes;
  for (int h : home) {
    if (h >= 0) homes.insert(h);
  }
  EXPECT_GE(homes.size(), 2u) << "every expert's home is the same shard";
}

TEST(Dispatcher, ManyRowsOfAnExpertAreSplitInPiecesOverItsReplicas) {
  Rig setup(Strategy::kReplicated, 4);  // every expert on all four shards
  const int64_t n = 400;                // 800 assignments, about 200 rows per expert
  const std::vector<float> x = common::RandomMatrix(n, 16, 22);
  auto y = setup.Run(x, n);
  ASSERT_TRUE(y.ok()) << y.status();
  const int64_t piece = 64;
  ASSERT_EQ(DispatcherOptions().min_split_rows, piece) << "the rig runs with the default";
  GatingResult g = Route(setup.layer->gate_params(), x.data(), n, GatingOptions{2, true, 0, {}});
  std::vector<int64_t> per_expert(4, 0);
  for (int e : g.expert_ids) ++per_expert[e];
  // rows[e][s]: expert e's rows sent to shard s.
  std::vector<std::vector<int64_t>> rows(4, std::vector<int64_t>(4, 0));
  int64_t total = 0;
  for (int s = 0; s < 4; ++s) {
    ASSERT_LE(setup.fakes[s]->requests.size(), 1u);
    for (const auto& req : setup.fakes[s]->requests) {
      for (const auto& er : req.experts()) {
        rows[er.expert()][s] += er.rows_size();
        total += er.rows_size();
      }
    }
  }
  EXPECT_EQ(total, 2 * n);
  for (int e = 0; e < 4; ++e) {
    int holders = 0, small = 0;
    for (int s = 0; s < 4; ++s) {
      holders += rows[e][s] > 0;
      small += rows[e][s] > 0 && rows[e][s] < piece;
    }
    // Pieces of `piece` rows (the last may be smaller) over the least busy replicas.
    EXPECT_LE(small, 1) << "expert " << e << " scattered in small pieces";
    EXPECT_GE(holders, per_expert[e] >= 2 * piece ? 2 : 1)
        << "expert " << e << " (" << per_expert[e] << " rows) not spread over its replicas";
  }
  ExpectLayerOutput(setup, x, n, *y);
}

TEST(Dispatcher, FailsOverToAnotherReplica) {
  Rig setup(Strategy::kReplicated, 3);
  setup.fakes[0]->fail_with = absl::StatusCode::kUnavailable;
  setup.fakes[1]->fail_with = absl::StatusCode::kFailedPrecondition;
  const int64_t n = 64;
  const std::vector<float> x = common::RandomMatrix(n, 16, 5);
  DispatchStats stats;
  auto y = setup.Run(x, n, absl::Seconds(10), &stats);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(stats.failovers, 2);
  ExpectLayerOutput(setup, x, n, *y);
}

// A shard that fails takes out all its batches of the round at once: one failover, not one per
// batch (moe_router_failovers_total counts shard failures recovered).
TEST(Dispatcher, AShardFailingWithSeveralBatchesIsOneFailover) {
  Rig setup(Strategy::kReplicated, 2);
  setup.fakes[0]->fail_with = absl::StatusCode::kUnavailable;
  setup.fakes[0]->SetBatchLimits(7, 64 << 20);
  setup.fakes[1]->outstanding = 1000;  // the failing replica gets every row first
  const int64_t n = 20;                // 40 assignments: 6 batches of at most 7
  const std::vector<float> x = common::RandomMatrix(n, 16, 33);
  DispatchStats stats;
  auto y = setup.Run(x, n, absl::Seconds(10), &stats);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(setup.fakes[0]->batches, 6);
  EXPECT_EQ(stats.failovers, 1);
  ExpectLayerOutput(setup, x, n, *y);
}

// A shard whose answer names one expert twice and leaves another out would have the second's
// rows combined as zeros: the answer is refused and the batch goes to another replica.
TEST(Dispatcher, AnAnswerThatRepeatsAnExpertIsRefusedAndTheBatchFailsOver) {
  Rig setup(Strategy::kReplicated, 2);
  setup.fakes[0]->repeat_first_output = true;
  setup.fakes[1]->outstanding = 1000;  // the bad replica gets the batch first
  const int64_t n = 10;
  const std::vector<float> x = common::RandomMatrix(n, 16, 8);
  DispatchStats stats;
  auto y = setup.Run(x, n, absl::Seconds(10), &stats);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_GE(setup.fakes[0]->batches, 1);
  EXPECT_GE(stats.failovers, 1);
  ExpectLayerOutput(setup, x, n, *y);

  Rig alone(Strategy::kSharded, 1);
  alone.fakes[0]->repeat_first_output = true;
  auto bad = alone.Run(x, n);
  // The expert's only replica failed it: UNAVAILABLE, with the shard's error.
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kUnavailable) << bad.status();
  EXPECT_NE(bad.status().message().find("answered with a malformed output for expert"),
            std::string::npos)
      << bad.status();
}

// A shard that lacks some of a batch's experts (the router's placement is older than the shard's)
// names them: only those leave it for the request. The batch's other experts go back to it, and
// the missing ones to their other replicas; with no other replica, the request fails naming the
// expert and the shard's refusal. (Before 2026-12-07 the shard was out for the whole request, and
// an expert held there alone failed it too.)
TEST(Dispatcher, AShardLackingAnExpertIsSkippedForThatExpertOnly) {
  // hybrid over 2 shards of 4 experts: 0 and 1 on both, 2 on shard 0 only, 3 on shard 1 only.
  Rig setup(Strategy::kHybrid, 2);
  ASSERT_EQ(setup.table.placement.replicas[0], (std::vector<int>{0, 1}));
  ASSERT_EQ(setup.table.placement.replicas[2], (std::vector<int>{0}));
  FakeShard& lacking = *setup.fakes[0];
  lacking.lacks = {0};
  setup.fakes[1]->outstanding = 1000;  // expert 0's rows go to shard 0 first
  const int64_t n = 40;
  const std::vector<float> x = common::RandomMatrix(n, 16, 12);
  DispatchStats stats;
  auto y = setup.Run(x, n, absl::Seconds(10), &stats);
  ASSERT_TRUE(y.ok()) << y.status();
  ExpectLayerOutput(setup, x, n, *y);
  EXPECT_EQ(stats.failovers, 0) << "the shard was taken out of the request";
  ASSERT_EQ(lacking.requests.size(), 2u) << "the refused batch, then its other experts again";
  std::set<int> first, second;
  for (const auto& er : lacking.requests[0].experts()) first.insert(er.expert());
  for (const auto& er : lacking.requests[1].experts()) second.insert(er.expert());
  EXPECT_EQ(first.count(0), 1u);
  EXPECT_EQ(second.count(0), 0u) << "expert 0 sent again to the shard that lacks it";
  EXPECT_EQ(second.count(2), 1u) << "expert 2, held on shard 0 alone, not sent back to it";
  bool zero_elsewhere = false;
  for (const auto& r : setup.fakes[1]->requests) {
    for (const auto& er : r.experts()) zero_elsewhere = zero_elsewhere || er.expert() == 0;
  }
  EXPECT_TRUE(zero_elsewhere) << "expert 0's rows never reached its other replica";

  // The same where the shard's share is cut into batches (of 7 assignments): several of them
  // name expert 0, and the shard is still out for it alone.
  Rig cut(Strategy::kHybrid, 2);
  cut.fakes[0]->lacks = {0};
  cut.fakes[0]->SetBatchLimits(7, 64 << 20);
  cut.fakes[1]->outstanding = 1000;
  DispatchStats cut_stats;
  auto w = cut.Run(x, n, absl::Seconds(10), &cut_stats);
  ASSERT_TRUE(w.ok()) << w.status();
  ExpectLayerOutput(cut, x, n, *w);
  EXPECT_EQ(cut_stats.failovers, 0) << "the shard was taken out of the request";
  int naming_zero = 0;
  for (const auto& r : cut.fakes[0]->requests) {
    for (const auto& er : r.experts()) naming_zero += er.expert() == 0 ? 1 : 0;
  }
  EXPECT_GE(naming_zero, 2) << "the case of several batches naming the expert was not made";

  // Expert 2 lacking on its only replica: the request fails, naming it and the shard's refusal.
  Rig alone(Strategy::kHybrid, 2);
  alone.fakes[0]->lacks = {2};
  auto z = alone.Run(x, n);
  EXPECT_EQ(z.status().code(), absl::StatusCode::kUnavailable) << z.status();
  EXPECT_NE(z.status().message().find("expert 2 has no healthy replica"), std::string::npos)
      << z.status();
  EXPECT_NE(z.status().message().find("shard0: expert 2 is not loaded on this shard"),
            std::string::npos)
      << z.status();
}

// A shard that says it lacks another expert each round (another router unloading them one by
// one): those rounds do not count toward --max-rounds (each takes a shard-expert pair out for
// good, so there are at most shards x experts of them).
TEST(Dispatcher, RoundsThatOnlyFindExpertsMissingDoNotUseUpTheRetries) {
  Rig setup(Strategy::kHybrid, 2);  // 0 and 1 on both shards
  FakeShard& shard = *setup.fakes[0];
  setup.fakes[1]->outstanding = 1000;  // experts 0 and 1 go to shard 0 first
  int sent = 0;
  shard.before_dispatch = [&] {
    if (++sent <= 2) shard.lacks.insert(sent - 1);  // expert 0 in round 1, expert 1 in round 2
  };
  DispatcherOptions o;
  o.max_rounds = 2;
  Dispatcher dispatcher(Config(), o);
  const int64_t n = 40;
  const std::vector<float> x = common::RandomMatrix(n, 16, 14);
  auto y = setup.RunOn(dispatcher, x, n);
  ASSERT_TRUE(y.ok()) << y.status();
  ExpectLayerOutput(setup, x, n, *y);
  EXPECT_EQ(shard.requests.size(), 3u) << "not three rounds: the case was not made";
}

TEST(Dispatcher, ExpertWithoutHealthyReplicaIsUnavailableByName) {
  Rig setup(Strategy::kSharded, 2);  // experts 0,1 on shard 0; 2,3 on shard 1
  setup.fakes[1]->healthy_ = false;
  setup.fakes[1]->fail_with = absl::StatusCode::kUnavailable;  // really down
  const int64_t n = 30;
  auto y = setup.Run(common::RandomMatrix(n, 16, 6), n);
  EXPECT_EQ(y.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(y.status().message().find("has no healthy replica"), std::string::npos);
  EXPECT_NE(y.status().message().find("shard1"), std::string::npos) << y.status();
  // The same when the shard fails mid-batch instead.
  Rig again(Strategy::kSharded, 2);
  again.fakes[1]->fail_with = absl::StatusCode::kUnavailable;
  auto z = again.Run(common::RandomMatrix(n, 16, 6), n);
  EXPECT_EQ(z.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(z.status().message().find("expert "), std::string::npos) << z.status();
  EXPECT_NE(z.status().message().find("has no healthy replica"), std::string::npos) << z.status();
  EXPECT_NE(z.status().message().find("shard1"), std::string::npos) << z.status();
}

// Replicas that refuse a batch for a full queue are busy, not down: when every replica of an
// expert did, the request fails with RESOURCE_EXHAUSTED naming the expert and the shards' own
// errors, so the client backs off rather than looking for a failure.
TEST(Dispatcher, ExpertWhoseReplicasAreAllFullIsResourceExhausted) {
  Rig setup(Strategy::kReplicated, 2);
  for (auto& f : setup.fakes) f->fail_with = absl::StatusCode::kResourceExhausted;
  auto y = setup.Run(common::RandomMatrix(5, 16, 9), 5);
  EXPECT_EQ(y.status().code(), absl::StatusCode::kResourceExhausted) << y.status();
  EXPECT_NE(y.status().message().find("every replica's queue is full"), std::string::npos)
      << y.status();
  // Each shard's error once; it names its shard, which is not named again.
  EXPECT_NE(y.status().message().find("(shard0 failed; shard1 failed)"), std::string::npos)
      << y.status();
  // One replica full and the other down: the expert is unavailable, with both reasons.
  Rig mixed(Strategy::kReplicated, 2);
  mixed.fakes[0]->fail_with = absl::StatusCode::kResourceExhausted;
  mixed.fakes[1]->fail_with = absl::StatusCode::kUnavailable;
  auto z = mixed.Run(common::RandomMatrix(5, 16, 9), 5);
  EXPECT_EQ(z.status().code(), absl::StatusCode::kUnavailable) << z.status();
  EXPECT_NE(z.status().message().find("has no healthy replica"), std::string::npos);
  EXPECT_NE(z.status().message().find("shard0 failed"), std::string::npos) << z.status();
  EXPECT_NE(z.status().message().find("shard1 failed"), std::string::npos) << z.status();
}

TEST(Dispatcher, OutOfRotationReplicaIsTriedWhenItIsTheOnlyOne) {
  Rig setup(Strategy::kSharded, 2);
  setup.fakes[1]->healthy_ = false;  // a slow health check, but the shard answers
  const int64_t n = 30;
  const std::vector<float> x = common::RandomMatrix(n, 16, 6);
  auto y = setup.Run(x, n);
  ASSERT_TRUE(y.ok()) << y.status();
  ExpectLayerOutput(setup, x, n, *y);
}

// A shard that serves another model (restarted from another checkpoint) gets no batch: its
// experts' rows go to their other replicas, and an expert whose only replica it is fails
// UNAVAILABLE naming it, where an out-of-rotation shard would still be tried.
TEST(Dispatcher, AShardOfAnotherModelIsNeverSentABatch) {
  Rig setup(Strategy::kReplicated, 2);
  setup.fakes[0]->SetServesOtherModel(true);
  setup.fakes[1]->outstanding = 1000;  // the other one would get the batch first
  const int64_t n = 30;
  const std::vector<float> x = common::RandomMatrix(n, 16, 6);
  auto y = setup.Run(x, n);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(setup.fakes[0]->batches, 0);
  ExpectLayerOutput(setup, x, n, *y);

  Rig alone(Strategy::kSharded, 2);  // experts 0,1 on shard 0; 2,3 on shard 1
  alone.fakes[1]->SetServesOtherModel(true);
  auto z = alone.Run(x, n);
  EXPECT_EQ(z.status().code(), absl::StatusCode::kUnavailable) << z.status();
  EXPECT_NE(z.status().message().find("has no healthy replica"), std::string::npos) << z.status();
  EXPECT_EQ(alone.fakes[1]->batches, 0);
}

TEST(Dispatcher, NeverWaitsPastTheDeadline) {
  Rig setup(Strategy::kReplicated, 1);
  setup.fakes[0]->never_answer = true;
  const auto start = common::MonotonicNow();
  auto y = setup.Run(common::RandomMatrix(5, 16, 7), 5, absl::Milliseconds(100));
  EXPECT_EQ(y.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(common::MonotonicNow() - start, absl::Milliseconds(300));
  // A late answer after the deadline is harmless.
  for (auto& done : setup.fakes[0]->parked) done(absl::UnavailableError("late"));
  setup.fakes[0]->parked.clear();  // they hold the batch, which holds the table and the fakes
}

TEST(Dispatcher, NonRetryableShardErrorsAreReturned) {
  Rig setup(Strategy::kReplicated, 2);
  setup.fakes[0]->fail_with = absl::StatusCode::kInvalidArgument;
  setup.fakes[1]->fail_with = absl::StatusCode::kInvalidArgument;
  auto y = setup.Run(common::RandomMatrix(5, 16, 8), 5);
  EXPECT_EQ(y.status().code(), absl::StatusCode::kInvalidArgument);
  // The shard's own error, as it gave it (not retried elsewhere, not rewritten).
  EXPECT_TRUE(absl::StrContains(y.status().message(), "shard0 failed") ||
              absl::StrContains(y.status().message(), "shard1 failed"))
      << y.status();
}

TEST(Dispatcher, StartReturnsBeforeTheAnswersAndCombinesOnTheAnsweringThread) {
  Rig setup(Strategy::kSharded, 2);
  for (auto& f : setup.fakes) f->never_answer = true;
  const int64_t n = 6;
  const auto x = common::RandomMatrix(n, 16, 11);
  GatingResult g = Route(setup.layer->gate_params(), x.data(), n, GatingOptions{2, true, 0, {}});
  common::Notification answered;
  absl::StatusOr<std::vector<float>> y;
  std::thread::id done_on;
  setup.dispatcher.Start(std::make_shared<const RoutingTable>(setup.table), x, n, g,
                         common::MonotonicNow() + absl::Seconds(10),
                         [&](absl::StatusOr<std::vector<float>> out, const GatingResult& gating,
                             const DispatchStats& stats) {
                           EXPECT_EQ(gating.tokens, n);
                           EXPECT_GE(stats.shard_batches, 1);
                           y = std::move(out);
                           done_on = std::this_thread::get_id();
                           answered.Notify();
                         });
  // Nothing answered yet: Start has returned without waiting.
  EXPECT_FALSE(answered.HasBeenNotified());
  // The parked answers come from another thread, like a gRPC callback.
  std::thread shard_thread([&] {
    for (auto& f : setup.fakes) {
      f->never_answer = false;
      for (size_t i = 0; i < f->parked.size(); ++i) {
        // Replay the request now that the fake computes.
        v1::DispatchRequest req = f->requests[i];
        f->Dispatch(std::make_shared<v1::DispatchRequest>(req), 0, std::move(f->parked[i]));
      }
    }
  });
  const std::thread::id shard_id = shard_thread.get_id();
  shard_thread.join();
  for (auto& f : setup.fakes) f->parked.clear();
  ASSERT_TRUE(answered.HasBeenNotified());
  EXPECT_EQ(done_on, shard_id);
  ASSERT_TRUE(y.ok()) << y.status();
  ExpectLayerOutput(setup, x, n, *y);
}

TEST(Dispatcher, LargeBatchesAreCombinedThroughOffload) {
  Rig setup(Strategy::kReplicated, 1);
  std::atomic<int> offloaded{0};
  DispatcherOptions o;
  o.inline_assignments = 4;
  o.offload = [&](std::function<void()> work) {
    ++offloaded;
    std::thread(std::move(work)).detach();
    return true;
  };
  Dispatcher dispatcher(Config(), o);
  for (int64_t n : {2, 8}) {  // 4 and 16 assignments
    const auto x = common::RandomMatrix(n, 16, 12);
    GatingResult g = Route(setup.layer->gate_params(), x.data(), n, GatingOptions{2, true, 0, {}});
    auto y = dispatcher.Run(setup.table, x.data(), n, g, common::MonotonicNow() + absl::Seconds(10),
                            nullptr);
    ASSERT_TRUE(y.ok()) << y.status();
    ExpectLayerOutput(setup, x, n, *y);
    EXPECT_EQ(offloaded.load(), n == 2 ? 0 : 1) << n;
  }
}

TEST(Dispatcher, DeadlineFiresWhileAnswersAreOutstandingAndLateOnesAreIgnored) {
  Rig setup(Strategy::kSharded, 2);
  setup.fakes[1]->never_answer = true;  // shard 0 answers, shard 1 never does
  const int64_t n = 16;
  const auto x = common::RandomMatrix(n, 16, 13);
  GatingResult g = Route(setup.layer->gate_params(), x.data(), n, GatingOptions{2, true, 0, {}});
  common::Notification answered;
  absl::Status status;
  int calls = 0;
  const absl::Time start = common::MonotonicNow();
  setup.dispatcher.Start(std::make_shared<const RoutingTable>(setup.table), x, n, g,
                         start + absl::Milliseconds(150),
                         [&](absl::StatusOr<std::vector<float>> out, const GatingResult&,
                             const DispatchStats&) {
                           ++calls;
                           status = out.status();
                           answered.Notify();
                         });
  ASSERT_TRUE(answered.WaitForNotificationWithTimeout(absl::Seconds(5)));
  const absl::Duration took = common::MonotonicNow() - start;
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(status.message().find("waiting for 1 shard(s)"), absl::string_view::npos) << status;
  EXPECT_GE(took, absl::Milliseconds(150));
  EXPECT_LT(took, absl::Milliseconds(400));
  ASSERT_FALSE(setup.fakes[1]->parked.empty());
  // The silent shard is asked to drop the batch (were it only stalled, it would compute it once
  // it ran again); the one that answered is asked nothing.
  std::vector<uint64_t> sent;
  for (const auto& req : setup.fakes[1]->requests) sent.push_back(req.batch_id());
  EXPECT_EQ(setup.fakes[1]->cancelled, sent);
  EXPECT_TRUE(setup.fakes[0]->cancelled.empty());
  for (auto& done : setup.fakes[1]->parked) done(absl::UnavailableError("late"));
  setup.fakes[1]->parked.clear();  // they hold the batch, which holds the table and the fakes
  EXPECT_EQ(calls, 1);
}

// The client's cancellation (Dispatcher::Cancel) ends a batch in flight at once and cancels it on
// the shards that have not answered; a batch that has finished is not touched.
TEST(Dispatcher, ACancelledBatchEndsAtOnceAndIsCancelledOnItsShards) {
  Rig setup(Strategy::kReplicated, 1);
  setup.fakes[0]->never_answer = true;
  const int64_t n = 4;
  const auto x = common::RandomMatrix(n, 16, 14);
  GatingResult g = Route(setup.layer->gate_params(), x.data(), n, GatingOptions{2, true, 0, {}});
  absl::Status status;
  int calls = 0;
  const uint64_t id = setup.dispatcher.Start(
      std::make_shared<const RoutingTable>(setup.table), x, n, g,
      common::MonotonicNow() + absl::Seconds(30),
      [&](absl::StatusOr<std::vector<float>> out, const GatingResult&, const DispatchStats&) {
        ++calls;
        status = out.status();
      });
  EXPECT_EQ(calls, 0);
  setup.dispatcher.Cancel(id, absl::CancelledError("the client cancelled the request"));
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
  ASSERT_EQ(setup.fakes[0]->requests.size(), 1u);
  EXPECT_EQ(setup.fakes[0]->cancelled,
            std::vector<uint64_t>{setup.fakes[0]->requests[0].batch_id()});
  setup.dispatcher.Cancel(id, absl::CancelledError("again"));
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(setup.fakes[0]->cancelled.size(), 1u);
  for (auto& done : setup.fakes[0]->parked) done(absl::CancelledError("late"));
  setup.fakes[0]->parked.clear();
  EXPECT_EQ(calls, 1);
}

// A request that ends while its batch is handed to the shard client (registered, not yet
// sent): the cancellation Finish sends then comes before the batch, which a stream drops
// (GrpcShardClient cancels only the batches it has); the batch is cancelled again once sent.
// Before 2026-12-07 it was computed for nobody (once in ClusterTest's cancelled request).
TEST(Dispatcher, ARequestThatEndsWhileItsBatchIsHandedOverIsCancelledOnItsShard) {
  Rig setup(Strategy::kReplicated, 1);
  FakeShard& shard = *setup.fakes[0];
  shard.never_answer = true;
  shard.cancels_only_sent = true;
  const int64_t n = 4;
  const auto x = common::RandomMatrix(n, 16, 15);
  GatingResult g = Route(setup.layer->gate_params(), x.data(), n, GatingOptions{2, true, 0, {}});
  absl::Status status;
  int calls = 0;
  // The first call of this dispatcher is number 1; it ends as its batch is handed over.
  shard.before_dispatch = [&] {
    setup.dispatcher.Cancel(1, absl::CancelledError("the client cancelled the request"));
  };
  const uint64_t id = setup.dispatcher.Start(
      std::make_shared<const RoutingTable>(setup.table), x, n, g,
      common::MonotonicNow() + absl::Seconds(30),
      [&](absl::StatusOr<std::vector<float>> out, const GatingResult&, const DispatchStats&) {
        ++calls;
        status = out.status();
      });
  shard.before_dispatch = nullptr;
  EXPECT_EQ(id, 1u);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
  ASSERT_EQ(shard.requests.size(), 1u);
  EXPECT_EQ(shard.cancelled, std::vector<uint64_t>{shard.requests[0].batch_id()})
      << "the batch was sent after its request ended, and not cancelled";
  for (auto& done : shard.parked) done(absl::CancelledError("late"));
  shard.parked.clear();
  EXPECT_EQ(calls, 1);
}

TEST(Dispatcher, ShutdownFailsBatchesInFlightAndASilentShardKeepsNothingAlive) {
  Rig setup(Strategy::kReplicated, 1);
  setup.fakes[0]->never_answer = true;
  Dispatcher dispatcher(Config(), DispatcherOptions{});
  const auto x = common::RandomMatrix(3, 16, 14);
  GatingResult g = Route(setup.layer->gate_params(), x.data(), 3, GatingOptions{2, true, 0, {}});
  auto table = std::make_shared<const RoutingTable>(setup.table);
  std::weak_ptr<const RoutingTable> watch = table;
  absl::Status status;
  int calls = 0;
  dispatcher.Start(
      std::move(table), x, 3, g, common::MonotonicNow() + absl::Seconds(30),
      [&](absl::StatusOr<std::vector<float>> y, const GatingResult&, const DispatchStats&) {
        ++calls;
        status = y.status();
      });
  ASSERT_EQ(setup.fakes[0]->parked.size(), 1u);  // sent, never answered
  EXPECT_FALSE(watch.expired());                  // the batch in flight holds its table
  dispatcher.Shutdown();
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(status.message().find("shutting down"), absl::string_view::npos) << status;
  // The shard still holds its callback, but that no longer keeps the batch (nor the table and
  // shard clients it holds) alive; a late answer is ignored.
  EXPECT_TRUE(watch.expired());
  setup.fakes[0]->parked[0](absl::UnavailableError("late"));
  EXPECT_EQ(calls, 1);
  // Later batches fail at once.
  dispatcher.Start(
      std::make_shared<const RoutingTable>(setup.table), x, 3, g,
      common::MonotonicNow() + absl::Seconds(30),
      [&](absl::StatusOr<std::vector<float>> y, const GatingResult&, const DispatchStats&) {
        ++calls;
        status = y.status();
      });
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
}

// The trainer's two-phase commit, with shards in memory and a committer standing in for the
// coordinator: a committed step that one shard did not confirm is committed all the same; that
// shard is asked again until it confirms, and no step starts before.
struct TrainRig {
  explicit TrainRig(int unconfirmed_commits)
      : rig(Strategy::kReplicated, 3),
        trainer(Config(), [this, unconfirmed_commits](const v1::CommitStepRequest& req)
                              -> absl::StatusOr<v1::CommitStepResponse> {
          v1::CommitStepResponse r;
          if (abort_code != 0) {  // a member's reduction failed with it
            r.set_committed(false);
            r.set_code(abort_code);
            r.set_reason(
                "group 0 rank 1 (shard1): the update of expert 0 by its summed gradient "
                "at learning rate 0.25 is not finite (w1.weight[0])");
            return r;
          }
          r.set_committed(true);
          committed_on.assign(req.shards().begin(), req.shards().end());
          if (++commits <= unconfirmed_commits) {
            r.add_unconfirmed_shards(req.shards(1));
            r.set_reason("commit on shard1 not confirmed: deadline exceeded");
          }
          return r;
        }) {}
  absl::StatusOr<TrainResult> Step(uint64_t seed) {
    const int64_t n = 12;
    const std::vector<float> x = common::RandomMatrix(n, Config().d_model, seed);
    const std::vector<float> dy = common::RandomMatrix(n, Config().d_model, seed + 1);
    return trainer.Step(rig.table, rig.ck.gate, x.data(), dy.data(), n, TrainParams{0.25f},
                        common::MonotonicNow() + absl::Seconds(10));
  }
  Rig rig;
  int commits = 0;
  int abort_code = 0;                     // the coordinator aborts with this code (0: commits)
  std::vector<std::string> committed_on;  // the last CommitStepRequest's shards
  Trainer trainer;
};

// RetryConfirmations' answer while shard1 owes the commit of a step.
void ExpectShard1Unconfirmed(const absl::Status& st) {
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_NE(st.message().find("shard shard1 has not confirmed step id "), std::string::npos) << st;
}

TEST(Trainer, AShardThatDidNotConfirmACommitIsAskedAgainAndHoldsBackTheNextStep) {
  TrainRig t(/*unconfirmed_commits=*/1);
  t.rig.fakes[1]->finish_failures = 2;
  absl::StatusOr<TrainResult> first = t.Step(5);
  ASSERT_TRUE(first.ok()) << first.status();  // committed
  EXPECT_TRUE(t.rig.fakes[1]->finishes.empty());
  // The next step asks shard1 first; it fails again, so the step is refused before it starts.
  absl::StatusOr<TrainResult> second = t.Step(7);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find(
                absl::StrCat("shard shard1 has not confirmed step id ", first->step)),
            std::string::npos)
      << second.status();
  EXPECT_EQ(t.commits, 1);
  EXPECT_EQ(t.rig.fakes[0]->batches, 1) << "the refused step reached the shards";
  // The control loop asks again: a last failure, then shard1 confirms.
  ExpectShard1Unconfirmed(t.trainer.RetryConfirmations(t.rig.table));
  const absl::Status confirmed = t.trainer.RetryConfirmations(t.rig.table);
  EXPECT_TRUE(confirmed.ok()) << confirmed;
  ASSERT_EQ(t.rig.fakes[1]->finishes.size(), 3u);
  for (const FakeShard::Finish& f : t.rig.fakes[1]->finishes) {
    EXPECT_EQ(f.step, first->step);
    EXPECT_TRUE(f.commit);
    EXPECT_EQ(f.learning_rate, 0.25f);
  }
  EXPECT_TRUE(t.rig.fakes[0]->finishes.empty()) << "a shard that confirmed was asked again";
  EXPECT_TRUE(t.trainer.RetryConfirmations(t.rig.table).ok());
  EXPECT_EQ(t.rig.fakes[1]->finishes.size(), 3u) << "a confirmed shard was asked again";
  absl::StatusOr<TrainResult> third = t.Step(9);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(t.commits, 2);
}

// Serving and training send on the same stream to each shard, whose answers are matched to
// their batches by id: the two never use the same id.
TEST(Trainer, ServingAndTrainingBatchesOnAShardNeverShareAnId) {
  TrainRig t(/*unconfirmed_commits=*/0);
  const std::vector<float> x = common::RandomMatrix(12, Config().d_model, 3);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(t.rig.Run(x, 12).ok());
    ASSERT_TRUE(t.Step(5 + i).ok());
  }
  for (const auto& fake : t.rig.fakes) {
    std::set<uint64_t> ids;
    for (const v1::DispatchRequest& req : fake->requests) {
      EXPECT_TRUE(ids.insert(req.batch_id()).second)
          << fake->address() << " got batch id " << req.batch_id() << " twice";
    }
    EXPECT_GE(ids.size(), 4u) << fake->address();
  }
}

// A training step's share for a shard past its batch limit goes as several forwards, each with a
// backward of its own, and gives the gradients of the step sent whole.
TEST(Trainer, AShardsShareIsCutIntoBatchesWithinItsLimit) {
  TrainRig whole(/*unconfirmed_commits=*/0);
  TrainRig cut(/*unconfirmed_commits=*/0);
  for (auto& fake : cut.rig.fakes) fake->SetBatchLimits(3, 64 << 20);
  absl::StatusOr<TrainResult> a = whole.Step(5);
  absl::StatusOr<TrainResult> b = cut.Step(5);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->gate_weight.size(), b->gate_weight.size());
  for (size_t i = 0; i < a->gate_weight.size(); ++i) {
    EXPECT_NEAR(a->gate_weight[i], b->gate_weight[i], 1e-5) << i;
  }
  int forwards = 0;
  for (const auto& fake : cut.rig.fakes) {
    std::multiset<uint64_t> sent;
    const std::multiset<uint64_t> back(fake->backward_batches.begin(),
                                       fake->backward_batches.end());
    for (const v1::DispatchRequest& req : fake->requests) {
      EXPECT_LE(Assigned(req), 3) << fake->address();
      EXPECT_NE(req.train_step(), 0u);
      sent.insert(req.batch_id());
    }
    EXPECT_EQ(sent, back) << fake->address() << ": each forward gets exactly one backward";
    forwards += static_cast<int>(sent.size());
  }
  EXPECT_GE(forwards, 8);  // 24 assignments in pieces of at most 3
}

TEST(Trainer, AnUnconfirmedShardThatLeftThePlacementIsDropped) {
  TrainRig t(/*unconfirmed_commits=*/1);
  t.rig.fakes[1]->finish_failures = 100;  // never answers again
  ASSERT_TRUE(t.Step(5).ok());
  ExpectShard1Unconfirmed(t.trainer.RetryConfirmations(t.rig.table));
  RoutingTable without = t.rig.table;
  without.shards.erase(without.shards.begin() + 1);
  without.placement = *ComputePlacement(Strategy::kReplicated, 4, 2, std::vector<double>(4, 1.0));
  // Before a switch to `without` is applied, the leaving shard does not hold it up, but it is
  // kept: the switch may fail and leave it in the live table, where it must still be asked.
  EXPECT_TRUE(t.trainer.RetryConfirmations(without, /*drop_absent=*/false).ok());
  ExpectShard1Unconfirmed(t.trainer.RetryConfirmations(t.rig.table, /*drop_absent=*/false));
  // Once the switch is applied, it is forgotten.
  t.trainer.DropUnconfirmedOutside(without);
  const absl::Status dropped = t.trainer.RetryConfirmations(t.rig.table);
  EXPECT_TRUE(dropped.ok()) << dropped;
}

// A step whose gate gradient is not finite (a grad_output at float's largest: the shards here
// are fakes that do not check their own) is aborted before its commit, OUT_OF_RANGE: the
// caller's to change, not a step to retry. So is one whose update of the gate would overflow.
TEST(Trainer, AGateGradientThatIsNotFiniteAbortsTheStep) {
  TrainRig t(/*unconfirmed_commits=*/0);
  const int64_t n = 12;
  const std::vector<float> x = common::RandomMatrix(n, Config().d_model, 5);
  const std::vector<float> dy(n * Config().d_model, std::numeric_limits<float>::max());
  absl::StatusOr<TrainResult> r =
      t.trainer.Step(t.rig.table, t.rig.ck.gate, x.data(), dy.data(), n, TrainParams{0.25f},
                     common::MonotonicNow() + absl::Seconds(10));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kOutOfRange) << r.status();
  EXPECT_EQ(r.status().message().rfind("the gradient of the gate's weight is not finite", 0), 0u)
      << r.status();
  EXPECT_EQ(t.commits, 0);
  for (const auto& fake : t.rig.fakes) {
    ASSERT_FALSE(fake->finishes.empty()) << fake->address();
    EXPECT_FALSE(fake->finishes.back().commit) << fake->address();
  }
  // A finite gradient at a rate that takes the gate past float's range.
  std::vector<float> dy1 = common::RandomMatrix(n, Config().d_model, 6);
  for (float& v : dy1) v *= 1e4f;  // gradients in the tens, finite
  TrainParams huge{std::numeric_limits<float>::max()};
  r = t.trainer.Step(t.rig.table, t.rig.ck.gate, x.data(), dy1.data(), n, huge,
                     common::MonotonicNow() + absl::Seconds(10));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kOutOfRange) << r.status();
  EXPECT_EQ(r.status().message().rfind("the update of the gate's weight is not finite", 0), 0u)
      << r.status();
  EXPECT_EQ(t.commits, 0);
}

// The step's learning rate goes with each backward (the shard checks the update it would
// apply), and a coordinator's abort for a sum that is not finite (OUT_OF_RANGE, from a
// member's reduction) stays OUT_OF_RANGE: the same step sent again would be again, so
// moe-client does not retry it. Other aborts stay ABORTED.
TEST(Trainer, ACoordinatorsAbortForASumThatIsNotFiniteIsOutOfRange) {
  TrainRig t(/*unconfirmed_commits=*/0);
  t.abort_code = static_cast<int>(absl::StatusCode::kOutOfRange);
  absl::StatusOr<TrainResult> r = t.Step(5);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kOutOfRange) << r.status();
  EXPECT_NE(r.status().message().find("aborted, no weight changed: group 0 rank 1 (shard1): the "
                                      "update of expert 0"),
            std::string::npos)
      << r.status();
  bool backward = false;
  for (const auto& fake : t.rig.fakes) {
    std::lock_guard<std::mutex> lock(fake->backward_mu);
    for (float rate : fake->backward_rates) {
      backward = true;
      EXPECT_EQ(rate, 0.25f) << fake->address();
    }
  }
  EXPECT_TRUE(backward);
  t.abort_code = static_cast<int>(absl::StatusCode::kAborted);
  r = t.Step(7);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted) << r.status();
}

// A shard that holds no replica (here a dead one the placement has moved off) takes no part in
// a step: its commit is not asked of it. Until 2026-12-04 every shard of the table was sent the
// commit: a dead one left out of the placement failed it, and every later step and save was
// refused for good. A commit it did not confirm while it held replicas still holds back a
// switch that moves off it (it could be the source of a copy); once a table where it holds none
// is live, it has nothing left to confirm (a replica placed on it later is copied from one that
// has the update) and is dropped, not asked again.
TEST(Trainer, AShardThatHoldsNoReplicaTakesNoPartInASteps) {
  TrainRig t(/*unconfirmed_commits=*/1);  // the first commit: shard1 does not confirm
  t.rig.fakes[1]->finish_failures = 1000;
  ASSERT_TRUE(t.Step(5).ok());
  EXPECT_EQ(t.committed_on, (std::vector<std::string>{"shard0", "shard1", "shard2"}));
  ExpectShard1Unconfirmed(t.trainer.RetryConfirmations(t.rig.table));
  // shard1 dies; a placement without it (replicated over shards 0 and 2).
  t.rig.fakes[1]->healthy_ = false;
  RoutingTable moved = t.rig.table;
  moved.placement = *ComputePlacement(Strategy::kReplicated, 4, 2, std::vector<double>(4, 1.0));
  for (auto& where : moved.placement.replicas) {
    for (int& r : where) r = r == 1 ? 2 : r;
  }
  const absl::Status switching =
      t.trainer.RetryConfirmations(moved, /*drop_absent=*/false, &t.rig.table);
  EXPECT_NE(switching.message().find("shard shard1 has not confirmed step id"), std::string::npos)
      << switching;
  // Live, it drops the commit shard1 owes, and no step asks it again.
  const size_t asked = t.rig.fakes[1]->finishes.size();  // every FinishStep, failed or not
  const absl::Status clear = t.trainer.RetryConfirmations(moved);
  EXPECT_TRUE(clear.ok()) << clear;
  absl::StatusOr<TrainResult> second =
      t.trainer.Step(moved, t.rig.ck.gate, common::RandomMatrix(12, Config().d_model, 7).data(),
                     common::RandomMatrix(12, Config().d_model, 8).data(), 12, TrainParams{0.25f},
                     common::MonotonicNow() + absl::Seconds(10));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(t.committed_on, (std::vector<std::string>{"shard0", "shard2"}));
  EXPECT_EQ(t.rig.fakes[1]->finishes.size(), asked)
      << "a dead shard holding no replica was asked to confirm";
  EXPECT_TRUE(t.trainer.RetryConfirmations(t.rig.table, /*drop_absent=*/false, &moved).ok());
}

// The coordinator dies (or is cut off) after deciding, so the router's CommitStep fails: the
// stand-in sends FinishStep with `verdict` to the first `reached` shards, then fails the call.
struct LostVerdictRig {
  LostVerdictRig(int reached, bool verdict)
      : rig(Strategy::kReplicated, 3),
        trainer(
            Config(),
            [this, reached, verdict](const v1::CommitStepRequest& req)
                -> absl::StatusOr<v1::CommitStepResponse> {
              for (int s = 0; s < reached; ++s) {
                rig.fakes[s]
                    ->FinishStep(req.train_step(), verdict, req.learning_rate(), absl::Seconds(1))
                    .IgnoreError();
              }
              return absl::UnavailableError("coordinator: connection reset");
            },
            /*coordinator_grace=*/absl::Milliseconds(300)) {}
  // A step with a 1 s timeout: the coordinator's window closes 1.3 s after the commit was sent.
  absl::StatusOr<TrainResult> Step() {
    const int64_t n = 12;
    const std::vector<float> x = common::RandomMatrix(n, Config().d_model, 31);
    const std::vector<float> dy = common::RandomMatrix(n, Config().d_model, 32);
    return trainer.Step(rig.table, rig.ck.gate, x.data(), dy.data(), n, TrainParams{0.5f},
                        common::MonotonicNow() + absl::Seconds(1));
  }
  // A step aborted while shard0 could not be asked what it saw (it had applied the commit when
  // `reached` > 0): shard0 is left unsettled, and answers again afterwards.
  void AbortWhileShard0CannotBeAsked() {
    rig.fakes[0]->step_failures = 1000;
    EXPECT_EQ(Step().status().code(), absl::StatusCode::kAborted);
    rig.fakes[0]->step_failures = 0;
  }
  Rig rig;
  Trainer trainer;
};

TEST(Trainer, ACommitThatReachedOneShardBeforeTheVerdictWasLostIsFinishedEverywhere) {
  LostVerdictRig t(/*reached=*/1, /*verdict=*/true);
  absl::StatusOr<TrainResult> r = t.Step();
  ASSERT_TRUE(r.ok()) << r.status();  // committed: the caller updates the gate
  EXPECT_FALSE(r->gate_weight.empty());
  for (int s = 0; s < 3; ++s) {
    const auto& f = t.rig.fakes[s]->finishes;
    ASSERT_FALSE(f.empty()) << "shard " << s;
    for (const FakeShard::Finish& one : f) {
      EXPECT_EQ(one.step, r->step);
      EXPECT_TRUE(one.commit) << "shard " << s << " was told to abort a committed step";
      EXPECT_EQ(one.learning_rate, 0.5f);
    }
  }
  EXPECT_TRUE(t.trainer.RetryConfirmations(t.rig.table).ok()) << "every shard confirmed";
}

TEST(Trainer, AVerdictLostBeforeAnyShardSawItIsAbortedOnceTheCoordinatorsWindowHasPassed) {
  LostVerdictRig t(/*reached=*/0, /*verdict=*/true);
  const absl::Time start = common::MonotonicNow();
  absl::StatusOr<TrainResult> r = t.Step();
  const absl::Duration took = common::MonotonicNow() - start;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted);
  EXPECT_NE(r.status().message().find("no shard had committed it"), std::string::npos)
      << r.status();
  EXPECT_NE(r.status().message().find("connection reset"), std::string::npos) << r.status();
  // The coordinator could still have sent a commit until its window closed: the router waited.
  EXPECT_GE(took, absl::Seconds(1)) << "aborted while a commit could still arrive";
  for (int s = 0; s < 3; ++s) {
    ASSERT_EQ(t.rig.fakes[s]->finishes.size(), 1u) << "shard " << s;
    EXPECT_FALSE(t.rig.fakes[s]->finishes[0].commit);
    EXPECT_GT(t.rig.fakes[s]->step_queries, 1) << "shard " << s << " was asked once only";
  }
}

TEST(Trainer, ALostVerdictThatAShardSawAsAnAbortIsAbortedAtOnce) {
  LostVerdictRig t(/*reached=*/1, /*verdict=*/false);
  const absl::Time start = common::MonotonicNow();
  absl::StatusOr<TrainResult> r = t.Step();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted) << r.status();
  EXPECT_LT(common::MonotonicNow() - start, absl::Seconds(1))
      << "waited though the verdict was known";
  for (int s = 0; s < 3; ++s) {
    for (const FakeShard::Finish& f : t.rig.fakes[s]->finishes) EXPECT_FALSE(f.commit);
    EXPECT_FALSE(t.rig.fakes[s]->finishes.empty()) << "shard " << s << " kept the step";
  }
}

// The verdict is lost and a shard cannot be asked what it saw: the others saw nothing, so the
// step is aborted, but that shard may have applied a commit. It is settled before the next
// step: asked again until it answers; had it committed, its replicas are copied back from the
// others; had it not, it aborts the step.
TEST(Trainer, AnAbortWhileAShardCouldNotBeAskedIsSettledBeforeTheNextStep) {
  for (const bool committed : {true, false}) {
    SCOPED_TRACE(committed ? "the shard had committed" : "the shard had seen nothing");
    LostVerdictRig t(/*reached=*/committed ? 1 : 0, /*verdict=*/true);
    t.rig.fakes[0]->step_failures = 1000;  // cannot be asked
    absl::StatusOr<TrainResult> r = t.Step();
    EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted) << r.status();
    EXPECT_NE(r.status().message().find("shard0 could not be asked"), std::string::npos)
        << r.status();
    for (int s = 1; s < 3; ++s) {
      ASSERT_EQ(t.rig.fakes[s]->finishes.size(), 1u) << "shard " << s;
      EXPECT_FALSE(t.rig.fakes[s]->finishes[0].commit) << "shard " << s;
    }
    // Nothing starts while shard0 cannot answer.
    const absl::Status held = t.trainer.RetryConfirmations(t.rig.table);
    EXPECT_EQ(held.code(), absl::StatusCode::kUnavailable) << held;
    EXPECT_NE(held.message().find("shard0 could not be asked whether it had committed step"),
              std::string::npos)
        << held;
    t.rig.fakes[0]->step_failures = 0;
    const absl::Status settled = t.trainer.RetryConfirmations(t.rig.table);
    EXPECT_TRUE(settled.ok()) << settled;
    const auto& finishes = t.rig.fakes[0]->finishes;
    const auto& back = t.rig.fakes[0]->rollbacks;
    if (committed) {
      // Replicated: every expert has other replicas; all are given back their weights from one
      // of them, once the shard has finished applying the commit (a repeated commit waits for
      // that), replacing the newer ones.
      ASSERT_EQ(back.size(), 1u);
      EXPECT_EQ(back[0].first, (std::vector<int>{0, 1, 2, 3}));
      EXPECT_EQ(back[0].second, "shard1");
      ASSERT_EQ(finishes.size(), 3u);  // the coordinator's commit, the abort, the wait
      EXPECT_TRUE(finishes[2].commit);
    } else {
      EXPECT_TRUE(back.empty());
      ASSERT_EQ(finishes.size(), 2u);  // the abort of the step, then the settling one
      EXPECT_FALSE(finishes[1].commit);
    }
    EXPECT_TRUE(t.rig.fakes[0]->loads.empty()) << "a load keeps the newer weights";
    EXPECT_TRUE(t.rig.fakes[0]->trained.empty()) << "an expert kept the aborted update";
    EXPECT_TRUE(t.trainer.RetryConfirmations(t.rig.table).ok());
    EXPECT_EQ(back.size(), committed ? 1u : 0u) << "settled twice";
  }
}

// A shard that applied the commit, kept it in --state-dir and restarted before it could be
// asked no longer knows the step; its weights still carry the update, and are given back.
TEST(Trainer, AnUpdateKeptAcrossARestartIsGivenBackThoughTheShardForgotTheStep) {
  LostVerdictRig t(/*reached=*/1, /*verdict=*/true);
  t.AbortWhileShard0CannotBeAsked();
  ASSERT_FALSE(t.rig.fakes[0]->trained.empty());
  // The restart: the fake forgets every verdict but keeps its weights, and is still reading
  // one of them back: that one's step is not known, so nothing is settled yet.
  t.rig.fakes[0]->finishes.clear();
  t.rig.fakes[0]->loading = {2};
  const absl::Status reading = t.trainer.RetryConfirmations(t.rig.table);
  EXPECT_EQ(reading.code(), absl::StatusCode::kUnavailable) << reading;
  EXPECT_NE(reading.message().find("still loading expert 2"), std::string::npos) << reading;
  EXPECT_TRUE(t.rig.fakes[0]->rollbacks.empty());
  t.rig.fakes[0]->loading.clear();
  t.rig.fakes[0]->finishes.clear();
  EXPECT_TRUE(t.trainer.RetryConfirmations(t.rig.table).ok());
  ASSERT_EQ(t.rig.fakes[0]->rollbacks.size(), 1u);
  EXPECT_EQ(t.rig.fakes[0]->rollbacks[0].first, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_TRUE(t.rig.fakes[0]->trained.empty());
  ASSERT_EQ(t.rig.fakes[0]->finishes.size(), 1u);
  EXPECT_FALSE(t.rig.fakes[0]->finishes[0].commit) << "it was told to abort the step it forgot";
}

// Two shards that could not be asked had both applied the commit: neither is a source for the
// other's copy back, which comes from the shard that aborted.
TEST(Trainer, AnUnsettledShardIsNoSourceForAnothersCopyBack) {
  LostVerdictRig t(/*reached=*/2, /*verdict=*/true);
  t.rig.fakes[0]->step_failures = 1000;
  t.rig.fakes[1]->step_failures = 1000;
  EXPECT_EQ(t.Step().status().code(), absl::StatusCode::kAborted);
  t.rig.fakes[0]->step_failures = 0;
  t.rig.fakes[1]->step_failures = 0;
  const absl::Status settled = t.trainer.RetryConfirmations(t.rig.table);
  EXPECT_TRUE(settled.ok()) << settled;
  ASSERT_EQ(t.rig.fakes[0]->rollbacks.size(), 1u);
  EXPECT_EQ(t.rig.fakes[0]->rollbacks[0].second, "shard2");
  // shard1 is settled after shard0, which by then holds the weights from before the step.
  ASSERT_EQ(t.rig.fakes[1]->rollbacks.size(), 1u);
  EXPECT_EQ(t.rig.fakes[1]->rollbacks[0].second, "shard0");
  EXPECT_TRUE(t.rig.fakes[0]->trained.empty());
  EXPECT_TRUE(t.rig.fakes[1]->trained.empty());
}

// A replica that carries the aborted update itself (however it came by it) is no source for
// giving it back: the copy would give nothing back. With no replica from before the step, the
// shard stays unsettled and steps stay refused.
TEST(Trainer, AReplicaThatCarriesTheUpdateIsNoSourceForGivingItBack) {
  LostVerdictRig t(/*reached=*/1, /*verdict=*/true);
  t.AbortWhileShard0CannotBeAsked();
  ASSERT_FALSE(t.rig.fakes[0]->trained.empty());
  t.rig.fakes[1]->trained = t.rig.fakes[0]->trained;
  t.rig.fakes[2]->trained = t.rig.fakes[0]->trained;
  const absl::Status none = t.trainer.RetryConfirmations(t.rig.table);
  EXPECT_EQ(none.code(), absl::StatusCode::kUnavailable) << none;
  EXPECT_NE(none.message().find("no other replica can give its weights back"), std::string::npos)
      << none;
  EXPECT_TRUE(t.rig.fakes[0]->rollbacks.empty());
  // shard2 gets its weights from before the step back; shard1 still carries the update.
  t.rig.fakes[2]->trained.clear();
  const absl::Status settled = t.trainer.RetryConfirmations(t.rig.table);
  EXPECT_TRUE(settled.ok()) << settled;
  ASSERT_EQ(t.rig.fakes[0]->rollbacks.size(), 1u);
  EXPECT_EQ(t.rig.fakes[0]->rollbacks[0].second, "shard2");
  EXPECT_TRUE(t.rig.fakes[0]->trained.empty()) << "an expert kept the aborted update";
}

// A shard that took the loads of a switch that failed half-way holds that switch's placement
// version, above the table's, and refuses the table's. Giving an aborted update back changes no
// placement and carries version 0, which no shard refuses: with the table's version the shard
// stayed unsettled, and every step waited for it until it restarted.
TEST(Trainer, AnUpdateIsGivenBackToAShardAheadOfTheTablesPlacementVersion) {
  LostVerdictRig t(/*reached=*/1, /*verdict=*/true);
  t.AbortWhileShard0CannotBeAsked();
  ASSERT_FALSE(t.rig.fakes[0]->trained.empty());
  t.rig.fakes[0]->version = t.rig.table.placement.version + 5;  // the failed switch's
  const absl::Status settled = t.trainer.RetryConfirmations(t.rig.table);
  EXPECT_TRUE(settled.ok()) << settled;
  ASSERT_EQ(t.rig.fakes[0]->rollbacks.size(), 1u);
  EXPECT_TRUE(t.rig.fakes[0]->trained.empty()) << "an expert kept the aborted update";
  EXPECT_EQ(t.rig.fakes[0]->version, t.rig.table.placement.version + 5);
  absl::StatusOr<TrainResult> next = t.Step();  // its lost verdict reached shard0: committed
  EXPECT_TRUE(next.ok()) << "the next step still waits for the shard: " << next.status();
}

// A switch not yet applied does not settle: its table may not list what the shard holds.
TEST(Trainer, AnUnsettledAbortIsSettledAgainstTheLiveTableOnly) {
  LostVerdictRig t(/*reached=*/1, /*verdict=*/true);
  t.AbortWhileShard0CannotBeAsked();
  EXPECT_EQ(t.trainer.RetryConfirmations(t.rig.table, /*drop_absent=*/false).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_TRUE(t.rig.fakes[0]->rollbacks.empty());
  EXPECT_TRUE(t.trainer.RetryConfirmations(t.rig.table).ok());
  EXPECT_EQ(t.rig.fakes[0]->rollbacks.size(), 1u);
}

// The step of the last update each fake applied to each of its experts (all READY), as the
// router's stale check reads them from GetStatus.
std::vector<std::map<int, uint64_t>> StepsHeld(const Rig& rig) {
  std::vector<std::map<int, uint64_t>> at;
  for (const auto& fake : rig.fakes) {
    at.emplace_back();
    for (int e = 0; e < Config().num_experts; ++e) {
      at.back()[e] = fake->trained.count(e) ? fake->trained.at(e) : 0;
    }
  }
  return at;
}

// A shard that applied a lost commit and left the table before it could be asked about it
// comes back with replicas that carry the update every other shard aborted. Its replicas are
// at the latest step there is, so the stale check took them as the latest and copied the
// aborted update to every other replica. They are given back the others' weights instead, or
// copied from a later step once training has gone on without them.
TEST(Trainer, AShardThatLeftWithAnAbortUnsettledIsGivenBackTheOthersWeightsWhenItReturns) {
  LostVerdictRig t(/*reached=*/1, /*verdict=*/true);
  t.AbortWhileShard0CannotBeAsked();
  ASSERT_EQ(t.rig.fakes[0]->trained.size(), 4u);
  const uint64_t aborted = t.rig.fakes[0]->trained.at(0);
  EXPECT_TRUE(t.trainer.AbortedUpdate(aborted));
  EXPECT_FALSE(t.trainer.AbortedUpdate(aborted + 1));
  EXPECT_FALSE(t.trainer.AbortedUpdate(0));
  // It leaves the table, unsettled, and is forgotten there.
  RoutingTable without = t.rig.table;
  without.shards.erase(without.shards.begin());
  without.placement = *ComputePlacement(Strategy::kReplicated, 4, 2, std::vector<double>(4, 1.0));
  t.trainer.DropUnconfirmedOutside(without);
  EXPECT_TRUE(t.trainer.RetryConfirmations(without).ok());
  // Back in the table, holding what it held.
  auto is_aborted = [&](uint64_t step) { return t.trainer.AbortedUpdate(step); };
  std::map<int, uint64_t> reached;
  StalePlan plan = PlanStaleReplicas(t.rig.table.placement, StepsHeld(t.rig), is_aborted, &reached);
  for (int s = 0; s < 3; ++s) {
    EXPECT_TRUE(plan.copy[s].empty()) << "shard " << s << " would be copied the update";
  }
  EXPECT_EQ(plan.give_back[0], (std::map<int, std::vector<int>>{{1, {0, 1, 2, 3}}}));
  EXPECT_TRUE(plan.lost.empty());
  for (int e = 0; e < 4; ++e) EXPECT_EQ(reached[e], 0u) << "expert " << e;
  // Carried out: given back from shard1 with RollBackExperts (LoadExperts keeps newer weights),
  // at version 0 (the shard may hold a failed switch's later version), and nothing else is
  // copied.
  t.rig.fakes[0]->version = t.rig.table.placement.version + 5;
  int done = 0;
  const absl::Status carried =
      CarryOutStalePlan(t.rig.table, plan, t.rig.table.placement.version, absl::Seconds(1), &done);
  EXPECT_TRUE(carried.ok()) << carried;
  EXPECT_EQ(done, 4);
  ASSERT_EQ(t.rig.fakes[0]->rollbacks.size(), 1u);
  EXPECT_EQ(t.rig.fakes[0]->rollbacks[0].second, "shard1");
  EXPECT_TRUE(t.rig.fakes[0]->trained.empty()) << "an expert kept the aborted update";
  for (const auto& fake : t.rig.fakes) {
    EXPECT_TRUE(fake->loads.empty()) << fake->address();
    EXPECT_TRUE(fake->trained.empty()) << fake->address() << " carries the aborted update";
  }
  plan = PlanStaleReplicas(t.rig.table.placement, StepsHeld(t.rig), is_aborted, &reached);
  for (int s = 0; s < 3; ++s) {
    EXPECT_TRUE(plan.copy[s].empty() && plan.give_back[s].empty()) << "copied twice: " << s;
  }
  t.rig.fakes[0]->trained = {{0, aborted}, {1, aborted}, {2, aborted}, {3, aborted}};
  // Training went on without it: its replicas are simply behind, and copied from a later step.
  for (int s = 1; s < 3; ++s) {
    for (int e = 0; e < 4; ++e) t.rig.fakes[s]->trained[e] = aborted + 7;
  }
  plan = PlanStaleReplicas(t.rig.table.placement, StepsHeld(t.rig), is_aborted, &reached);
  EXPECT_TRUE(plan.give_back[0].empty());
  EXPECT_EQ(plan.copy[0], (std::map<int, std::vector<int>>{{1, {0, 1, 2, 3}}}));
  for (int e = 0; e < 4; ++e) EXPECT_EQ(reached[e], aborted + 7) << "expert " << e;
  // A copy carries the router's latest version, which is at least the failed switch's.
  done = 0;
  const absl::Status copied = CarryOutStalePlan(
      t.rig.table, plan, t.rig.table.placement.version + 5, absl::Seconds(1), &done);
  EXPECT_TRUE(copied.ok()) << copied;
  ASSERT_EQ(t.rig.fakes[0]->loads.size(), 1u);
  EXPECT_EQ(t.rig.fakes[0]->loads[0],
            (std::pair<std::vector<int>, std::string>{{0, 1, 2, 3}, "shard1"}));
}

// Where the replicas without the aborted update are behind the training the expert reached
// (they restarted while the shard with the update was away), giving theirs back would lose
// that training: the replica with the update is the latest then, and the expert keeps it, as
// one whose only replica carries it does.
TEST(PlanStaleReplicas, AnAbortedUpdateIsKeptRatherThanTheTrainingLost) {
  Placement p;
  p.replicas = {{0, 1}, {1}};
  const uint64_t aborted = 50;
  std::vector<std::map<int, uint64_t>> at(2);
  at[0] = {{0, 0}};  // restarted with the checkpoint's weights
  at[1] = {{0, aborted}, {1, aborted}};
  std::map<int, uint64_t> reached = {{0, 40}, {1, 40}};
  StalePlan plan = PlanStaleReplicas(
      p, at, [&](uint64_t step) { return step == aborted; }, &reached);
  EXPECT_TRUE(plan.lost.empty());
  for (const auto& back : plan.give_back) EXPECT_TRUE(back.empty());
  EXPECT_EQ(plan.copy[0], (std::map<int, std::vector<int>>{{1, {0}}}));
  EXPECT_TRUE(plan.copy[1].empty());
  // Expert 1's only replica carries the update: nothing to copy, and its step is not reached.
  EXPECT_EQ(reached[1], 40u);
  // With the training reached no later than what the others hold, the update is given back.
  reached = {{0, 0}};
  plan = PlanStaleReplicas(
      p, at, [&](uint64_t step) { return step == aborted; }, &reached);
  EXPECT_EQ(plan.give_back[1], (std::map<int, std::vector<int>>{{0, {0}}}));
  EXPECT_TRUE(plan.copy[0].empty());
}

// The stale check's plan, step by step: older replicas are copied from the latest; an expert
// whose every replica is behind the step it reached is reported lost once; one whose only
// replica read carries an aborted update keeps it; a replica not read is neither a source
// nor a target.
TEST(PlanStaleReplicas, CopiesOlderReplicasReportsLostTrainingOnceAndSkipsAbortedUpdates) {
  Placement p;
  p.replicas = {{0, 1}, {0, 1, 2}, {2}, {1, 2}};
  std::vector<std::map<int, uint64_t>> at(3);
  at[0] = {{0, 5}, {1, 9}};
  at[1] = {{0, 5}, {1, 4}, {3, 20}};  // expert 3 at an aborted step
  at[2] = {{2, 3}};                   // expert 1 not read; expert 3 not read either
  std::map<int, uint64_t> reached = {{0, 8}, {2, 3}};
  auto aborted = [](uint64_t step) { return step == 20; };
  StalePlan plan = PlanStaleReplicas(p, at, aborted, &reached);
  // Expert 0: both replicas at 5, behind the 8 it reached: lost, and where it stands now.
  ASSERT_EQ(plan.lost.size(), 1u);
  EXPECT_EQ(plan.lost[0], (std::pair<int, uint64_t>{0, 5}));
  EXPECT_EQ(reached[0], 5u);
  // Expert 1: shard 1 behind shard 0; shard 2 not read (and so no loss either way).
  EXPECT_EQ(plan.copy[1], (std::map<int, std::vector<int>>{{0, {1}}}));
  EXPECT_EQ(reached[1], 9u);
  EXPECT_TRUE(plan.copy[0].empty());
  EXPECT_TRUE(plan.copy[2].empty());
  // Expert 3: its only replica read carries an aborted update: left as it is, and its step is
  // not taken as reached.
  for (const auto& back : plan.give_back) EXPECT_TRUE(back.empty());
  EXPECT_EQ(reached.count(3) ? reached[3] : 0u, 0u);
  // Reported once.
  plan = PlanStaleReplicas(p, at, aborted, &reached);
  EXPECT_TRUE(plan.lost.empty());
}

// A replica outside the placement trained past the placement's replicas of its expert (another
// router trained it there) is their source; one that is older, untrained, or carries an aborted
// update is not; and it is never a target.
TEST(PlanStaleReplicas, TakesAReplicaOutsideThePlacementTrainedPastItsReplicas) {
  Placement p;
  p.replicas = {{0}, {0, 1}, {1}, {1}};
  const uint64_t aborted = 70;
  std::vector<std::map<int, uint64_t>> at(3);
  at[0] = {{0, 5}, {1, 5}};
  at[1] = {{1, 5}, {2, 5}, {3, 0}};
  at[2] = {{0, 9}, {1, 3}, {2, aborted}, {3, 0}};  // shard 2 is in no expert's placement
  std::map<int, uint64_t> reached;
  StalePlan plan = PlanStaleReplicas(
      p, at, [&](uint64_t step) { return step == aborted; }, &reached);
  // Expert 0: shard 2's replica, at 9, is its latest; expert 1: shard 2's is older; expert 2:
  // shard 2's carries an aborted update; expert 3: shard 2's is untrained.
  EXPECT_EQ(plan.copy[0], (std::map<int, std::vector<int>>{{2, {0}}}));
  EXPECT_TRUE(plan.copy[1].empty());
  EXPECT_TRUE(plan.copy[2].empty());
  for (const auto& back : plan.give_back) EXPECT_TRUE(back.empty());
  EXPECT_TRUE(plan.lost.empty());
  EXPECT_EQ(reached[0], 9u);
  EXPECT_EQ(reached[1], 5u);
  EXPECT_EQ(reached[2], 5u);
}

}  // namespace
}  // namespace moe::router
