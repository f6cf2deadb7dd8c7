#include "router/grpc_shard_client.h"

#include <cstdio>
#include <deque>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "services/common/checkpoint.h"
#include "services/common/clock.h"
#include "services/common/expert_copy.h"
#include "services/common/grpc_status.h"
#include "services/common/log.h"
#include "services/common/security.h"

namespace moe::router {

// One Dispatch stream. Batches in flight are remembered by id; when the stream ends every one of
// them fails with UNAVAILABLE so the dispatcher can send it elsewhere.
class GrpcShardClient::Stream final
    : public grpc::ClientBidiReactor<v1::DispatchRequest, v1::DispatchResponse> {
 public:
  explicit Stream(GrpcShardClient* owner) : owner_(owner) {
    if (!owner_->model_fingerprint_.empty()) {
      ctx_.AddMetadata(common::kModelFingerprintKey, owner_->model_fingerprint_);
    }
    owner_->stub_->async()->Dispatch(&ctx_, this);
    AddHold();  // released once no more writes will be made
    StartRead(&response_);
    StartCall();
  }

  // False when the stream no longer takes batches.
  bool Send(std::shared_ptr<const v1::DispatchRequest> req, DispatchDone done) {
    std::unique_lock<std::mutex> lock(mu_);
    if (closed_) return false;
    // Answers are matched by batch id, which BuildShardRequest makes unique in the process; a
    // second batch of the same id would take the first one's answer.
    if (!pending_.try_emplace(req->batch_id(), std::move(done)).second) {
      lock.unlock();
      done(absl::InternalError(absl::StrCat("batch id ", req->batch_id(),
                                            " is already in flight to shard ", owner_->address_)));
      return true;
    }
    WriteLocked(std::move(req));
    return true;
  }

  // A DispatchRequest.cancel for a batch still waiting for its answer on this stream, also
  // while it closes gracefully (it half-closes only once every batch is answered).
  void Cancel(uint64_t batch_id) {
    std::lock_guard<std::mutex> lock(mu_);
    if ((closed_ && !graceful_) || writes_done_ || !pending_.count(batch_id)) return;
    auto cancel = std::make_shared<v1::DispatchRequest>();
    cancel->set_batch_id(batch_id);
    cancel->set_cancel(true);
    WriteLocked(std::move(cancel));
  }

  void Close() {
    ctx_.TryCancel();
  }

  // Takes no more batches, writes those already accepted and waits for their answers, then
  // half-closes: the shard ends the stream with OK (how a draining shard is let go). Until the
  // half-close a batch whose request ended can still be cancelled (the shard would otherwise
  // compute it for nobody, and the drain wait for it).
  void CloseGracefully() {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;
    graceful_ = true;
    MaybeHalfCloseLocked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    outbox_.pop_front();
    writing_ = false;
    if (!ok) {
      CloseLocked();
      return;
    }
    if (!outbox_.empty() && (!closed_ || graceful_)) {
      writing_ = true;
      StartWrite(outbox_.front().get());
    } else {
      MaybeHalfCloseLocked();
    }
  }

  void OnWritesDoneDone(bool /*ok*/) override {
    std::lock_guard<std::mutex> lock(mu_);
    ReleaseHoldLocked();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      std::lock_guard<std::mutex> lock(mu_);
      CloseLocked();
      return;
    }
    v1::DispatchResponse resp = std::move(response_);
    DispatchDone done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pending_.find(resp.batch_id());
      if (it != pending_.end()) {
        done = std::move(it->second);
        pending_.erase(it);
      }
      MaybeHalfCloseLocked();
    }
    StartRead(&response_);
    if (done) done(std::move(resp));
  }

  void OnDone(const grpc::Status& status) override {
    std::map<uint64_t, DispatchDone> pending;
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending.swap(pending_);
    }
    const absl::Status err = absl::UnavailableError(
        absl::StrCat("shard ", owner_->address_, ": stream ended (",
                     status.ok() ? "closed" : status.error_message(), ")"));
    for (auto& [id, done] : pending) done(err);
    // The owner counts the stream gone only once it is deleted: our ClientContext holds a
    // reference to the channel, and the owner may be destroyed as soon as StreamReleased returns.
    // Were the channel's last reference dropped here, on gRPC's callback thread, gRPC 1.51 would
    // join that very thread while releasing its callback queue and free the queue twice (seen
    // under ASan at router exit).
    GrpcShardClient* owner = owner_;
    owner->StreamEnded(this, status);
    delete this;
    owner->StreamReleased();
  }

 private:
  // Writes `req` after what is already queued.
  void WriteLocked(std::shared_ptr<const v1::DispatchRequest> req) {
    outbox_.push_back(std::move(req));
    if (!writing_) {
      writing_ = true;
      StartWrite(outbox_.front().get());
    }
  }

  void CloseLocked() {
    closed_ = true;
    graceful_ = false;
    ReleaseHoldLocked();
  }

  // Closing gracefully, with everything written and answered.
  void MaybeHalfCloseLocked() {
    if (graceful_ && !writing_ && pending_.empty()) StartWritesDoneLocked();
  }

  void StartWritesDoneLocked() {
    if (writes_done_) return;
    writes_done_ = true;
    StartWritesDone();
  }

  void ReleaseHoldLocked() {
    if (hold_released_) return;
    hold_released_ = true;
    RemoveHold();
  }

  GrpcShardClient* owner_;
  grpc::ClientContext ctx_;
  v1::DispatchResponse response_;
  std::mutex mu_;
  bool closed_ = false;
  bool graceful_ = false;       // closed by CloseGracefully: the outbox is still written
  bool writes_done_ = false;    // StartWritesDone was called
  bool hold_released_ = false;
  bool writing_ = false;
  std::deque<std::shared_ptr<const v1::DispatchRequest>> outbox_;
  std::map<uint64_t, DispatchDone> pending_;
};

