#include "expert_server/shard_server.h"

#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <set>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "expert_server/state_dir.h"
#include "moe/v1/coordinator.grpc.pb.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "services/collective/grpc_transport.h"
#include "services/collective/ring_allreduce.h"
#include "services/common/checkpoint.h"
#include "services/common/clock.h"
#include "services/common/expert_copy.h"
#include "services/common/failpoint.h"
#include "services/common/flags.h"
#include "services/common/grpc_status.h"
#include "services/common/log.h"
#include "services/common/notification.h"
#include "services/common/security.h"
#include "services/common/status_macros.h"
#include "services/common/stream_outbox.h"
#include "services/common/tensor_codec.h"
#include "services/common/thread_pool.h"

namespace moe::expert {
namespace {

constexpr size_t kChunkBytes = 1 << 20;
// The longest a ReduceGradients ring may run, whatever its caller asks: shutdown never waits
// longer on a stuck ring.
constexpr absl::Duration kMaxRingTime = absl::Seconds(120);
// How long a Drain waits before it trusts that no Dispatch stream is open: routers check a
// shard's health every 250 ms, and one that still needs the shard opens a stream on seeing
// NOT_SERVING (router/grpc_shard_client.cc, HealthLoop).
constexpr std::chrono::milliseconds kRoutersNotice{1000};

v1::ExpertStatus::State ToProto(ExpertState s) {
  switch (s) {
    case ExpertState::kLoading: return v1::ExpertStatus::LOADING;
    case ExpertState::kReady: return v1::ExpertStatus::READY;
    case ExpertState::kDraining: return v1::ExpertStatus::DRAINING;
    case ExpertState::kFailed: return v1::ExpertStatus::FAILED;
  }
  return v1::ExpertStatus::STATE_UNSPECIFIED;
}

const char* ReasonFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kFailedPrecondition: return "not_loaded";
    case absl::StatusCode::kResourceExhausted: return "too_large";
    case absl::StatusCode::kUnavailable: return "shutdown";
    default: return "invalid";
  }
}

// Copies expert `e`'s current weights, and the step they are at, from the shard at `peer`
// through ExportExpert.
absl::StatusOr<LoadedExpert> CopyFromPeer(const common::ModelConfig& config,
                                          const common::RpcLimits& limits,
                                          const std::string& peer, int e) {
  auto channel = grpc::CreateCustomChannel(peer, common::ChannelCredentials(),
                                           common::ClientChannelArgs(limits));
  auto stub = v1::ExpertShard::NewStub(channel);
  grpc::ClientContext ctx;
  // Fail fast when the peer cannot be reached (not wait_for_ready): the router picked it as a
  // live replica, and one that just died must not hold this load, and the router's placement
  // switch waiting on it, until the deadline. A peer that stalls mid-copy is cut off by the
  // channel's keepalive.
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::ExportExpertRequest req;
  req.set_expert(e);
  auto reader = stub->ExportExpert(&ctx, req);
  // The largest copy an expert of `config` makes: a gated one with every bias, and the
  // safetensors header.
  common::ExpertCopy copy(4 * (3 * static_cast<uint64_t>(config.d_ff) * config.d_model +
                               2 * static_cast<uint64_t>(config.d_ff) + config.d_model) +
                          (uint64_t{64} << 10));
  v1::ExpertChunk chunk;
  while (reader->Read(&chunk)) {
    absl::Status added = copy.Add(chunk);
    if (!added.ok()) {
      ctx.TryCancel();
      reader->Finish();
      return absl::DataLossError(
          absl::StrCat("expert ", e, " from ", peer, ": ", added.message()));
    }
  }
  grpc::Status st = reader->Finish();
  if (!st.ok()) {
    absl::Status s = common::FromGrpcStatus(st);
    return absl::Status(s.code(), absl::StrCat("copying expert ", e, " from ", peer, ": ",
                                               s.message()));
  }
  absl::Status complete = copy.Complete();
  if (!complete.ok()) {
    return absl::DataLossError(
        absl::StrCat("expert ", e, " from ", peer, ": ", complete.message()));
  }
  const std::string& bytes = copy.bytes;
  const uint64_t trained_step = copy.trained_step;
  ASSIGN_OR_RETURN(common::ExpertWeights w, common::ParseExpert(bytes, config, e));
  return LoadedExpert{std::move(w), trained_step};
}

}  // namespace

class DispatchReactor;

// What a Dispatch stream shares with the tasks it submitted; outlives the reactor.
struct StreamCore : common::StreamOutbox<v1::DispatchRequest, v1::DispatchResponse> {
  std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false);
  // The batches submitted and not yet answered, by id (mu), for their cancellations.
  std::map<uint64_t, std::weak_ptr<DispatchTask>> submitted;

  // Queues a response (from any thread); `accepted` marks the answer to a submitted batch.
  void Deliver(std::unique_ptr<v1::DispatchResponse> response, bool accepted) {
    std::lock_guard<std::mutex> lock(mu);
    if (accepted) {
      --pending;
      submitted.erase(response->batch_id());
    }
    PushLocked(std::move(response));
  }

  // DispatchRequest.cancel: what of the batch is still queued is dropped (the pool answers it).
  void CancelBatch(uint64_t batch_id) {
    std::shared_ptr<DispatchTask> task;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = submitted.find(batch_id);
      if (it != submitted.end()) task = it->second.lock();
    }
    if (task != nullptr) task->batch_cancelled.store(true);
  }
};

class ShardServer::Impl final : public v1::ExpertShard::CallbackService {
 public:
  ShardServerOptions options;
  common::ModelConfig config;
  std::unique_ptr<common::SafetensorsReader> checkpoint;
  std::string model_fingerprint;  // of `checkpoint` (ShardStatus.model_fingerprint)
  std::shared_ptr<prometheus::Registry> registry;
  std::unique_ptr<ShardMetrics> metrics;
  std::unique_ptr<StateDir> state;  // before `store`: the store's threads write to it
  std::unique_ptr<ExpertStore> store;
  std::unique_ptr<ComputePool> pool;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<common::MetricsEndpoint> metrics_endpoint;
  int port = 0;

  common::Notification initial_loaded;
  absl::Status initial_status;

  std::thread heartbeat;
  std::mutex hb_mu;
  std::condition_variable hb_cv;
  bool hb_stop = false;
  // Registers with the coordinator and keeps the lease (re-registering when it forgot us).
  void HeartbeatLoop() {
    auto stub = v1::Coordinator::NewStub(grpc::CreateCustomChannel(
        options.coordinator, common::ChannelCredentials(),
        common::ClientChannelArgs(options.limits)));
    const std::string self = options.advertise_address.empty()
                                 ? absl::StrCat("127.0.0.1:", port)
                                 : options.advertise_address;
    bool registered = false;
    bool trouble = false;  // Register failed: said once until one succeeds
    std::chrono::milliseconds period(300);
    std::unique_lock<std::mutex> lock(hb_mu);
    while (!hb_stop) {
      lock.unlock();
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
      if (!registered) {
        v1::RegisterRequest req;
        req.set_address(self);
        v1::RegisterResponse resp;
        const grpc::Status st = stub->Register(&ctx, req, &resp);
        if (st.ok()) {
          registered = true;
          period = std::chrono::milliseconds(std::max<int64_t>(100, resp.lease_ms() / 4));
          if (trouble) {
            common::Log("moe-expert-server: registered with coordinator %s as %s\n",
                        options.coordinator.c_str(), self.c_str());
            trouble = false;
          }
        } else if (!trouble) {
          trouble = true;
          common::Log(
              "moe-expert-server: cannot register with coordinator %s (%s); check that "
              "it runs and that --coordinator names it (tried again until it answers)\n",
              options.coordinator.c_str(), st.error_message().c_str());
        }
      } else {
        v1::HeartbeatRequest req;
        req.set_address(self);
        v1::HeartbeatResponse resp;
        grpc::Status st = stub->Heartbeat(&ctx, req, &resp);
        if (!st.ok() || !resp.known()) registered = false;
      }
      lock.lock();
      hb_cv.wait_for(lock, period, [this] { return hb_stop; });
    }
  }