GrpcShardClient::GrpcShardClient(std::string address, const common::RpcLimits& limits,
                                 std::function<void(bool)> on_health_change,
                                 absl::Duration health_interval, std::string model_fingerprint,
                                 std::shared_ptr<LeaseEpochs> lease_epochs)
    : address_(std::move(address)),
      channel_(grpc::CreateCustomChannel(address_, common::ChannelCredentials(),
                                         common::ClientChannelArgs(limits))),
      stub_(v1::ExpertShard::NewStub(channel_)),
      on_health_change_(std::move(on_health_change)),
      health_interval_(health_interval),
      model_fingerprint_(std::move(model_fingerprint)),
      lease_epochs_(std::move(lease_epochs)),
      flip_lines_(address_) {
  health_thread_ = std::thread([this] { HealthLoop(); });
}

GrpcShardClient::~GrpcShardClient() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    // Every live stream, also one closing gracefully: a shard that stopped answering must not
    // keep the destructor waiting.
    for (Stream* s : live_) s->Close();
  }
  stop_cv_.notify_all();
  health_thread_.join();
  std::unique_lock<std::mutex> lock(mu_);
  streams_done_.wait(lock, [this] { return live_streams_ == 0; });
}

std::string FlipLines::Out(absl::Time now, const std::string& why) {
  if (now - window_ >= absl::Minutes(1)) {
    window_ = now;
    logged_in_window_ = 0;
  }
  log_back_ = logged_in_window_ < kLogged;
  if (!log_back_) {
    return unlogged_++ == 0 ? absl::StrCat("moe-router: shard ", address_,
                                           " keeps leaving rotation: not logged again for up to "
                                           "a minute")
                            : "";
  }
  ++logged_in_window_;
  std::string line = absl::StrCat("moe-router: shard ", address_, " is out of rotation: ", why);
  if (unlogged_ > 0) {
    absl::StrAppend(&line, " (it left ", unlogged_, " more times before, not logged)");
  }
  unlogged_ = 0;
  return line;
}

std::string FlipLines::Back() const {
  return log_back_ ? absl::StrCat("moe-router: shard ", address_,
                                  " is back in rotation (its health check says SERVING)")
                   : "";
}

void GrpcShardClient::SetHealthy(bool healthy, const std::string& why) {
  // The flip and its report in one order: a health check's SERVING and a broken stream's flip
  // racing would otherwise report up after down, and leave moe_shard_up at 1 for a dead shard.
  std::lock_guard<std::mutex> lock(flip_mu_);
  const bool was = healthy_.exchange(healthy);
  // The cause kept is the latest (a drained shard that is then stopped: its checks now fail).
  if (healthy) {
    out_ = {};
  } else {
    if (was || out_.why.empty()) out_.since = common::MonotonicNow();
    out_.why = why;
  }
  if (was == healthy) return;
  const std::string line =
      healthy ? flip_lines_.Back() : flip_lines_.Out(common::MonotonicNow(), why);
  if (!line.empty()) common::Log("%s\n", line.c_str());
  if (on_health_change_) on_health_change_(healthy);
}

ShardClient::OutOfRotation GrpcShardClient::out_of_rotation() const {
  std::lock_guard<std::mutex> lock(flip_mu_);
  return out_;
}

absl::StatusOr<common::HealthState> GrpcShardClient::ProbeHealth(uint64_t* seq) {
  *seq = ++probes_started_;
  return common::CheckHealth(channel_.get(),
                             std::max(health_interval_ * 2, absl::Milliseconds(500)));
}

bool GrpcShardClient::FreshLocked(uint64_t seq) {
  if (seq < newest_applied_) return false;
  newest_applied_ = seq;
  return true;
}

void GrpcShardClient::CheckHealthNow() {
  uint64_t seq = 0;
  const auto h = ProbeHealth(&seq);
  if (!h.ok()) return;
  std::lock_guard<std::mutex> hl(health_mu_);
  if (!FreshLocked(seq)) return;
  answering_ = true;
  if (*h == common::HealthState::kServing) SetHealthy(true);
}

void GrpcShardClient::HealthLoop() {
  // Two failed checks in a row take the shard out (one slow answer on a busy machine does not);
  // one good check brings it back. A broken stream takes it out at once (StreamEnded). A shard
  // that answers NOT_SERVING says so on purpose (draining, or no experts loaded): it leaves at
  // once and its stream is closed gracefully, so the batches on it are answered, not re-sent;
  // not while the live placement (or the one a switch replaced, while requests routed on it
  // run) still puts a replica on it (StillNeeded, asked after it left rotation): its stream
  // stays open, or is opened, as the last resort of an expert it holds alone, until the router
  // has moved its experts off it or found them served elsewhere.
  int failures = 0;
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    lock.unlock();
    uint64_t seq = 0;
    const auto h = ProbeHealth(&seq);
    std::unique_lock<std::mutex> hl(health_mu_);
    const bool fresh = FreshLocked(seq);
    if (fresh && h.ok()) answering_ = true;
    if (!fresh) {
      // A check that started later was applied meanwhile: this answer is out of date.
    } else if (h.ok() && *h == common::HealthState::kServing) {
      failures = 0;
      SetHealthy(true);
    } else if (h.ok() && *h == common::HealthState::kNotServing) {
      failures = 0;
      SetHealthy(false, "its health check says NOT_SERVING (draining, or no expert loaded)");
      const bool needed = StillNeeded();
      std::lock_guard<std::mutex> l(mu_);
      if (needed && stream_ == nullptr && !stopping_) {
        stream_ = new Stream(this);  // counted by the shard's Drain: it waits
        live_.insert(stream_);
        ++live_streams_;
      } else if (!needed && stream_ != nullptr) {
        stream_->CloseGracefully();
        stream_ = nullptr;
      }
    } else if (++failures >= 2) {
      // The reason first: one who sees the shard no longer answering reads why.
      SetHealthy(false, absl::StrCat("two health checks in a row failed, the last: ",
                                     h.ok() ? "it answers neither SERVING nor NOT_SERVING"
                                            : h.status().ToString()));
      answering_ = false;
    }
    hl.unlock();
    lock.lock();
    stop_cv_.wait_for(lock, absl::ToChronoNanoseconds(health_interval_), [this] { return stopping_; });
  }
}