  std::mutex mu;
  std::set<std::shared_ptr<StreamCore>> streams;
  std::condition_variable streams_cv;  // a stream ended, a drain was undone, or shutting down
  bool serving = false;
  bool draining = false;  // Drain was called (and not undone): NOT_SERVING
  uint64_t undos = 0;     // drains taken back: a Drain still waiting sees its drain undone
  bool shutting_down = false;
  // One per Drain call still waiting for streams. A finished one is joined by the next Drain, the
  // rest by DoShutdown, so the threads are as many as the calls waiting.
  struct DrainWaiter {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::vector<DrainWaiter> drain_waiters;
  std::once_flag shutdown_once;

  grpc::ServerBidiReactor<v1::DispatchRequest, v1::DispatchResponse>* Dispatch(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* LoadExperts(grpc::CallbackServerContext* ctx,
                                        const v1::LoadExpertsRequest* req,
                                        v1::ShardStatus* resp) override;
  grpc::ServerUnaryReactor* UnloadExperts(grpc::CallbackServerContext* ctx,
                                          const v1::UnloadExpertsRequest* req,
                                          v1::ShardStatus* resp) override;
  grpc::ServerWriteReactor<v1::ExpertChunk>* ExportExpert(
      grpc::CallbackServerContext* ctx, const v1::ExportExpertRequest* req) override;
  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* ctx,
                                      const v1::GetShardStatusRequest* req,
                                      v1::ShardStatus* resp) override;
  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* ctx, const v1::DrainRequest* req,
                                  v1::DrainResponse* resp) override;
  grpc::ServerUnaryReactor* Backward(grpc::CallbackServerContext* ctx,
                                     const v1::BackwardRequest* req,
                                     v1::BackwardResponse* resp) override;
  grpc::ServerUnaryReactor* FinishStep(grpc::CallbackServerContext* ctx,
                                       const v1::FinishStepRequest* req,
                                       v1::FinishStepResponse* resp) override;
  grpc::ServerUnaryReactor* GetStep(grpc::CallbackServerContext* ctx,
                                    const v1::GetStepRequest* req,
                                    v1::StepOutcome* resp) override;

  // ---- training state: per step, the kept forwards and the accumulated gradients ----
  struct CachedForward {
    std::vector<float> input;
    std::shared_ptr<ForwardCache> cache;
  };
  struct StepState {
    std::map<std::pair<uint64_t, int>, CachedForward> forwards;  // (batch, expert)
    std::map<int, common::ExpertWeights> grads;
    bool failed = false;  // a reduction failed: only an abort may end the step
    bool commit_seen = false;  // a commit arrived and is applied in part (the rest on a repeat)
    // The step's reductions under way here, (group, generation): an abort breaks them.
    std::vector<std::pair<std::string, uint64_t>> rings;
    std::chrono::steady_clock::time_point opened;
  };
  std::mutex train_mu;
  std::map<uint64_t, StepState> steps;
  // ReduceGradients calls under way (each on a thread of its own), and whether shutdown has
  // closed the door to new ones; shutdown breaks their rings and waits for their answers.
  int running_reductions = 0;
  bool reductions_closed = false;
  std::condition_variable reductions_cv;
  // Steps already finished (the most recent ones), with the verdict that ended them (the first
  // one: nothing is applied after a step ends): late forwards of them are not kept, and GetStep
  // reports the verdict.
  enum class Verdict { kCommit, kAbort, kDropped };
  std::map<uint64_t, Verdict> finished_steps;
  std::deque<uint64_t> finished_order;
  void MarkFinishedLocked(uint64_t step, Verdict verdict) {
    if (finished_steps.emplace(step, verdict).second) finished_order.push_back(step);
    while (finished_order.size() > 4096) {
      finished_steps.erase(finished_order.front());
      finished_order.pop_front();
    }
  }
  // The state of `step`, opened now if new; opening one drops every step older than step_ttl.
  StepState& OpenStepLocked(uint64_t step) {
    auto [it, fresh] = steps.try_emplace(step);
    if (!fresh) return it->second;
    const auto now = std::chrono::steady_clock::now();
    it->second.opened = now;
    for (auto s = steps.begin(); s != steps.end();) {
      if (now - s->second.opened > absl::ToChronoNanoseconds(options.step_ttl)) {
        MarkFinishedLocked(s->first, Verdict::kDropped);
        s = steps.erase(s);
      } else {
        ++s;
      }
    }
    return it->second;
  }
  std::unique_ptr<common::ThreadPool> train_pool;

  absl::Status RunBackward(const v1::BackwardRequest& req, v1::BackwardResponse* resp);
  absl::Status RunReduce(const v1::ReduceGradientsRequest& req, v1::ReduceGradientsResponse* resp);
  grpc::ServerUnaryReactor* ReduceGradients(grpc::CallbackServerContext* ctx,
                                            const v1::ReduceGradientsRequest* req,
                                            v1::ReduceGradientsResponse* resp) override;
  // A mailbox unclaimed for longer than any ring may run (kMaxRingTime) belongs to a ring its
  // peers have given up on: this shard's part never ran. Dropped then.
  collective::CollectiveHub hub{kMaxRingTime + absl::Seconds(30)};
  std::unique_ptr<collective::CollectiveService> collective_service;
  absl::StatusOr<std::vector<int>> RunFinishStep(const v1::FinishStepRequest& req);
  // SGD on `expert` for training step `step`: weights -= learning_rate * grad.
  absl::Status ApplyUpdate(int expert, const common::ExpertWeights& grad, float learning_rate,
                           uint64_t step);
  // Steps whose update a FinishStep is applying now (train_mu); finish_cv signals the end.
  std::set<uint64_t> applying_steps;
  std::condition_variable finish_cv;

  void FillStatus(v1::ShardStatus* s) const;
  void SetServing(bool serving);
  // Whether the shard may serve: it holds experts and loads none (not while a load runs: a
  // placement going live would send rows to an expert still loading).
  bool Settled() const { return store->ready_count() > 0 && store->loading_count() == 0; }
  void OnStoreChange();
  void DoShutdown(absl::Duration grace);
};

class DispatchReactor final
    : public grpc::ServerBidiReactor<v1::DispatchRequest, v1::DispatchResponse> {
 public:
  DispatchReactor(ShardServer::Impl* impl, grpc::CallbackServerContext* ctx)
      : impl_(impl), ctx_(ctx), core_(std::make_shared<StreamCore>()) {
    core_->reactor = this;
    bool refuse = false;
    {
      std::lock_guard<std::mutex> lock(impl_->mu);
      refuse = impl_->shutting_down;
      if (!refuse) impl_->streams.insert(core_);
    }
    if (refuse) {
      core_->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shard is shutting down"));
      return;
    }
    // The router's fingerprint of its model (a router older than the key sends none).
    const auto sent = ctx->client_metadata().find(common::kModelFingerprintKey);
    if (sent != ctx->client_metadata().end()) {
      const std::string theirs(sent->second.data(), sent->second.size());
      if (common::OtherWeights(theirs, impl_->model_fingerprint)) routers_model_ = theirs;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      core_->ReadsDone();
      return;
    }
    Handle(request_);
    std::lock_guard<std::mutex> lock(core_->mu);
    if (!core_->finished) StartRead(&request_);
  }

  void OnWriteDone(bool ok) override { core_->WriteDone(ok); }

  void OnCancel() override {
    core_->cancelled->store(true);
    core_->End(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the caller"));
  }

  void OnDone() override {
    core_->cancelled->store(true);
    core_->Detach();
    {
      std::lock_guard<std::mutex> lock(impl_->mu);
      impl_->streams.erase(core_);
    }
    impl_->streams_cv.notify_all();
    delete this;
  }

 private:
  void Reject(uint64_t batch_id, const absl::Status& st, const char* reason,
              const std::vector<int>& missing = {}) {
    impl_->metrics->Rejected(reason);
    auto r = std::make_unique<v1::DispatchResponse>();
    r->set_batch_id(batch_id);
    r->set_code(static_cast<int>(st.code()));
    r->set_message(std::string(st.message()));
    r->set_placement_version(impl_->store->placement_version());
    for (int e : missing) r->add_missing_experts(e);
    core_->Deliver(std::move(r), false);
  }

  void Handle(const v1::DispatchRequest& req) {
    impl_->metrics->BytesIn(static_cast<double>(req.ByteSizeLong()));
    const uint64_t id = req.batch_id();
    if (req.cancel()) {
      core_->CancelBatch(id);
      return;
    }
    const int64_t d = impl_->config.d_model;
    const int64_t max_rows = impl_->options.max_batch_rows;
    if (req.experts_size() == 0) {
      Reject(id, absl::InvalidArgumentError(absl::StrCat(
                     "batch ", id, " is empty: it assigns no rows to any expert")),
             "invalid");
      return;
    }
    // Before the rows are read: a router of another model sends rows of another width, which
    // is no bad input of its client's but a shard in the wrong place.
    const int64_t width = req.rows().shape_size() == 2 ? req.rows().shape(1) : d;
    if (req.num_experts() != 0 && (req.num_experts() != impl_->config.num_experts || width != d)) {
      Reject(id, absl::FailedPreconditionError(absl::StrCat(
                     "batch ", id, " is for a model of ", req.num_experts(),
                     " experts of d_model ", width, "; this shard serves ",
                     impl_->config.num_experts, " of d_model ", d,
                     ": start it from the router's checkpoint")),
             "other_model");
      return;
    }
    // Of the same shape, but another model's weights (a shard restarted at its address from
    // another checkpoint): every answer would be a wrong number. The router sends the batch to
    // another replica, and leaves this shard out once it has read its status.
    if (!routers_model_.empty()) {
      Reject(id,
             absl::FailedPreconditionError(
                 absl::StrCat("batch ", id, " is for a model of other weights (the router's ",
                              routers_model_, ", this shard's ", impl_->model_fingerprint,
                              "): start it from the router's checkpoint")),
             "other_model");
      return;
    }
    common::DecodeLimits limits;
    limits.max_rank = 2;
    limits.max_elements = max_rows * d;
    absl::StatusOr<common::TensorView> view =
        common::DecodeMatrix(req.rows(), absl::StrCat("batch ", id, " rows"), d, limits);
    if (!view.ok()) {
      Reject(id, view.status(),
             view.status().code() == absl::StatusCode::kResourceExhausted ? "too_large"
                                                                           : "invalid");
      return;
    }
    const int64_t num_rows = view->dim(0);
    if (num_rows == 0) {
      Reject(id, absl::InvalidArgumentError(absl::StrCat("batch ", id, " is empty: 0 rows")),
             "invalid");
      return;
    }
    int64_t assigned = 0;
    for (const v1::ExpertRows& er : req.experts()) assigned += er.rows_size();
    if (assigned > max_rows) {
      Reject(id, absl::ResourceExhaustedError(absl::StrCat(
                     "batch ", id, " assigns ", assigned, " rows, more than the shard's limit of ",
                     max_rows, " per batch; split it")),
             "too_large");
      return;
    }
    // Refuse what cannot be queued before allocating anything for it.
    if (!impl_->pool->HasRoom(assigned)) {
      Reject(id, absl::ResourceExhaustedError(absl::StrCat(
                     "batch ", id, ": shard queue is full (", impl_->pool->queued_rows(),
                     " rows queued, the batch has ", assigned, "); retry later")),
             "queue_full");
      return;
    }
    auto task = std::make_shared<DispatchTask>();
    task->batch_id = id;
    std::set<int> seen;
    // Experts of the batch this shard does not hold (a router routing on an older placement):
    // the batch is refused naming every one, so that the router sends their rows elsewhere and
    // the rest back here, instead of taking this shard out for the whole request.
    std::vector<int> missing;
    absl::Status first_missing;
    for (const v1::ExpertRows& er : req.experts()) {
      if (!seen.insert(er.expert()).second) {
        Reject(id, absl::InvalidArgumentError(absl::StrCat(
                       "batch ", id, " lists expert ", er.expert(), " twice")),
               "invalid");
        return;
      }
      for (int32_t r : er.rows()) {
        if (r < 0 || r >= num_rows) {
          Reject(id, absl::InvalidArgumentError(absl::StrCat(
                         "batch ", id, " expert ", er.expert(), ": row index ", r,
                         " is out of range [0, ", num_rows, ")")),
                 "invalid");
          return;
        }
      }
      absl::StatusOr<ExpertLease> lease = impl_->store->Acquire(er.expert(), er.rows_size());
      if (absl::IsFailedPrecondition(lease.status())) {
        if (missing.empty()) first_missing = lease.status();
        missing.push_back(er.expert());
        continue;
      }
      if (!lease.ok()) {
        Reject(id, absl::Status(lease.status().code(),
                                absl::StrCat("batch ", id, ": ", lease.status().message())),
               ReasonFor(lease.status().code()));
        return;
      }
      DispatchTask::Part part;
      part.expert = er.expert();
      part.lease = std::move(*lease);
      part.row_index.assign(er.rows().begin(), er.rows().end());
      task->parts.push_back(std::move(part));
    }
    if (!missing.empty()) {
      const std::string more =
          missing.size() == 1
              ? ""
              : absl::StrCat("; the batch's experts not held here: ", absl::StrJoin(missing, ", "));
      Reject(id,
             absl::FailedPreconditionError(
                 absl::StrCat("batch ", id, ": ", first_missing.message(), more)),
             ReasonFor(absl::StatusCode::kFailedPrecondition), missing);
      return;
    }
    task->num_rows = num_rows;
    task->rows.resize(static_cast<size_t>(num_rows * d));
    common::ViewToFloat(*view, task->rows.data());
    absl::Time deadline = common::FromWallDeadline(ctx_->deadline());
    if (req.timeout_ms() > 0) {
      deadline = std::min(deadline, common::MonotonicNow() + absl::Milliseconds(req.timeout_ms()));
    }
    task->deadline = deadline;
    task->train_step = req.train_step();
    task->cancelled = core_->cancelled;
    const common::WireType out_type = req.output_dtype() == v1::BFLOAT16
                                          ? common::WireType::kBFloat16
                                          : common::WireType::kFloat32;
    ShardServer::Impl* impl = impl_;
    std::weak_ptr<StreamCore> weak = core_;
    task->done = [impl, weak, out_type, d](DispatchTask& t, const absl::Status& st) {
      std::shared_ptr<StreamCore> core = weak.lock();
      auto r = std::make_unique<v1::DispatchResponse>();
      r->set_batch_id(t.batch_id);
      r->set_placement_version(impl->store->placement_version());
      if (st.ok() && t.train_step != 0) {
        std::lock_guard<std::mutex> lock(impl->train_mu);
        if (!impl->finished_steps.count(t.train_step)) {
          auto& step = impl->OpenStepLocked(t.train_step);
          for (DispatchTask::Part& p : t.parts) {
            if (p.cache == nullptr) continue;  // no rows for this expert
            step.forwards[{t.batch_id, p.expert}] =
                ShardServer::Impl::CachedForward{std::move(p.input), std::move(p.cache)};
          }
        }
      }
      if (st.ok()) {
        for (DispatchTask::Part& p : t.parts) {
          v1::ExpertOutput* o = r->add_outputs();
          o->set_expert(p.expert);
          common::EncodeTensor(p.output, {static_cast<int64_t>(p.row_index.size()), d},
                               out_type, o->mutable_output());
        }
      } else {
        r->set_code(static_cast<int>(st.code()));
        r->set_message(std::string(st.message()));
      }
      impl->metrics->BytesOut(static_cast<double>(r->ByteSizeLong()));
      // On success every part is done: release the experts before answering, so a drained expert
      // can go. On error another worker may still be computing a part; the leases go with the
      // task once its last queued item is dropped.
      if (st.ok()) t.parts.clear();
      if (core) core->Deliver(std::move(r), true);
    };
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      ++core_->pending;
      core_->submitted[id] = task;
    }
    absl::Status st = impl_->pool->Submit(task);
    if (!st.ok()) {
      {
        std::lock_guard<std::mutex> lock(core_->mu);
        --core_->pending;
        core_->submitted.erase(id);
      }
      Reject(id, absl::Status(st.code(), absl::StrCat("batch ", id, ": ", st.message())),
             st.code() == absl::StatusCode::kResourceExhausted ? "queue_full" : "shutdown");
    }
  }

  ShardServer::Impl* impl_;
  grpc::CallbackServerContext* ctx_;
  std::shared_ptr<StreamCore> core_;
  v1::DispatchRequest request_;
  // The router's model fingerprint when it differs from this shard's ("" when the same, or not
  // sent): every batch is refused.
  std::string routers_model_;
};