void GrpcShardClient::StreamEnded(Stream* stream, const grpc::Status& status) {
  bool failed = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    failed = !stopping_ && status.error_code() != grpc::StatusCode::OK;
  }
  // A broken stream takes the shard out of rotation until a health check says SERVING again.
  // Done before the stream counts as released: the destructor waits for that, then frees us.
  if (failed) {
    SetHealthy(false, absl::StrCat("its Dispatch stream broke (",
                                   common::FromGrpcStatus(status).ToString(), ")"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (stream_ == stream) stream_ = nullptr;
  live_.erase(stream);
}

void GrpcShardClient::StreamReleased() {
  std::lock_guard<std::mutex> lock(mu_);
  --live_streams_;
  streams_done_.notify_all();
}

void GrpcShardClient::Dispatch(std::shared_ptr<const v1::DispatchRequest> request, int64_t rows,
                               DispatchDone done) {
  outstanding_rows_.fetch_add(rows);
  DispatchDone wrapped = [this, rows, done = std::move(done)](
                             absl::StatusOr<v1::DispatchResponse> r) {
    outstanding_rows_.fetch_sub(rows);
    done(std::move(r));
  };
  for (int attempt = 0; attempt < 2; ++attempt) {
    std::unique_lock<std::mutex> lock(mu_);
    if (stopping_) break;
    if (stream_ == nullptr) {
      stream_ = new Stream(this);
      live_.insert(stream_);
      ++live_streams_;
    }
    Stream* s = stream_;
    // Send under the client lock so the stream cannot end between the check and the send.
    if (s->Send(request, wrapped)) return;
    if (stream_ == s) stream_ = nullptr;  // closed: open a fresh one
  }
  wrapped(absl::UnavailableError(absl::StrCat("shard ", address_, " is not accepting batches")));
}

void GrpcShardClient::NoteStatus(const v1::ShardStatus& status) {
  SetBatchLimits(status.max_batch_rows(), status.max_message_bytes());
  SetReportedLeaseEpoch(status.lease_epoch());
  if (lease_epochs_ != nullptr) lease_epochs_->See(status.lease_epoch());
}

void GrpcShardClient::CancelBatch(uint64_t batch_id) {
  // A shard that does not report its batch limits is older than DispatchRequest.cancel: it
  // would take the cancellation for an empty batch, and answer the batch with that error.
  if (max_batch_rows() <= 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  // Every stream: the batch may be on one closing gracefully (the shard drains), which still
  // takes cancellations of its batches. A batch sent on a stream that broke since is answered
  // by its end already.
  for (Stream* s : live_) s->Cancel(batch_id);
}

// A placement call's context, registered with the client while the call runs so that
// CancelAdminCalls can end it. Registering and checking admin_cancelled_ under one lock leaves
// no window for a call that starts during the cancellation (and TryCancel before the call
// starts cancels it when it does).
class GrpcShardClient::AdminCall {
 public:
  AdminCall(GrpcShardClient* client, absl::Duration timeout) : client_(client) {
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    std::lock_guard<std::mutex> lock(client_->admin_mu_);
    client_->admin_calls_.insert(&ctx);
    if (client_->admin_cancelled_) ctx.TryCancel();
  }
  ~AdminCall() {
    std::lock_guard<std::mutex> lock(client_->admin_mu_);
    client_->admin_calls_.erase(&ctx);
  }
  AdminCall(const AdminCall&) = delete;
  AdminCall& operator=(const AdminCall&) = delete;

  grpc::ClientContext ctx;

 private:
  GrpcShardClient* client_;
};

void GrpcShardClient::CancelAdminCalls() {
  std::lock_guard<std::mutex> lock(admin_mu_);
  admin_cancelled_ = true;
  for (grpc::ClientContext* ctx : admin_calls_) ctx->TryCancel();
}

namespace {

// The RPC's answer, or its error naming the shard. Callers make the call in a statement of its
// own before passing `status`: as an argument beside the call, a by-value parameter may be
// constructed from the still-empty message before the call fills it (GCC does so).
absl::StatusOr<v1::ShardStatus> Result(const grpc::Status& st, v1::ShardStatus&& status,
                                       const std::string& address, const char* what) {
  if (st.ok()) return std::move(status);
  absl::Status s = common::FromGrpcStatus(st);
  return absl::Status(s.code(), absl::StrCat(what, " on shard ", address, ": ", s.message()));
}

}  // namespace

absl::StatusOr<v1::ShardStatus> GrpcShardClient::LoadExperts(const std::vector<int>& experts,
                                                             uint64_t version,
                                                             const std::string& peer,
                                                             absl::Duration timeout) {
  return Load(experts, version, peer, /*replace_newer=*/false, timeout);
}

absl::StatusOr<v1::ShardStatus> GrpcShardClient::RollBackExperts(const std::vector<int>& experts,
                                                                 uint64_t version,
                                                                 const std::string& peer,
                                                                 absl::Duration timeout) {
  return Load(experts, version, peer, /*replace_newer=*/true, timeout);
}

absl::StatusOr<v1::ShardStatus> GrpcShardClient::Load(const std::vector<int>& experts,
                                                      uint64_t version, const std::string& peer,
                                                      bool replace_newer,
                                                      absl::Duration timeout) {
  AdminCall call(this, timeout);
  grpc::ClientContext& ctx = call.ctx;
  v1::LoadExpertsRequest req;
  for (int e : experts) req.add_experts(e);
  req.set_placement_version(version);
  req.set_source_peer(peer);
  req.set_wait(true);
  req.set_replace_newer(replace_newer);
  if (lease_epochs_ != nullptr) req.set_lease_epoch(lease_epochs_->held.load());
  v1::ShardStatus status;
  const grpc::Status st = stub_->LoadExperts(&ctx, req, &status);
  if (st.ok()) NoteStatus(status);
  return Result(st, std::move(status), address_,
                replace_newer ? "giving back an update" : "loading experts");
}

absl::StatusOr<v1::ShardStatus> GrpcShardClient::UnloadExperts(const std::vector<int>& experts,
                                                               uint64_t version,
                                                               absl::Duration timeout) {
  AdminCall call(this, timeout);
  grpc::ClientContext& ctx = call.ctx;
  v1::UnloadExpertsRequest req;
  for (int e : experts) req.add_experts(e);
  req.set_placement_version(version);
  if (lease_epochs_ != nullptr) req.set_lease_epoch(lease_epochs_->held.load());
  v1::ShardStatus status;
  const grpc::Status st = stub_->UnloadExperts(&ctx, req, &status);
  if (st.ok()) NoteStatus(status);
  return Result(st, std::move(status), address_, "unloading experts");
}

absl::StatusOr<v1::ShardStatus> GrpcShardClient::GetStatus(absl::Duration timeout) {
  AdminCall call(this, timeout);
  grpc::ClientContext& ctx = call.ctx;
  v1::ShardStatus status;
  const grpc::Status st = stub_->GetStatus(&ctx, v1::GetShardStatusRequest(), &status);
  if (st.ok()) NoteStatus(status);
  return Result(st, std::move(status), address_, "status");
}

absl::StatusOr<v1::BackwardResponse> GrpcShardClient::Backward(const v1::BackwardRequest& request,
                                                               absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  v1::BackwardResponse resp;
  grpc::Status st = stub_->Backward(&ctx, request, &resp);
  if (!st.ok()) {
    absl::Status s = common::FromGrpcStatus(st);
    return absl::Status(s.code(), absl::StrCat("backward on shard ", address_, ": ", s.message()));
  }
  return resp;
}

absl::Status GrpcShardClient::FinishStep(uint64_t step, bool commit, float learning_rate,
                                         absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  v1::FinishStepRequest req;
  req.set_train_step(step);
  req.set_commit(commit);
  req.set_learning_rate(learning_rate);
  v1::FinishStepResponse resp;
  return common::FromGrpcStatus(stub_->FinishStep(&ctx, req, &resp));
}

absl::StatusOr<v1::StepOutcome::State> GrpcShardClient::GetStep(uint64_t step,
                                                                 absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  v1::GetStepRequest req;
  req.set_train_step(step);
  v1::StepOutcome resp;
  const grpc::Status st = stub_->GetStep(&ctx, req, &resp);
  if (!st.ok()) {
    absl::Status s = common::FromGrpcStatus(st);
    return absl::Status(s.code(),
                        absl::StrCat("step id ", step, " on shard ", address_, ": ", s.message()));
  }
  return resp.state();
}

absl::StatusOr<std::string> GrpcShardClient::ExportExpert(int expert, absl::Duration timeout) {
  AdminCall call(this, timeout);
  grpc::ClientContext& ctx = call.ctx;
  v1::ExportExpertRequest req;
  req.set_expert(expert);
  auto reader = stub_->ExportExpert(&ctx, req);
  common::ExpertCopy copy(uint64_t{8} << 30);  // the caller parses it against the model
  v1::ExpertChunk chunk;
  absl::Status added;
  while (added.ok() && reader->Read(&chunk)) added = copy.Add(chunk);
  if (!added.ok()) ctx.TryCancel();
  grpc::Status st = reader->Finish();
  if (added.ok() && st.ok()) added = copy.Complete();
  if (!added.ok()) {
    return absl::DataLossError(absl::StrCat("export of expert ", expert, " from ", address_,
                                            ": ", added.message()));
  }
  if (!st.ok()) {
    absl::Status s = common::FromGrpcStatus(st);
    return absl::Status(s.code(), absl::StrCat("export of expert ", expert, " from ", address_,
                                               ": ", s.message()));
  }
  return std::move(copy.bytes);
}

}  // namespace moe::router