grpc::ServerBidiReactor<v1::DispatchRequest, v1::DispatchResponse>* ShardServer::Impl::Dispatch(
    grpc::CallbackServerContext* ctx) {
  return new DispatchReactor(this, ctx);
}

void ShardServer::Impl::FillStatus(v1::ShardStatus* s) const {
  for (const ExpertInfo& info : store->Snapshot()) {
    v1::ExpertStatus* e = s->add_experts();
    e->set_expert(info.expert);
    e->set_state(ToProto(info.state));
    e->set_error(info.error);
    e->set_in_flight_rows(info.in_flight_rows);
    e->set_trained_step(info.trained_step);
  }
  s->set_queue_rows(pool->queued_rows());
  s->set_queue_batches(pool->queued_batches());
  s->set_placement_version(store->placement_version());
  s->set_lease_epoch(store->lease_epoch());
  s->set_threads(pool->threads());
  s->set_num_experts(config.num_experts);
  s->set_d_model(config.d_model);
  s->set_d_ff(config.d_ff);
  s->set_model_fingerprint(model_fingerprint);
  s->set_max_batch_rows(options.max_batch_rows);
  s->set_max_message_bytes(options.limits.max_message_bytes);
  std::lock_guard<std::mutex> lock(const_cast<std::mutex&>(mu));
  s->set_serving(serving && !shutting_down);
  s->set_draining(draining || shutting_down);  // neither serves (unless a drain is undone)
}

grpc::ServerUnaryReactor* ShardServer::Impl::LoadExperts(grpc::CallbackServerContext* ctx,
                                                         const v1::LoadExpertsRequest* req,
                                                         v1::ShardStatus* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const std::vector<int> experts(req->experts().begin(), req->experts().end());
  std::function<void(absl::Status)> done;
  if (req->wait()) {
    done = [this, reactor, resp](absl::Status st) {
      FillStatus(resp);
      reactor->Finish(common::ToGrpcStatus(st));
    };
  }
  if (req->replace_newer() && req->source_peer().empty()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 "replace_newer needs a source_peer to copy from"));
    return reactor;
  }
  absl::Status st = store->Load(experts, req->placement_version(), req->source_peer(), done,
                                req->replace_newer(), req->lease_epoch());
  if (!st.ok()) {
    reactor->Finish(common::ToGrpcStatus(st));
  } else if (!req->wait()) {
    FillStatus(resp);
    reactor->Finish(grpc::Status::OK);
  }
  return reactor;
}

grpc::ServerUnaryReactor* ShardServer::Impl::UnloadExperts(grpc::CallbackServerContext* ctx,
                                                           const v1::UnloadExpertsRequest* req,
                                                           v1::ShardStatus* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::Status st = store->Unload(std::vector<int>(req->experts().begin(), req->experts().end()),
                                  req->placement_version(), req->lease_epoch());
  if (st.ok()) FillStatus(resp);
  reactor->Finish(common::ToGrpcStatus(st));
  return reactor;
}

grpc::ServerUnaryReactor* ShardServer::Impl::GetStatus(grpc::CallbackServerContext* ctx,
                                                       const v1::GetShardStatusRequest*,
                                                       v1::ShardStatus* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (common::Failpoint("shard_status_unavailable")) {
    // As if every status call timed out while the shard serves: the router's check of the
    // replicas' training steps before a step cannot read this shard.
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                 "failpoint shard_status_unavailable"));
    return reactor;
  }
  FillStatus(resp);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* ShardServer::Impl::Drain(grpc::CallbackServerContext* ctx,
                                                   const v1::DrainRequest* req,
                                                   v1::DrainResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (req->undo()) {
    std::lock_guard<std::mutex> lock(mu);
    if (shutting_down) {
      reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                   "shard is shutting down: a drain cannot be undone now"));
      return reactor;
    }
    resp->set_not_draining(!draining);
    if (draining) {  // not draining: nothing to take back, the state stays as it is
      draining = false;
      ++undos;
      streams_cv.notify_all();  // a Drain still waiting answers at once: undone, not drained
      // As the store's change handler decides once the initial load has ended.
      serving = initial_loaded.HasBeenNotified() && Settled();
      server->GetHealthCheckService()->SetServingStatus(serving);
      common::Log("moe-expert-server: drain undone: %s\n",
                  serving ? "SERVING" : "NOT_SERVING until it holds experts");
    }
    resp->set_undone(true);  // an older shard leaves this unset: it took the call as a drain
    resp->set_serving(serving);
    resp->set_open_streams(static_cast<int32_t>(streams.size()));
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  if (req->timeout_ms() < 0 || req->timeout_ms() > 60000) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 absl::StrCat("drain timeout_ms must be in [0, 60000], got ",
                                              req->timeout_ms())));
    return reactor;
  }
  const absl::Duration timeout =
      absl::Milliseconds(req->timeout_ms() == 0 ? 10000 : req->timeout_ms());
  std::lock_guard<std::mutex> lock(mu);
  if (shutting_down) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shard is shutting down"));
    return reactor;
  }
  draining = true;
  serving = false;
  server->GetHealthCheckService()->SetServingStatus(false);
  common::Log("moe-expert-server: draining: NOT_SERVING, waiting for %zu Dispatch streams\n",
              streams.size());
  // The wait runs on its own thread so no gRPC thread blocks on it.
  for (auto it = drain_waiters.begin(); it != drain_waiters.end();) {
    if (!it->done->load()) {
      ++it;
      continue;
    }
    it->thread.join();  // it has answered and takes no lock again: returns at once
    it = drain_waiters.erase(it);
  }
  auto done = std::make_shared<std::atomic<bool>>(false);
  const uint64_t undos_before = undos;
  drain_waiters.push_back(
      {std::thread([this, reactor, resp, timeout, done, undos_before] {
         const auto start = std::chrono::steady_clock::now();
         const auto until = start + absl::ToChronoNanoseconds(timeout);
         std::unique_lock<std::mutex> l(mu);
         // Routers see NOT_SERVING at their next health check (every
         // 250 ms); one that still needs this shard (an expert only it
         // holds) opens a stream then, if it had none: until then no
         // stream open means nothing.
         streams_cv.wait_until(l,
                               std::min(until, std::chrono::steady_clock::now() + kRoutersNotice),
                               [&] { return shutting_down || undos != undos_before; });
         streams_cv.wait_until(
             l, until, [&] { return streams.empty() || shutting_down || undos != undos_before; });
         // Undone: the shard serves again, so it is not drained whatever
         // its streams (a preStop hook must not go on to stop it). Nor
         // is it where the timeout ended before routers could notice
         // the drain (no stream then means nothing), or the shard began
         // shutting down: that ends the wait, not the routers' use of it.
         const bool undone = undos != undos_before;
         const bool noticed = std::chrono::steady_clock::now() - start >= kRoutersNotice;
         const bool stopping = shutting_down;
         resp->set_undone(undone);
         resp->set_open_streams(static_cast<int32_t>(streams.size()));
         resp->set_drained(!undone && !stopping && noticed && streams.empty());
         l.unlock();
         reactor->Finish(stopping ? grpc::Status(grpc::StatusCode::ABORTED,
                                                 "shard is shutting down: the drain ended "
                                                 "before routers were done with it")
                                  : grpc::Status::OK);
         done->store(true);
       }),
       done});
  return reactor;
}

// Streams one expert's weights as a safetensors file in pieces of at most 1 MiB, the next piece
// started from OnWriteDone.
class ExportReactor final : public grpc::ServerWriteReactor<v1::ExpertChunk> {
 public:
  ExportReactor(ShardServer::Impl* impl, int expert) : expert_(expert) {
    // Failpoint `export_fails`: every copy from this shard fails, as if its weights could not be
    // read (a multi-process test of a placement switch whose loads fail).
    if (common::Failpoint("export_fails")) {
      Finish(grpc::Status(grpc::StatusCode::INTERNAL,
                          absl::StrCat("expert ", expert, " could not be read (failpoint)")));
      return;
    }
    std::shared_ptr<ExpertHandle> h = impl->store->Find(expert);
    if (h == nullptr) {
      Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          absl::StrCat("expert ", expert, " is not loaded on this shard")));
      return;
    }
    absl::StatusOr<std::string> bytes =
        common::SerializeExpert(impl->config, expert, h->ffn->weights());
    if (!bytes.ok()) {
      Finish(common::ToGrpcStatus(bytes.status()));
      return;
    }
    data_ = std::move(*bytes);
    chunk_.set_trained_step(h->trained_step);
    Next();
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "copy cancelled"));
      return;
    }
    Next();
  }
  void OnDone() override { delete this; }

 private:
  void Next() {
    if (offset_ >= data_.size()) {
      Finish(grpc::Status::OK);
      return;
    }
    const size_t n = std::min(kChunkBytes, data_.size() - offset_);
    chunk_.set_expert(expert_);
    chunk_.set_total_bytes(data_.size());
    chunk_.set_offset(offset_);
    chunk_.mutable_data()->assign(data_, offset_, n);
    offset_ += n;
    StartWrite(&chunk_);
  }
  int expert_;
  std::string data_;
  size_t offset_ = 0;
  v1::ExpertChunk chunk_;
};

grpc::ServerWriteReactor<v1::ExpertChunk>* ShardServer::Impl::ExportExpert(
    grpc::CallbackServerContext*, const v1::ExportExpertRequest* req) {
  return new ExportReactor(this, req->expert());
}

namespace {

// Failpoints for the multi-process tests of a rank lost during a training step's reduction:
//   reduce_exit_before_ring  the shard exits as its reduction starts, before any message;
//   reduce_exit_mid_ring     it exits once its first piece from the previous rank has arrived
//                            (the ring is under way on every rank), as if killed;
//   reduce_stall_mid_ring    at that point it stops itself (SIGSTOP), as if stalled, once per
//                            process: it carries on after a SIGCONT;
//   commit_skip_update_once  (in RunFinishStep) the first commit stamps its step on the experts
//                            without moving their weights, so the replicas differ unnoticed.
bool ReduceFailpointSet() {
  return common::Failpoint("reduce_exit_before_ring") ||
         common::Failpoint("reduce_exit_mid_ring") || common::Failpoint("reduce_stall_mid_ring");
}

class FailpointTransport final : public collective::PeerTransport {
 public:
  explicit FailpointTransport(collective::PeerTransport* inner) : inner_(inner) {}
  absl::Status Send(collective::Chunk chunk) override { return inner_->Send(std::move(chunk)); }
  absl::StatusOr<collective::Chunk> Recv(uint64_t generation, absl::Time deadline) override {
    absl::StatusOr<collective::Chunk> c = inner_->Recv(generation, deadline);
    if (c.ok() && common::Failpoint("reduce_exit_mid_ring")) {
      common::Log("moe-expert-server: failpoint reduce_exit_mid_ring: exiting\n");
      std::_Exit(3);
    }
    static std::atomic<bool> stalled{false};
    if (c.ok() && common::Failpoint("reduce_stall_mid_ring") && !stalled.exchange(true)) {
      common::Log("moe-expert-server: failpoint reduce_stall_mid_ring: stopping\n");
      std::raise(SIGSTOP);
    }
    return c;
  }
  bool CanBorrow() const override { return inner_->CanBorrow(); }
  void Abort() override { inner_->Abort(); }

 private:
  collective::PeerTransport* inner_;
};

void AddInto(std::vector<float>& acc, const std::vector<float>& g) {
  if (acc.empty()) {
    acc = g;
    return;
  }
  for (size_t i = 0; i < acc.size() && i < g.size(); ++i) acc[i] += g[i];
}

// OUT_OF_RANGE when `g`, expert `expert`'s `what` in a step, holds a NaN or an infinity, or when
// its update at `learning_rate` (0: not known) would leave a weight of `w` that is not finite:
// applied, either would leave the expert's weights NaN or infinite for good, so the step must be
// aborted.
absl::Status CheckStepFinite(int expert, const common::ExpertWeights& w,
                             const common::ExpertWeights& g, float learning_rate,
                             const char* what) {
  constexpr absl::string_view kAdvice =
      "): the model has diverged or grad_output is too large; lower the learning rate";
  const auto weights = w.Tensors();
  const auto grads = g.Tensors();
  for (size_t t = 0; t < grads.size(); ++t) {
    const auto& [name, v] = grads[t];
    if (const int64_t i = common::FirstNonFinite(*v); i >= 0) {
      return absl::OutOfRangeError(absl::StrCat("the ", what, " of expert ", expert,
                                                " is not finite (", name, "[", i, "] is ",
                                                std::isnan((*v)[i]) ? "NaN" : "infinite", kAdvice));
    }
    if (learning_rate == 0.f) continue;
    const std::vector<float>& p = *weights[t].second;
    for (size_t i = 0; i < v->size() && i < p.size(); ++i) {
      if (std::isfinite(expert::SgdStep(p[i], learning_rate, (*v)[i]))) continue;
      return absl::OutOfRangeError(absl::StrCat("the update of expert ", expert, " by its ", what,
                                                " at learning rate ", learning_rate,
                                                " is not finite (", name, "[", i, "]", kAdvice));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ShardServer::Impl::RunBackward(const v1::BackwardRequest& req,
                                            v1::BackwardResponse* resp) {
  const int64_t d = config.d_model;
  resp->set_batch_id(req.batch_id());
  for (const v1::ExpertOutput& g : req.grads()) {
    CachedForward fwd;
    {
      std::lock_guard<std::mutex> lock(train_mu);
      auto st = steps.find(req.train_step());
      bool found = false;
      if (st != steps.end()) {
        auto it = st->second.forwards.find({req.batch_id(), g.expert()});
        if (it != st->second.forwards.end()) {
          fwd = std::move(it->second);
          st->second.forwards.erase(it);
          found = true;
        }
      }
      if (!found) {
        return absl::FailedPreconditionError(
            absl::StrCat("no training forward of batch ", req.batch_id(), " for expert ",
                         g.expert(), " in step id ", req.train_step(), " on this shard"));
      }
    }
    ASSIGN_OR_RETURN(common::TensorView view,
                     common::DecodeMatrix(g.output(), absl::StrCat("grad of expert ", g.expert()), d));
    if (view.dim(0) != fwd.cache->rows) {
      return absl::InvalidArgumentError(absl::StrCat("grad of expert ", g.expert(), " has ",
                                                     view.dim(0), " rows, the forward had ",
                                                     fwd.cache->rows));
    }
    std::shared_ptr<ExpertHandle> h = store->Find(g.expert());
    if (h == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("expert ", g.expert(), " left this shard during the step"));
    }
    const std::vector<float> dy = common::ViewToFloat(view);
    std::vector<float> dx(dy.size());
    common::ExpertWeights grads;
    RETURN_IF_ERROR(h->ffn->Backward(fwd.input.data(), dy.data(), *fwd.cache, dx.data(), &grads));
    {
      std::lock_guard<std::mutex> lock(train_mu);
      auto st = steps.find(req.train_step());
      if (st == steps.end()) {
        return absl::FailedPreconditionError(
            absl::StrCat("step id ", req.train_step(), " ended during its backward"));
      }
      common::ExpertWeights& acc = st->second.grads[g.expert()];
      const auto sum = acc.Tensors();
      const auto add = grads.Tensors();
      for (size_t t = 0; t < sum.size(); ++t) AddInto(*sum[t].second, *add[t].second);
      // The step's sum so far (this batch's own gradient included), and its update: the router
      // aborts the step. For an expert with replicas the sum is this shard's part; the whole is
      // checked again after the reduction.
      if (absl::Status finite =
              CheckStepFinite(g.expert(), h->ffn->weights(), acc, req.learning_rate(), "gradient");
          !finite.ok()) {
        st->second.failed = true;
        return finite;
      }
    }
    v1::ExpertOutput* out = resp->add_grad_inputs();
    out->set_expert(g.expert());
    common::EncodeTensor(dx, {view.dim(0), d}, common::WireType::kFloat32, out->mutable_output());
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int>> ShardServer::Impl::RunFinishStep(const v1::FinishStepRequest& req) {
  const uint64_t step_id = req.train_step();
  std::unique_lock<std::mutex> lock(train_mu);
  // A repeat (the router asks again when a commit went unconfirmed) waits for a call that is
  // still applying the step, then finds the step gone: each update is applied once.
  finish_cv.wait(lock, [&] { return !applying_steps.count(step_id); });
  auto it = steps.find(step_id);
  if (it == steps.end()) {  // applied or dropped before, or never seen here (a restarted shard)
    MarkFinishedLocked(step_id, req.commit() ? Verdict::kCommit : Verdict::kAbort);
    return std::vector<int>{};
  }
  if (!req.commit() || it->second.failed) {
    const bool failed = it->second.failed;
    // Reductions of the step still under way fail now, and so do their rings' other ranks.
    for (const auto& [group, generation] : it->second.rings) hub.Break(group, generation);
    steps.erase(it);
    MarkFinishedLocked(step_id, Verdict::kAbort);
    if (req.commit() && failed) {
      return absl::AbortedError(
          absl::StrCat("step id ", step_id,
                       " failed on this shard (a gradient or update that is not finite, or a "
                       "reduction that failed); the step was dropped"));
    }
    return std::vector<int>{};
  }
  float learning_rate = req.learning_rate();
  static std::atomic<bool> skipped{false};
  if (common::Failpoint("commit_skip_update_once") && !skipped.exchange(true)) {
    // As if the update were lost on this replica unnoticed: the step is stamped on its experts
    // and their weights do not move.
    common::Log("moe-expert-server: failpoint commit_skip_update_once: step id %llu\n",
                static_cast<unsigned long long>(step_id));
    learning_rate = 0.f;
  }
  std::map<int, common::ExpertWeights> grads = std::move(it->second.grads);
  it->second.grads.clear();
  applying_steps.insert(step_id);
  lock.unlock();
  std::vector<int> updated;
  absl::Status st;
  for (auto g = grads.begin(); g != grads.end();) {
    st = ApplyUpdate(g->first, g->second, learning_rate, step_id);
    if (!st.ok()) break;
    updated.push_back(g->first);
    g = grads.erase(g);
  }
  lock.lock();
  applying_steps.erase(step_id);
  if (st.ok()) {
    steps.erase(step_id);
    MarkFinishedLocked(step_id, Verdict::kCommit);
  } else {
    // Keep what is not applied yet: a repeat applies the rest, not the whole step again.
    steps[step_id].grads = std::move(grads);
    steps[step_id].commit_seen = true;
  }
  finish_cv.notify_all();
  if (!st.ok()) return st;
  return updated;
}

absl::Status ShardServer::Impl::ApplyUpdate(int expert, const common::ExpertWeights& grad,
                                            float learning_rate, uint64_t step) {
  // The router copies experts only between steps, but a copy it gave up waiting for may still
  // land: the update goes onto the weights it read only if they are still the expert's, and
  // weights already at this step (copied from a replica that had applied it) are not updated
  // twice.
  for (int attempt = 1;; ++attempt) {
    std::shared_ptr<ExpertHandle> h = store->Find(expert);
    if (h == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("expert ", expert, " left this shard before its update"));
    }
    if (h->trained_step >= step) return absl::OkStatus();
    // Update a copy and swap it in: work in flight keeps the weights it started with.
    ASSIGN_OR_RETURN(std::unique_ptr<ExpertFfn> next,
                     ExpertFfn::Create(config, h->ffn->weights()));
    RETURN_IF_ERROR(next->ApplySgd(grad, learning_rate));
    absl::Status st = store->ReplaceExpert(expert, std::move(next), step, h.get());
    if (st.code() != absl::StatusCode::kAborted || attempt == 3) return st;
  }
}

absl::Status ShardServer::Impl::RunReduce(const v1::ReduceGradientsRequest& req,
                                          v1::ReduceGradientsResponse* resp) {
  const int world = req.members_size();
  if (req.rank() < 0 || req.rank() >= world) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", req.rank(), " of ", world));
  }
  if (common::Failpoint("reduce_exit_before_ring")) {
    common::Log("moe-expert-server: failpoint reduce_exit_before_ring: exiting\n");
    std::_Exit(3);
  }
  // Take this shard's gradients of the group's experts out of the step (zeros where it computed
  // no rows), reduce them without holding the lock, and put the sums back.
  std::map<int, common::ExpertWeights> grads;
  {
    std::lock_guard<std::mutex> lock(train_mu);
    // A reduction refused here runs no ring: what its peers send it is dropped on arrival.
    auto refuse = [&](absl::Status st) {
      hub.Forget(req.group(), req.generation());
      return st;
    };
    if (reductions_closed) return refuse(absl::UnavailableError("shard is shutting down"));
    if (finished_steps.count(req.train_step())) {
      return refuse(absl::FailedPreconditionError(
          absl::StrCat("step id ", req.train_step(), " has already ended on this shard")));
    }
    const bool known = steps.count(req.train_step()) > 0;
    StepState& step = OpenStepLocked(req.train_step());
    if (req.expect_step_state() && !known) {
      // The router sent this shard rows of the step, yet it has no record of them: it restarted
      // since. Reducing zeros in their place would commit a wrong sum.
      step.failed = true;
      return refuse(
          absl::AbortedError(absl::StrCat("step id ", req.train_step(),
                                          " has no state on this shard (it restarted since the "
                                          "step's forward?)")));
    }
    // An expert listed twice would have its gradient taken once and zeros reduced the second
    // time, over the same buffers.
    if (std::set<int>(req.experts().begin(), req.experts().end()).size() !=
        static_cast<size_t>(req.experts_size())) {
      step.failed = true;
      return refuse(absl::InvalidArgumentError("an expert is listed twice in the reduction"));
    }
    for (int e : req.experts()) {
      std::shared_ptr<ExpertHandle> h = store->Find(e);
      if (h == nullptr) {
        step.failed = true;
        return refuse(absl::FailedPreconditionError(
            absl::StrCat("expert ", e, " is not loaded on this shard")));
      }
      common::ExpertWeights g;
      auto it = step.grads.find(e);
      if (it != step.grads.end()) {
        g = std::move(it->second);
        step.grads.erase(it);
      }
      const auto w = h->ffn->weights().Tensors();
      const auto v = g.Tensors();
      for (size_t t = 0; t < v.size(); ++t) {
        if (v[t].second->size() != w[t].second->size()) {
          v[t].second->assign(w[t].second->size(), 0.f);
        }
      }
      grads[e] = std::move(g);
    }
    step.rings.emplace_back(req.group(), req.generation());  // an abort breaks it from here on
  }
  std::vector<absl::Span<float>> spans;
  int64_t elements = 0;
  for (int e : req.experts()) {
    common::ExpertWeights& g = grads[e];
    for (const auto& [name, v] : g.Tensors()) {
      spans.push_back(absl::MakeSpan(*v));
      elements += static_cast<int64_t>(v->size());
    }
  }
  // Bounded whatever the caller asks, so shutdown never waits long on a stuck ring.
  const absl::Time deadline =
      common::MonotonicNow() +
      std::min(req.timeout_ms() > 0 ? absl::Milliseconds(req.timeout_ms()) : absl::Seconds(30),
               kMaxRingTime);
  auto next = grpc::CreateCustomChannel(req.members((req.rank() + 1) % world),
                                        common::ChannelCredentials(),
                                        common::ClientChannelArgs(options.limits));
  collective::AllReduceOptions opts;
  if (req.bf16_wire()) opts.wire = collective::WireFormat::kBFloat16;
  const auto start = std::chrono::steady_clock::now();
  absl::Status st;
  {
    collective::GrpcPeerTransport transport(&hub, req.group(), req.rank(), next, deadline);
    FailpointTransport failpoint(&transport);
    // The step's accumulators are only touched by this step's calls, which the coordinator
    // serialises: reduce in place without holding the lock across the network.
    st = collective::RingAllReduceFused(
        spans, req.rank(), world, req.generation(), deadline,
        ReduceFailpointSet() ? static_cast<collective::PeerTransport*>(&failpoint) : &transport,
        opts);
  }
  resp->set_elements(elements);
  resp->set_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  std::lock_guard<std::mutex> lock(train_mu);
  auto step = steps.find(req.train_step());
  if (step != steps.end()) {
    auto& rings = step->second.rings;
    rings.erase(
        std::remove(rings.begin(), rings.end(), std::make_pair(req.group(), req.generation())),
        rings.end());
  }
  // Under train_mu: an abort breaks the ring before this (and the mailbox goes here) or not at all.
  hub.Forget(req.group(), req.generation());
  if (step == steps.end()) {
    return st.ok() ? absl::AbortedError(
                         absl::StrCat("step id ", req.train_step(), " ended during its reduction"))
                   : st;
  }
  absl::Status finite = absl::OkStatus();
  for (auto& [e, g] : grads) {
    // A backward that arrived during the reduction would be lost: that step cannot commit.
    if (step->second.grads.count(e)) step->second.failed = true;
    // Finite on every replica, the sum can still overflow, and so can its update; every ring
    // member finds it alike.
    if (st.ok() && finite.ok()) {
      static const common::ExpertWeights kLeft;  // the expert left: its gradient alone
      const std::shared_ptr<ExpertHandle> h = store->Find(e);
      finite = CheckStepFinite(e, h != nullptr ? h->ffn->weights() : kLeft, g, req.learning_rate(),
                               "summed gradient");
    }
    step->second.grads[e] = std::move(g);
  }
  if (!finite.ok()) {
    step->second.failed = true;
    return finite;
  }
  // A failed reduction leaves partial sums: the step must be aborted, never committed.
  if (!st.ok()) {
    step->second.failed = true;
    common::Log("moe-expert-server: step id %llu: gradient reduction %s failed: %s\n",
                static_cast<unsigned long long>(req.train_step()), req.group().c_str(),
                std::string(st.message()).c_str());
  }
  if (st.ok() && step->second.failed) {  // the step cannot commit here: say so to the coordinator
    return absl::AbortedError(
        absl::StrCat("step id ", req.train_step(), " failed on this shard during its reduction"));
  }
  return st;
}

grpc::ServerUnaryReactor* ShardServer::Impl::ReduceGradients(
    grpc::CallbackServerContext* ctx, const v1::ReduceGradientsRequest* req,
    v1::ReduceGradientsResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  // The ring blocks on its peers: run it on a thread of its own, not on a gRPC or compute thread.
  {
    std::lock_guard<std::mutex> lock(train_mu);
    if (reductions_closed) {
      reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shard is shutting down"));
      return reactor;
    }
    ++running_reductions;
  }
  std::thread([this, reactor, req, resp] {
    reactor->Finish(common::ToGrpcStatus(RunReduce(*req, resp)));
    std::lock_guard<std::mutex> lock(train_mu);
    --running_reductions;
    reductions_cv.notify_all();
  }).detach();
  return reactor;
}

grpc::ServerUnaryReactor* ShardServer::Impl::Backward(grpc::CallbackServerContext* ctx,
                                                      const v1::BackwardRequest* req,
                                                      v1::BackwardResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!train_pool->Submit([this, reactor, req, resp] {
        reactor->Finish(common::ToGrpcStatus(RunBackward(*req, resp)));
      })) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shard is shutting down"));
  }
  return reactor;
}

grpc::ServerUnaryReactor* ShardServer::Impl::FinishStep(grpc::CallbackServerContext* ctx,
                                                        const v1::FinishStepRequest* req,
                                                        v1::FinishStepResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!train_pool->Submit([this, reactor, req, resp] {
        absl::StatusOr<std::vector<int>> updated = RunFinishStep(*req);
        if (updated.ok()) {
          for (int e : *updated) resp->add_updated_experts(e);
        }
        reactor->Finish(common::ToGrpcStatus(updated.status()));
      })) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shard is shutting down"));
  }
  return reactor;
}

grpc::ServerUnaryReactor* ShardServer::Impl::GetStep(grpc::CallbackServerContext* ctx,
                                                     const v1::GetStepRequest* req,
                                                     v1::StepOutcome* resp) {
  {
    std::lock_guard<std::mutex> lock(train_mu);
    auto done = finished_steps.find(req->train_step());
    if (done != finished_steps.end()) {
      resp->set_state(done->second == Verdict::kCommit  ? v1::StepOutcome::COMMITTED
                      : done->second == Verdict::kAbort ? v1::StepOutcome::ABORTED
                                                        : v1::StepOutcome::UNKNOWN);
    } else if (applying_steps.count(req->train_step())) {
      resp->set_state(v1::StepOutcome::COMMITTED);
    } else if (auto open = steps.find(req->train_step()); open != steps.end()) {
      // A failed reduction means the coordinator cannot have decided to commit.
      resp->set_state(open->second.failed        ? v1::StepOutcome::ABORTED
                      : open->second.commit_seen ? v1::StepOutcome::COMMITTED
                                                 : v1::StepOutcome::OPEN);
    }
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void ShardServer::Impl::SetServing(bool value) {
  // Under mu, like Drain: a SERVING set here cannot land after Drain's NOT_SERVING.
  std::lock_guard<std::mutex> lock(mu);
  if (shutting_down || draining) return;
  serving = value;
  if (server) server->GetHealthCheckService()->SetServingStatus(value);
}

void ShardServer::Impl::OnStoreChange() {
  metrics->SetExpertsLoaded(store->ready_count());
  metrics->SetPlacementVersion(static_cast<double>(store->placement_version()));
}

void ShardServer::Impl::DoShutdown(absl::Duration grace) {
  std::call_once(shutdown_once, [&] {
    std::vector<std::shared_ptr<StreamCore>> open;
    {
      std::lock_guard<std::mutex> lock(mu);
      shutting_down = true;
      serving = false;
      open.assign(streams.begin(), streams.end());
    }
    server->GetHealthCheckService()->Shutdown();
    streams_cv.notify_all();
    std::vector<DrainWaiter> waiters;
    {
      std::lock_guard<std::mutex> lock(mu);
      waiters.swap(drain_waiters);
    }
    for (DrainWaiter& w : waiters) w.thread.join();
    {
      std::lock_guard<std::mutex> lock(hb_mu);
      hb_stop = true;
    }
    hb_cv.notify_all();
    if (heartbeat.joinable()) heartbeat.join();
    for (auto& s : open) {
      s->cancelled->store(true);
      s->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shard is shutting down"));
    }
    {
      // Reductions under way fail now (their rings break) and have answered before the server
      // goes; none starts from here on.
      std::unique_lock<std::mutex> lock(train_mu);
      reductions_closed = true;
      for (const auto& [id, step] : steps) {
        for (const auto& [group, generation] : step.rings) hub.Break(group, generation);
      }
      // Unbounded: a reduction thread uses this server to the end. Each one is bounded by its
      // own deadline (at most 120 s), and a broken ring ends at once.
      if (!reductions_cv.wait_for(lock, std::chrono::seconds(5),
                                  [this] { return running_reductions == 0; })) {
        common::Log(
            "moe-expert-server: waiting for %d gradient reductions to reach their "
            "deadlines before stopping\n",
            running_reductions);
        reductions_cv.wait(lock, [this] { return running_reductions == 0; });
      }
    }
    store->StopLoading();
    pool->Shutdown();
    train_pool->Shutdown();
    server->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  });
}

ShardServer::ShardServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ShardServer::~ShardServer() {
  Shutdown();
  impl_->server->Wait();
}

absl::StatusOr<std::unique_ptr<ShardServer>> ShardServer::Start(ShardServerOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  const ShardServerOptions& o = impl->options;
  if (o.checkpoint.empty()) return common::UsageError("--checkpoint is required");
  ASSIGN_OR_RETURN(impl->checkpoint, common::SafetensorsReader::Open(o.checkpoint));
  ASSIGN_OR_RETURN(impl->config, common::ReadModelConfig(*impl->checkpoint, o.load));
  ASSIGN_OR_RETURN(impl->model_fingerprint,
                   common::ModelFingerprint(*impl->checkpoint, impl->config, o.load.tensor_prefix));
  impl->registry = o.registry ? o.registry : std::make_shared<prometheus::Registry>();
  impl->metrics = std::make_unique<ShardMetrics>(*impl->registry, impl->config.num_experts);
  Impl* raw = impl.get();
  auto read_checkpoint = [raw](int e) {
    return common::ReadExpert(*raw->checkpoint, raw->options.load.tensor_prefix, raw->config, e);
  };
  if (!o.state_dir.empty()) {
    ASSIGN_OR_RETURN(impl->state,
                     StateDir::Open(o.state_dir, impl->config, read_checkpoint,
                                    [raw](int, uint64_t, const absl::Status& st) {
                                      raw->metrics->StateWritten(st.ok());
                                    }));
  }
  impl->store = std::make_unique<ExpertStore>(
      impl->config,
      [raw, read_checkpoint](int e) -> absl::StatusOr<LoadedExpert> {
        if (raw->state != nullptr) {
          if (std::optional<LoadedExpert> kept = raw->state->Read(e)) {
            raw->metrics->ExpertRead(ShardMetrics::Source::kStateDir);
            return std::move(*kept);
          }
        }
        absl::StatusOr<common::ExpertWeights> w = read_checkpoint(e);
        if (!w.ok()) return w.status();
        raw->metrics->ExpertRead(ShardMetrics::Source::kCheckpoint);
        return LoadedExpert{std::move(*w), 0};
      },
      [raw](const std::string& peer, int e) {
        absl::StatusOr<LoadedExpert> w = CopyFromPeer(raw->config, raw->options.limits, peer, e);
        if (w.ok()) raw->metrics->ExpertRead(ShardMetrics::Source::kPeer);
        return w;
      });
  // Once the initial load has ended, the shard serves once it holds experts and loads none:
  // the router may load experts onto a shard that started with none, or whose initial load was
  // cut short (ABORTED: the router's first placement unloaded an expert of it mid-load) or
  // failed. Not while a load runs: the placement going live would send rows to an expert
  // still loading.
  auto serve_if_settled = [raw] {
    if (raw->Settled()) raw->SetServing(true);
  };
  impl->store->SetOnChange([raw, serve_if_settled] {
    raw->OnStoreChange();
    if (raw->initial_loaded.HasBeenNotified()) serve_if_settled();
  });
  if (impl->state != nullptr) {
    impl->store->SetOnWeights(
        [raw](std::shared_ptr<const ExpertHandle> h) { raw->state->Save(std::move(h)); });
  }
  impl->pool =
      std::make_unique<ComputePool>(impl->config.d_model, o.pool, impl->metrics.get());
  impl->train_pool = std::make_unique<common::ThreadPool>(std::max(1, o.pool.threads));

  // The metrics address is checked before the server starts, and served once its port is known.
  if (!o.metrics_address.empty()) {
    RETURN_IF_ERROR(common::ProbeListenAddress(o.metrics_address, "--metrics-port"));
  }
  impl->collective_service = std::make_unique<collective::CollectiveService>(&impl->hub);
  ASSIGN_OR_RETURN(common::StartedServer started,
                   common::StartServer(o.address, {impl.get(), impl->collective_service.get()},
                                       o.limits));
  impl->server = std::move(started.server);
  impl->port = started.port;
  if (!o.metrics_address.empty()) {
    // Every series is labelled as the router knows the shard (its moe_shard_up{shard}): the
    // --advertise address, else 127.0.0.1:<port>, as the shard registers.
    const std::string shard =
        o.advertise_address.empty() ? absl::StrCat("127.0.0.1:", impl->port) : o.advertise_address;
    absl::StatusOr<std::unique_ptr<common::MetricsEndpoint>> ep =
        common::MetricsEndpoint::Start(o.metrics_address, impl->registry, {{"shard", shard}});
    if (!ep.ok()) {
      impl->DoShutdown(absl::ZeroDuration());
      impl->server->Wait();
      return ep.status();
    }
    impl->metrics_endpoint = std::move(*ep);
  }
  std::vector<int> initial;
  if (o.initial_experts) {
    initial = *o.initial_experts;
  } else {
    for (int e = 0; e < impl->config.num_experts; ++e) initial.push_back(e);
  }
  // A load that failed for some experts (a malformed tensor, an unreadable --state-dir file) or
  // was cut short still serves the experts it holds; the others are FAILED in GetStatus, and
  // the router loads them again where its placement wants them.
  auto on_loaded = [raw, serve_if_settled](absl::Status st) {
    raw->initial_status = st;
    serve_if_settled();  // an initial load that succeeded holds experts
    raw->initial_loaded.Notify();  // after SetServing: a caller woken by it sees SERVING
  };
  if (initial.empty()) {
    raw->initial_loaded.Notify();  // serving once the router has loaded something
  } else {
    absl::Status st = impl->store->Load(initial, 0, "", on_loaded);
    if (!st.ok()) {
      impl->DoShutdown(absl::ZeroDuration());
      impl->server->Wait();
      return st;
    }
  }
  if (!o.coordinator.empty()) impl->heartbeat = std::thread([raw] { raw->HeartbeatLoop(); });
  return std::unique_ptr<ShardServer>(new ShardServer(std::move(impl)));
}

int ShardServer::port() const { return impl_->port; }
int ShardServer::metrics_port() const {
  return impl_->metrics_endpoint ? impl_->metrics_endpoint->port() : 0;
}
std::string ShardServer::address() const { return absl::StrCat("127.0.0.1:", impl_->port); }
void ShardServer::Shutdown(absl::Duration grace) { impl_->DoShutdown(grace); }
void ShardServer::Wait() { impl_->server->Wait(); }
ExpertStore& ShardServer::store() { return *impl_->store; }
ComputePool& ShardServer::pool() { return *impl_->pool; }
const std::shared_ptr<prometheus::Registry>& ShardServer::registry() const {
  return impl_->registry;
}

absl::Status ShardServer::WaitUntilLoaded(absl::Duration timeout) {
  if (!impl_->initial_loaded.WaitForNotificationWithTimeout(timeout)) {
    return absl::DeadlineExceededError("initial experts still loading");
  }
  return impl_->initial_status;
}

}  // namespace moe::expert
