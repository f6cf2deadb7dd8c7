#include "router/router_server.h"

#include <grpcpp/health_check_service_interface.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "moe/v1/coordinator.grpc.pb.h"
#include "moe/v1/router.grpc.pb.h"
#include "router/dispatcher.h"
#include "router/gating.h"
#include "router/grpc_shard_client.h"
#include "router/kept_gate.h"
#include "router/load_stats.h"
#include "router/placement_lease.h"
#include "router/router_metrics.h"
#include "router/trainer.h"
#include "services/common/clock.h"
#include "services/common/flags.h"
#include "services/common/grpc_status.h"
#include "services/common/log.h"
#include "services/common/notification.h"
#include "services/common/safetensors.h"
#include "services/common/security.h"
#include "services/common/status_macros.h"
#include "services/common/stream_outbox.h"
#include "services/common/tensor_codec.h"
#include "services/common/thread_pool.h"
#include "services/common/timed_mutex.h"

namespace moe::router {

namespace {

// Whether two copies of an expert are bit-identical: compares bytes, so that a NaN equals itself
// and -0 differs from +0 (float == would say the opposite of both).
bool SameBits(const common::ExpertWeights& a, const common::ExpertWeights& b) {
  const auto x = a.Tensors();
  const auto y = b.Tensors();
  for (size_t t = 0; t < x.size(); ++t) {
    const std::vector<float>& u = *x[t].second;
    const std::vector<float>& v = *y[t].second;
    if (u.size() != v.size() ||
        (!u.empty() && std::memcmp(u.data(), v.data(), u.size() * sizeof(float)) != 0)) {
      return false;
    }
  }
  return true;
}

// Threads for training, save and rebalance calls (Impl::admin_pool). Steps run one at a time
// and switches one at a time, so a few threads are enough to keep any one kind from waiting
// behind another.
constexpr int kAdminThreads = 4;

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

std::string CodeName(absl::StatusCode code) {
  return absl::StatusCodeToString(code);
}

// One router process among others (the placement lease's holder id).
std::string RandomId() {
  std::random_device rd;
  const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  return absl::StrCat(absl::Hex(v, absl::kZeroPad16));
}

// This host's name (a pod's name under Kubernetes), for messages that name the router.
std::string HostName() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

}  // namespace

struct InferStreamCore;

// A request's cancellation by its client (Infer's or InferStream's OnCancel, which also comes
// when the client's deadline passes), whenever it comes: one cancelled before it reaches the
// dispatcher is not dispatched; one in flight ends CANCELLED at once, and its shards drop what
// they have not begun of it.
class RequestCancel {
 public:
  // `client_deadline`: the deadline the client set (for a stream, the stream's).
  // `shutting_down`: the router's flag; gRPC cancels the calls a shutdown cuts off.
  RequestCancel(Dispatcher* dispatcher, absl::Time client_deadline,
                const std::atomic<bool>* shutting_down)
      : dispatcher_(dispatcher), client_deadline_(client_deadline), shutting_down_(shutting_down) {}

  void Cancel() {
    // gRPC reports the client's deadline passing as a cancellation too, and this side's copy of
    // the deadline (set from the call's relative timeout when it arrived) lies a transit time
    // after the client's: a cancellation within kDeadlineSlack of it is counted as the deadline
    // (DEADLINE_EXCEEDED is a failure to alert on; CANCELLED is the client's own choice).
    absl::Status why = shutting_down_->load() ? absl::UnavailableError("router is shutting down")
                       : common::MonotonicNow() + kDeadlineSlack >= client_deadline_
                           ? absl::DeadlineExceededError("the client's deadline passed")
                           : absl::CancelledError("the client cancelled the request");
    uint64_t call = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!why_.ok()) return;
      why_ = why;
      call = call_;
    }
    if (call != 0) dispatcher_->Cancel(call, std::move(why));
  }

  // OK, or why the request ended before it was dispatched.
  absl::Status status() {
    std::lock_guard<std::mutex> lock(mu_);
    return why_;
  }

  // The request's dispatch started as `call`.
  void Started(uint64_t call) {
    absl::Status why;
    {
      std::lock_guard<std::mutex> lock(mu_);
      call_ = call;
      why = why_;
    }
    if (!why.ok()) dispatcher_->Cancel(call, std::move(why));
  }

 private:
  static constexpr absl::Duration kDeadlineSlack = absl::Milliseconds(250);
  Dispatcher* const dispatcher_;
  const absl::Time client_deadline_;
  const std::atomic<bool>* const shutting_down_;
  std::mutex mu_;
  absl::Status why_;  // set once cancelled
  uint64_t call_ = 0;
};

class RouterServer::Impl final : public v1::Router::CallbackService {
 public:
  RouterServerOptions options;
  common::ModelConfig config;
  std::string model_fingerprint;  // common::ModelFingerprint of the checkpoint (ServesModel)
  // The gate, replaced as a whole after each training step (requests keep the one they read).
  std::mutex gate_mu;
  std::shared_ptr<const common::GateWeights> gate;
  std::shared_ptr<const common::GateWeights> Gate() {
    std::lock_guard<std::mutex> lock(gate_mu);
    return gate;
  }
  std::unique_ptr<Trainer> trainer;
  std::shared_ptr<grpc::Channel> coordinator_channel;
  std::unique_ptr<v1::Coordinator::Stub> coordinator;
  // ---- the placement lease (router/placement_lease.h; `lease`, declared last) ----
  // Random, one per process: the lease's holder id, and the kept gate's `kept_by`.
  std::string router_id;
  // The lease's epoch, sent with each load and unload so that shards refuse those of a router
  // whose lease has gone to another; and the highest the shards report.
  const std::shared_ptr<LeaseEpochs> lease_epochs = std::make_shared<LeaseEpochs>();
  bool MayPlace() { return lease == nullptr || lease->MayPlace(); }
  bool MayPlaceNow() { return lease == nullptr || lease->MayPlaceNow(); }
  // Whether a placement lease keeps other routers from placing the shards meanwhile.
  bool LeaseFences() { return lease != nullptr && lease->Fences(); }
  bool LeaseLost() const { return lease != nullptr && lease->lost(); }

  // Another router places the shards now: this one answers nothing more from its placement
  // (requests are refused UNAVAILABLE, saying why) and says NOT_SERVING; WaitOrLeaseLost then
  // stops it. After a switch that runs, which ends first.
  void OnLeaseLost() {
    {
      std::lock_guard<common::TimedMutex> p(placement_mu);
      std::lock_guard<std::mutex> lock(table_mu);
      table.reset();
    }
    std::lock_guard<std::mutex> s(serving_mu);
    server->GetHealthCheckService()->SetServingStatus(false);
  }
  // Orders the first SERVING (ControlLoop, only while the lease is not lost) before a loss's
  // NOT_SERVING.
  std::mutex serving_mu;

  // Sends this router's lease epoch to each of `shards` that has not got it (an empty unload,
  // which a shard answers at once): from then on the shard refuses the loads and unloads of a
  // router whose lease this one took over (one that stalled mid-switch, say), also where this
  // router has nothing to load there. Before the first placement reads what the shards hold,
  // and at each tick after: for a new epoch (a restarted coordinator grants a new one), and
  // for a shard whose status reports an older one (it restarted). A shard that has seen a
  // later epoch (the coordinator restarted with its clock behind) refuses it; its status says
  // which, and the next MayPlaceNow asks for the lease past it. At a tick (`at_tick`), a shard
  // whose health checks find it silent is skipped: one that hangs would hold every tick up. (The
  // first placement reads each shard in turn anyway, and a new client has not been checked.)
  // Control thread only.
  void SendLeaseEpoch(const std::vector<std::shared_ptr<ShardClient>>& shards, bool at_tick) {
    const uint64_t epoch = lease_epochs->held.load();
    if (epoch == 0) return;  // no coordinator, or one without epochs
    for (const auto& c : shards) {
      uint64_t& sent = epoch_sent[c->address()];
      // A shard older than epochs reports 0 whatever it is sent: sent again for a new epoch
      // only (once it reports one, it knows them: a restart of it is seen).
      const uint64_t reported = c->reported_lease_epoch();
      bool& unknown = epoch_unknown[c->address()];
      if (reported != 0) unknown = false;
      if (sent == epoch && (reported >= epoch || unknown)) continue;
      if (at_tick && !c->answering()) continue;
      const absl::StatusOr<v1::ShardStatus> st = c->UnloadExperts({}, 0, absl::Milliseconds(500));
      if (st.ok()) {
        sent = epoch;
        unknown = st->lease_epoch() == 0;
      } else if (absl::IsFailedPrecondition(st.status())) {
        c->GetStatus(absl::Milliseconds(500)).IgnoreError();  // its epoch, seen by the client
      }
    }
  }
  // By shard address; control thread.
  std::map<std::string, uint64_t> epoch_sent;
  std::map<std::string, bool> epoch_unknown;  // it reported 0 right after a send

  // Why a change of placement is refused now (!MayPlaceNow()). The same text each time: Apply
  // says a refusal once while it lasts.
  absl::Status PlacementRefusal() {
    if (lease != nullptr) RETURN_IF_ERROR(lease->NotRenewed());
    return NotReady();
  }

  // How long a training step waits for a connection to the coordinator before it is refused:
  // a connection being made may take a while (a slow host), but after a failed attempt one
  // more (at most 1 s later, ClientChannelArgs' backoff) is enough to tell, so that a client
  // trying again while the coordinator is down is told soon each time.
  static constexpr absl::Duration kCoordinatorConnectWait = absl::Seconds(5);
  static constexpr absl::Duration kCoordinatorReconnectWait = absl::Milliseconds(1500);
  // ClusterInfo.coordinator_state: the channel's state, without waiting (a call from an idle
  // channel starts a connection, so the next read tells).
  std::string CoordinatorState() const {
    switch (coordinator_channel->GetState(/*try_to_connect=*/true)) {
      case GRPC_CHANNEL_READY:
        return "connected";
      case GRPC_CHANNEL_TRANSIENT_FAILURE:
      case GRPC_CHANNEL_SHUTDOWN:
        return "unreachable";
      default:
        return "connecting";
    }
  }
  // One training step at a time. Copies of an expert to a new or restarted replica hold it too:
  // a copy taken while a step commits could miss that step's update on one replica only.
  common::TimedMutex train_mu;
  // How long a placement change or a reload waits for a running training step before it gives up
  // (the control loop tries again: a reload or a membership switch on its next tick, its own
  // dynamic rebalance after the cooldown).
  static constexpr auto kTrainWait = std::chrono::seconds(5);
  // How long the control loop's check of its own rebalance may read the status of holders out
  // of rotation (CheckSwitchable; 500 ms a holder at most).
  static constexpr absl::Duration kAutoCheckWait = absl::Seconds(2);
  // How long, in all, a switch waits for joining members to finish loading experts they may be
  // the only trained holders of (JoiningHolder: their initial load, from their --state-dir).
  static constexpr absl::Duration kJoinLoadWait = absl::Seconds(10);
  std::atomic<uint64_t> steps_done{0};  // by this process (whether it trained: see SwitchLocked)
  // A switch or a tick found trained replicas (after a restart, steps_done is 0 although the
  // shards were trained): CheckSwitchable then needs a source for each copy.
  std::atomic<bool> seen_trained{false};
  // Whether the model has trained, as far as this router knows without asking the shards.
  bool KnownTrained() const { return steps_done.load() > 0 || seen_trained.load(); }
  // Steps taken before this process, read with the kept gate (--state-dir): counted in the
  // step numbers reported, never taken as this router's training.
  uint64_t restored_steps = 0;
  // The training step (Trainer's id) of the gate: the last one this router took, or the one
  // read back from --state-dir; 0 for the checkpoint's gate.
  uint64_t gate_step = 0;
  bool gate_warned = false;  // WarnIfGateBehind said it (train_mu held)
  std::string gate_warning;  // what it said, for GetClusterInfo (models_mu)
  // Path of the kept gate (--state-dir), empty when none is kept.
  std::string gate_state_path;
  // Of the checkpoint's gate, kept with the trained one: a kept gate trained from another
  // checkpoint of the same shape (a model volume made again with another seed) is not served.
  std::string checkpoint_gate_print;
  bool gate_other_checkpoint_said = false;  // ReadKeptGate's line, said once
  // The latest training step each expert's replicas were seen at (train_mu held): an expert
  // whose replicas are all back below it lost its training. Kept with the gate (--state-dir), so
  // that a cluster started again on shards that do not hold its training (other --shards or
  // another placement: a shard's --state-dir keeps only the experts it held) says so.
  std::map<int, uint64_t> reached_step;
  std::shared_ptr<prometheus::Registry> registry;
  std::unique_ptr<RouterMetrics> metrics;
  // Shard clients by address (kept across membership changes). Never pruned while serving: a
  // batch finishing on a gRPC callback thread may drop a routing table's reference to a client,
  // and a client destroyed there would wait for its own stream and drop its channel on that
  // thread (see GrpcShardClient::StreamReleased). Pruning must hand the client to another thread.
  std::mutex clients_mu;
  std::map<std::string, std::shared_ptr<ShardClient>> clients;
  std::unique_ptr<Dispatcher> dispatcher;
  std::unique_ptr<LoadStats> load_stats;
  std::unique_ptr<common::ThreadPool> pool;
  // Training, saves and rebalances: calls that block for seconds (a step waits for the
  // coordinator, a switch for expert loads). Their own threads, so that however many of them
  // wait, inference never queues behind them on `pool`.
  std::unique_ptr<common::ThreadPool> admin_pool;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<common::MetricsEndpoint> metrics_endpoint;
  int port = 0;

  std::mutex table_mu;
  std::shared_ptr<const RoutingTable> table;  // null until the first placement is live
  // The model of each shard read (ServesThisModel): address -> "" for this router's model, or
  // why it is another's. Also guards not_placed, draining_now, drained_off and gate_warning (a
  // leaf lock: nothing else is taken while it is held).
  std::mutex models_mu;
  std::map<std::string, std::string> models;
  // Shards (members, or of a fixed --shards list) left out of the placement because they do
  // not answer: GetClusterInfo lists them (models_mu).
  std::set<std::string> not_placed;
  std::set<std::string> draining_now;  // shards the last tick read as draining (models_mu)
  // Why Reconcile could not follow the last change of the shards (logged once per reason).
  std::string membership_wait;
  // Why the last try of the first placement failed (models_mu): said to requests until it is
  // applied.
  std::string not_ready_why;
  absl::Status NotReady() {
    if (lease != nullptr) RETURN_IF_ERROR(lease->NotServing());
    std::lock_guard<std::mutex> l(models_mu);
    return absl::UnavailableError(
        not_ready_why.empty()
            ? std::string("the router is still loading its placement")
            : absl::StrCat("the router is still loading its placement: ", not_ready_why));
  }
  // What kept the last read of the coordinator's members from listing shards: "" (nothing),
  // "unreachable" or "empty" (control loop).
  std::string coordinator_trouble;
  // Says `why` once per `kind` of trouble (until the members are read again) and returns `st`
  // with it as its message.
  absl::Status CoordinatorTrouble(const absl::Status& st, const std::string& kind,
                                  const std::string& why) {
    if (kind != coordinator_trouble) {
      common::Log("moe-router: %s (asked again every second)\n", why.c_str());
      coordinator_trouble = kind;
    }
    return absl::Status(st.code(), why);
  }
  // The shards the first placement could not read on its last try (placement_mu): the control
  // loop tries again at once without them (see ControlLoop).
  std::vector<std::string> first_unread;
  // Whether the coordinator was settling when the first placement read its members
  // (placement_mu): see SwitchLocked.
  bool first_settling = false;
  std::string first_wait;  // why the first placement last waited (said once; control loop)
  std::string drain_wait;  // what MoveOffDraining last said (said once; control loop)
  // The table a switch replaced, while it waits for the requests routed on it (StillNeeded;
  // table_mu). Weak: the switch waits for the old table's use count to fall.
  std::weak_ptr<const RoutingTable> retiring;
  // Shards MoveOffDraining took out of the placement, until they hold experts again or leave
  // the table: the only empty shards PlaceUndrained gives experts. Written by the control loop;
  // Usable reads it too (a drained shard that is then stopped stays out of the formulas), so
  // under models_mu.
  std::set<std::string> drained_off;
  // The last "not applied" line Apply wrote (placement_mu): the same failure is said once.
  std::string last_not_applied;
  // UnloadExtras' last failure on each shard (said once; placement_mu), and ReloadMissing's on
  // each shard from each source (train_mu).
  std::map<std::string, std::string> extras_failed;
  std::map<std::string, std::string> reload_failed;
  // Experts that lost their training while this router ran, or before it started as its kept
  // gate tells (SaveCheckpoint names them).
  std::mutex lost_mu;
  std::set<int> lost_training;
  // Those not yet named to a TrainStep (TrainStepResponse.lost_training_experts).
  std::set<int> lost_untold;
  // Serialises placement changes; timed, so that a Rebalance waits for another switch only as
  // long as its deadline allows.
  common::TimedMutex placement_mu;
  // The latest placement version a switch took (written under placement_mu, or train_mu: the
  // first placement's read of the shards, ReloadMissing). A switch that failed took one too,
  // and the shards it reached have it: calls to them send at least this.
  std::atomic<uint64_t> version{0};
  // When the last switch was applied (SwitchLocked, on any thread), or the control loop's own
  // dynamic rebalance was refused or failed: the control loop's next one waits the cooldown
  // from it.
  std::atomic<std::chrono::steady_clock::time_point> last_rebalance{
      std::chrono::steady_clock::now()};
  // Why the control loop last refused its own rebalance (control loop only): said once while
  // it lasts; cleared once the loop finds nothing to rebalance or a proposal that passes.
  std::string auto_refused;
  std::atomic<Strategy> strategy{Strategy::kHybrid};

  common::Notification ready;
  std::mutex control_mu;
  std::condition_variable control_cv;
  bool stopping = false;
  bool control_wake = false;  // control_mu: the control loop's next tick now (RegrantPending)
  // Set once shutdown has begun: a switch then stops waiting for requests on the old table.
  std::atomic<bool> shutting_down{false};
  std::thread control;
  std::once_flag shutdown_once;

  // ---- the request path ----

  std::shared_ptr<const RoutingTable> Table() {
    std::lock_guard<std::mutex> lock(table_mu);
    return table;
  }

  // Open InferStreams. DoShutdown ends each once it has answered what it read: a stream idle
  // between requests would otherwise hold the router up for the whole grace period.
  std::mutex streams_mu;
  std::set<std::shared_ptr<InferStreamCore>> streams;  // erased in the reactor's OnDone
  void CloseStreams();  // defined after InferStreamCore

  // Requests being forwarded; DoShutdown waits for none to be left before the router goes.
  std::mutex inflight_mu;
  std::condition_variable inflight_cv;
  int64_t inflight = 0;

  // Batches of up to this many tokens are gated and sent on the thread that received them (a
  // gRPC thread) and their answers combined on the thread that brought the last one: no thread
  // hand-off on the latency path. Larger ones are gated on the worker pool and combined there.
  static constexpr int64_t kInlineTokens = 256;

  using ForwardDone = std::function<void(absl::Status)>;

  // Validates and gates `req`, fans it out to the shards and fills `resp`. Returns at once;
  // `done` runs exactly once (perhaps before Forward returns), and nothing here touches `req` or
  // `resp` after it.
  // `cancel` (may be null): the client's cancellation of the request.
  void Forward(const v1::InferRequest* req, v1::InferResponse* resp, absl::Time deadline,
               std::shared_ptr<RequestCancel> cancel, ForwardDone done) {
    int64_t refused_at = -1;
    {
      std::lock_guard<std::mutex> lock(inflight_mu);
      if (inflight >= options.max_inflight_requests) {
        refused_at = inflight;
      } else {
        ++inflight;
      }
    }
    if (refused_at >= 0) {
      // Shed load rather than queue without bound: the client backs off and retries.
      return done(absl::ResourceExhaustedError(absl::StrCat(
          "the router has ", refused_at, " requests in flight, its limit "
          "(--max-inflight-requests); retry with backoff")));
    }
    ForwardDone finish = [this, done = std::move(done)](absl::Status st) {
      done(st);
      std::lock_guard<std::mutex> lock(inflight_mu);
      if (--inflight == 0) inflight_cv.notify_all();
    };
    const int64_t tokens = req->tokens().shape_size() == 2 ? req->tokens().shape(0) : 0;
    if (tokens > kInlineTokens) {
      if (!pool->Submit([this, req, resp, deadline, cancel, finish] {
            ForwardNow(req, resp, deadline, cancel, finish);
          })) {
        finish(absl::UnavailableError("router is shutting down"));
      }
      return;
    }
    ForwardNow(req, resp, deadline, std::move(cancel), std::move(finish));
  }

  void ForwardNow(const v1::InferRequest* req, v1::InferResponse* resp, absl::Time deadline,
                  std::shared_ptr<RequestCancel> cancel, ForwardDone done) {
    if (cancel != nullptr) {
      if (absl::Status ended = cancel->status(); !ended.ok()) return done(ended);
    }
    const int64_t d = config.d_model;
    if (req->tokens().shape_size() == 2 && req->tokens().shape(0) > options.max_batch_tokens) {
      return done(absl::ResourceExhaustedError(absl::StrCat(
          "tokens: ", req->tokens().shape(0), " tokens exceed the limit of ",
          options.max_batch_tokens, " per request; split the batch")));
    }
    common::DecodeLimits limits;
    limits.max_elements = options.max_batch_tokens * d;
    absl::StatusOr<common::TensorView> view =
        common::DecodeMatrix(req->tokens(), "tokens", d, limits);
    if (!view.ok()) {
      if (view.status().code() == absl::StatusCode::kResourceExhausted) {
        return done(absl::ResourceExhaustedError(absl::StrCat(
            view.status().message(), "; at most ", options.max_batch_tokens,
            " tokens per request")));
      }
      return done(view.status());
    }
    const int64_t n = view->dim(0);
    if (n > options.max_batch_tokens) {
      return done(absl::ResourceExhaustedError(absl::StrCat(
          "tokens: ", n, " tokens exceed the limit of ", options.max_batch_tokens,
          " per request; split the batch")));
    }
    std::vector<float> x = common::ViewToFloat(*view);
    if (absl::Status bad = common::CheckTokens(x, n, d, "tokens"); !bad.ok()) return done(bad);
    std::shared_ptr<const RoutingTable> t = Table();
    if (t == nullptr) {
      return done(NotReady());
    }
    auto start = std::chrono::steady_clock::now();
    GatingOptions gopt{config.top_k, config.normalize_topk, options.capacity_factor, {}};
    if (options.overflow == Overflow::kSpill && options.capacity_factor > 0) {
      for (const auto& r : t->placement.replicas) {
        gopt.capacity_scale.push_back(std::max<int>(1, static_cast<int>(r.size())));
      }
    }
    std::shared_ptr<const common::GateWeights> gw = Gate();
    GateParams gp{gw->weight.data(), gw->bias.empty() ? nullptr : gw->bias.data(),
                  config.num_experts, config.d_model};
    GatingResult g = Route(gp, x.data(), n, gopt);
    metrics->Stage("gate", Seconds(start));
    start = std::chrono::steady_clock::now();
    const uint64_t call = dispatcher->Start(
        std::move(t), std::move(x), n, std::move(g), deadline,
        [this, req, resp, n, start, done = std::move(done)](absl::StatusOr<std::vector<float>> y,
                                                            const GatingResult& g,
                                                            const DispatchStats& stats) {
          metrics->Stage("dispatch", Seconds(start));
          // Recovered only when the request was answered: a last try on a shard out of
          // rotation before UNAVAILABLE recovered nothing.
          if (stats.failovers > 0 && y.ok()) metrics->Failovers(stats.failovers);
          if (!y.ok()) return done(y.status());
          // A model whose weights have diverged (trained at too high a rate), or tokens too large
          // for it, answer values that are not finite: said, not served (2026-12-04; a new
          // user's forward wrote NaN and exited 0).
          if (absl::Status finite = common::CheckOutputFinite(*y, config.d_model); !finite.ok()) {
            return done(finite);
          }
          const auto combine = std::chrono::steady_clock::now();
          load_stats->Record(g.expert_load);
          metrics->Tokens(n, g.expert_load, g.dropped, g.spilled);
          resp->set_request_id(req->request_id());
          const common::WireType out_type = req->tokens().dtype() == v1::BFLOAT16
                                                ? common::WireType::kBFloat16
                                                : common::WireType::kFloat32;
          common::EncodeTensor(*y, {n, config.d_model}, out_type, resp->mutable_output());
          if (req->return_routing()) {
            v1::Routing* r = resp->mutable_routing();
            r->set_top_k(config.top_k);
            r->mutable_expert_ids()->Add(g.expert_ids.begin(), g.expert_ids.end());
            r->mutable_weights()->Add(g.weights.begin(), g.weights.end());
          }
          v1::RoutingStats* s = resp->mutable_stats();
          s->set_dropped_assignments(g.dropped);
          s->set_load_balance_loss(g.load_balance_loss);
          s->set_router_z_loss(g.router_z_loss);
          metrics->Stage("combine", Seconds(combine));
          done(absl::OkStatus());
        });
    if (cancel != nullptr) cancel->Started(call);
  }

  // Whether the call carries the bearer token (always, when none is configured); refusals are
  // counted by reason.
  bool Authorized(const grpc::CallbackServerContext* ctx) {
    if (options.auth_token.empty()) return true;
    const common::AuthResult r = common::CheckBearer(ctx->client_metadata(), options.auth_token);
    if (r == common::AuthResult::kOk) return true;
    metrics->AuthRefused(r == common::AuthResult::kMissing ? "missing_token" : "wrong_token");
    return false;
  }
  static grpc::Status Unauthenticated() {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing or wrong bearer token: moe-client takes it from "
                        "--auth-token-file F (other clients send the header authorization: "
                        "Bearer <token>)");
  }

  // How a stream ends when the router goes away: the client resends what was not answered.
  static grpc::Status GoingAway() {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "router is shutting down; send the requests not answered on this stream "
                        "to another router");
  }

  // The deadline the client set (for a stream, the stream's), on MonotonicNow's clock.
  static absl::Time ClientDeadline(grpc::CallbackServerContext* ctx) {
    return common::FromWallDeadline(ctx->deadline());
  }
  // A request's deadline: the client's, and at most --timeout-s from now (also the deadline of
  // one that comes without any, and of each request on a stream). Made from the very value
  // that NameCap is given as the client's, which a second conversion would not equal.
  absl::Time Capped(absl::Time client_deadline) const {
    return std::min(client_deadline, common::MonotonicNow() + options.default_timeout);
  }

  // A placement load's timeout: five minutes (a copy of a large expert from a busy peer), or the
  // time a call with `deadline` has left, if less (none left: the load fails at once).
  static absl::Duration LoadTimeout(absl::Time deadline) {
    return std::min(absl::Minutes(5), deadline - common::MonotonicNow());
  }

  // Whether a call's deadline (MonotonicNow's clock) has passed. A gRPC call given the time left
  // until it may end a hair before it on this clock (absl::Now() and the steady clock are read
  // apart): within a millisecond counts.
  static bool Passed(absl::Time deadline) {
    return deadline != absl::InfiniteFuture() &&
           common::MonotonicNow() + absl::Milliseconds(1) >= deadline;
  }

  // How long a Rebalance that comes without a deadline may run (its waits and loads): not
  // --timeout-s, which a large model's copies can outlast, but not for good either, so that
  // calls whose clients have gone do not hold the admin pool.
  static constexpr absl::Duration kRebalanceWithoutDeadline = absl::Minutes(10);

  // DEADLINE_EXCEEDED of a request whose deadline Capped shortened says so: the client set
  // a longer one (or none), and the message would otherwise blame it.
  absl::Status NameCap(absl::Status st, absl::Time client_deadline, absl::Time used) const {
    if (st.code() != absl::StatusCode::kDeadlineExceeded || client_deadline <= used) return st;
    return absl::DeadlineExceededError(
        absl::StrCat(st.message(), " (the router gives one request at most --timeout-s, ",
                     absl::FormatDuration(options.default_timeout), ")"));
  }

  std::shared_ptr<ShardClient> ClientFor(const std::string& address) {
    std::lock_guard<std::mutex> lock(clients_mu);
    auto it = clients.find(address);
    if (it != clients.end()) return it->second;
    auto on_change = [this, address](bool up) { metrics->SetShardUp(address, up); };
    auto c = options.shard_factory ? options.shard_factory(address, on_change)
                                   : std::make_shared<GrpcShardClient>(
                                         address, options.limits, on_change,
                                         absl::Milliseconds(250), model_fingerprint, lease_epochs);
    // Not on one made during shutdown, which clears it on the others (it calls into this).
    if (!shutting_down.load()) c->SetStillNeeded([this, address] { return StillNeeded(address); });
    clients[address] = c;
    // One made during shutdown (the control loop read the membership meanwhile) starts out
    // cancelled: DoShutdown set shutting_down before it read `clients`.
    if (shutting_down.load()) c->CancelAdminCalls();
    return c;
  }

  // The shards the next placement spreads over: --shards, or the coordinator's members.
  // `status_timeout`: how long a shard whose model is not known to be this router's is asked.
  // `settling` (may be null) is set when the coordinator started less than a lease ago: a shard
  // it does not list may only not have registered again yet.
  absl::StatusOr<std::vector<std::shared_ptr<ShardClient>>> Members(absl::Duration status_timeout,
                                                                    bool* settling = nullptr) {
    std::vector<std::string> addrs = options.shards;
    bool coordinator_settling = false;
    if (addrs.empty()) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      v1::Membership m;
      grpc::Status st = coordinator->ListMembers(&ctx, v1::ListMembersRequest(), &m);
      if (!st.ok()) {
        return CoordinatorTrouble(
            common::FromGrpcStatus(st), "unreachable",
            absl::StrCat("cannot read the shards from coordinator ", options.coordinator, " (",
                         st.error_message(),
                         "); check that it runs and that --coordinator names it"));
      }
      for (const auto& mem : m.members()) addrs.push_back(mem.address());
      std::sort(addrs.begin(), addrs.end());
      if (addrs.empty() && m.settling()) {
        // Started again moments ago: its members have not heartbeated yet (not worth a line).
        return absl::UnavailableError(absl::StrCat("coordinator ", options.coordinator,
                                                   " has just started; no shard has registered "
                                                   "with it yet"));
      }
      if (addrs.empty()) {
        return CoordinatorTrouble(absl::UnavailableError("no shard has joined yet"), "empty",
                                  absl::StrCat("coordinator ", options.coordinator,
                                               " lists no shard yet; start shards with "
                                               "--coordinator ",
                                               options.coordinator));
      }
      if (!coordinator_trouble.empty()) {
        // While it settles the shards are still registering: the count is not the last word.
        common::Log("moe-router: coordinator %s now lists %zu shard(s)%s\n",
                    options.coordinator.c_str(), addrs.size(),
                    m.settling() ? " so far (it started moments ago: more may register within "
                                   "its first lease)"
                                 : "");
        coordinator_trouble.clear();
      }
      coordinator_settling = m.settling();
    }
    if (settling != nullptr) *settling = coordinator_settling;
    std::vector<std::string> forgotten;
    if (!coordinator_settling) {
      // A member that left is forgotten, whatever its model was: one that joins again at the
      // same address may have been started from another checkpoint. Not while the coordinator
      // is settling: one it does not list yet has not left.
      std::lock_guard<std::mutex> lock(models_mu);
      for (auto it = models.begin(); it != models.end();) {
        if (std::find(addrs.begin(), addrs.end(), it->first) != addrs.end()) {
          ++it;
        } else {
          forgotten.push_back(it->first);
          it = models.erase(it);
        }
      }
    }
    // Nor is its client kept off by the dispatcher (clients outlive their members).
    for (const std::string& a : forgotten) ClientFor(a)->SetServesOtherModel(false);
    if (!coordinator_settling) {
      // moe_shard_up follows the members: one that left has no series any more.
      std::vector<std::pair<std::string, bool>> up;
      for (const auto& a : addrs) up.emplace_back(a, ClientFor(a)->healthy());
      metrics->KeepShards(up);
    }
    std::vector<std::shared_ptr<ShardClient>> out;
    for (const auto& a : addrs) {
      std::shared_ptr<ShardClient> c = ClientFor(a);
      if (ServesThisModel(*c, status_timeout)) out.push_back(std::move(c));
    }
    if (out.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no shard serves this router's model (", config.num_experts, " experts of d_model ",
          config.d_model, ", ", options.checkpoint, "); start the shards from its checkpoint"));
    }
    return out;
  }

  // Whether `a` and `b` list the same shards (addresses) in the same order.
  static bool SameShards(const std::vector<std::shared_ptr<ShardClient>>& a,
                         const std::vector<std::shared_ptr<ShardClient>>& b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end(),
                      [](const auto& x, const auto& y) { return x->address() == y->address(); });
  }
  // Whether a shard of `placed` is not among `members` (by address).
  static bool AnyUnlisted(const std::vector<std::shared_ptr<ShardClient>>& placed,
                          const std::vector<std::shared_ptr<ShardClient>>& members) {
    return std::any_of(placed.begin(), placed.end(), [&](const auto& p) {
      return std::none_of(members.begin(), members.end(),
                          [&](const auto& m) { return m->address() == p->address(); });
    });
  }

  // Whether the shard's model is this router's (its number of experts and d_model, from
  // GetStatus): a shard started from another checkpoint would fail every batch sent to it, as
  // if the client's tokens were wrong. Such a shard is left out of the placement, named in the
  // log and as "incompatible" in GetClusterInfo. A shard found compatible is asked again only
  // by Reconcile's status reads (ServesModel), which also catch one restarted from another
  // model; one found incompatible, or never read, is asked on every call, so that it comes back
  // once restarted from the right checkpoint (one found incompatible only while it answers its
  // health checks). One that does not answer keeps its verdict (placed if none yet). A member
  // that leaves is forgotten (Members).
  bool ServesThisModel(ShardClient& c, absl::Duration timeout) {
    auto verdict = [&]() -> std::optional<std::string> {
      std::lock_guard<std::mutex> lock(models_mu);
      auto it = models.find(c.address());
      return it == models.end() ? std::nullopt : std::optional<std::string>(it->second);
    };
    const std::optional<std::string> before = verdict();
    if (before == "") return true;  // read before, and this router's model
    // Found incompatible and not answering its health checks (stopped, or cut off): not asked,
    // as each call would hold the control loop for its timeout, every tick. It is asked again
    // once its health checks are answered.
    if (before.has_value() && !c.answering()) return false;
    absl::StatusOr<v1::ShardStatus> st = c.GetStatus(timeout);
    if (!st.ok()) return !verdict().has_value();  // no verdict yet: placed as before
    return ServesModel(c.address(), *st);
  }

  // Records the model a shard's status names (see ServesThisModel) and says whether it is this
  // router's; a change either way is logged once.
  bool ServesModel(const std::string& address, const v1::ShardStatus& st) {
    const bool shape = st.num_experts() == config.num_experts && st.d_model() == config.d_model;
    // Same shape, other weights (another seed, a saved training, another d_ff): every answer
    // would be a wrong number, not an error (a helper's walk-through, 2026-12-06: accepted).
    // Not compared with a shard older than the field (empty), or one that fingerprints another
    // way (another version prefix: a rollout of mixed builds).
    const bool weights = !common::OtherWeights(st.model_fingerprint(), model_fingerprint);
    const bool same = shape && weights;
    ClientFor(address)->SetServesOtherModel(!same);  // the dispatcher sends it nothing
    std::lock_guard<std::mutex> lock(models_mu);
    auto it = models.find(address);
    if (same) {
      if (it != models.end() && !it->second.empty()) {
        common::Log("moe-router: shard %s serves this router's model again\n", address.c_str());
      }
      models[address] = "";
      return true;
    }
    const std::string why =
        !shape ? absl::StrCat("it serves ", st.num_experts(), " experts of d_model ", st.d_model(),
                              ", this router's ", options.checkpoint, " has ", config.num_experts,
                              " of d_model ", config.d_model)
               : absl::StrCat("it serves experts of other weights than this router's ",
                              options.checkpoint,
                              st.d_ff() != config.d_ff
                                  ? absl::StrCat(" (d_ff ", st.d_ff(), ", not ", config.d_ff, ")")
                                  : std::string(" (another checkpoint of the same shape, or "
                                                "another --activation or --tensor-prefix)"));
    if (it == models.end() || it->second != why) {
      common::Log("moe-router: shard %s left out: %s (start it from the router's checkpoint)\n",
                  address.c_str(), why.c_str());
    }
    models[address] = why;
    return false;
  }

  // ---- placement ----

  v1::Placement ToProto(const Placement& p, bool applied) {
    v1::Placement out;
    out.set_version(p.version);
    out.set_strategy(std::string(StrategyName(p.strategy)));
    if (std::shared_ptr<const RoutingTable> t = Table()) {
      for (const auto& s : t->shards) out.add_shard_addresses(s->address());
    }
    const std::vector<double> load = load_stats->Load();
    for (size_t e = 0; e < p.replicas.size(); ++e) {
      v1::ExpertPlacement* ep = out.add_experts();
      ep->set_expert(static_cast<int>(e));
      for (int s : p.replicas[e]) ep->add_shards(s);
      ep->set_load(load[e]);
    }
    std::vector<bool> up;  // the live table's shards in rotation, when `p` is over them
    if (std::shared_ptr<const RoutingTable> t = Table();
        t != nullptr && static_cast<int>(t->shards.size()) == p.num_shards) {
      up = TakesLoad(*t);
      std::lock_guard<std::mutex> lock(models_mu);
      for (const auto& s : t->shards) out.add_shard_draining(draining_now.count(s->address()) > 0);
    }
    out.set_imbalance(Imbalance(p, load, up));
    for (double l : ShardLoads(p, load, up)) out.add_shard_load(l);
    for (bool u : up) out.add_shard_takes_load(u);
    out.set_applied(applied);
    return out;
  }

  // `usable`: see ComputePlacement (empty: every shard).
  absl::StatusOr<Placement> Propose(Strategy s, int num_shards,
                                    const std::vector<bool>& usable = {},
                                    const std::vector<bool>& drains = {}) {
    return ComputePlacement(s, config.num_experts, num_shards, load_stats->Load(),
                            options.dynamic_slots_per_shard, usable, drains);
  }

  // The shards of `t` that take load, without a call: those in rotation, and those that answer
  // and hold nothing (waiting for experts; Usable also asks them whether they drain, TakesLoad
  // leaves out those known to). A shard that is down takes none.
  static std::vector<bool> InRotation(const RoutingTable& t) {
    std::vector<bool> up;
    for (size_t s = 0; s < t.shards.size(); ++s) {
      const ShardClient& c = *t.shards[s];
      up.push_back(!c.serves_other_model() &&
                   (c.healthy() ||
                    (c.answering() && t.placement.ExpertsOn(static_cast<int>(s)).empty())));
    }
    return up;
  }

  // The shards of `t` whose load the imbalance counts: InRotation's, less those the last tick
  // read as draining and those MoveOffDraining took out that still hold nothing (also on a tick
  // whose status read of it failed). A drained shard answers and holds nothing: counted, it
  // read as an idle shard, and a cluster balanced over the others as imbalanced.
  std::vector<bool> TakesLoad(const RoutingTable& t) {
    std::vector<bool> up = InRotation(t);
    std::lock_guard<std::mutex> lock(models_mu);
    const std::set<std::string> drained = DrainedAndEmptyLocked(t);
    for (size_t s = 0; s < t.shards.size(); ++s) {
      const std::string& a = t.shards[s]->address();
      if (draining_now.count(a) > 0 || drained.count(a) > 0) up[s] = false;
    }
    return up;
  }

  // The addresses of `t`'s shards that drained (drained_off) and hold nothing in `t`: the fixed
  // formulas leave them out while they are out of rotation (Usable, the membership change),
  // and the imbalance does not count them (TakesLoad).
  std::set<std::string> DrainedAndEmpty(const RoutingTable& t) {
    std::lock_guard<std::mutex> lock(models_mu);
    return DrainedAndEmptyLocked(t);
  }
  std::set<std::string> DrainedAndEmptyLocked(const RoutingTable& t) {  // models_mu held
    std::set<std::string> out;
    for (size_t s = 0; s < t.shards.size(); ++s) {
      const std::string& a = t.shards[s]->address();
      if (drained_off.count(a) > 0 && t.placement.ExpertsOn(static_cast<int>(s)).empty()) {
        out.insert(a);
      }
    }
    return out;
  }

  // Where a rebalance from table `t` may place replicas: the shards in rotation, and those that
  // answer NOT_SERVING only because `t` gives them nothing to serve (a shard turns SERVING once
  // it holds an expert: left out, an empty one would stay empty for good). `drains` (if given):
  // the shards that hold nothing in `t` and that the fixed formulas leave out: those that
  // drain, and those that drained and have stopped since (out of rotation and in drained_off:
  // an operator drained the shard, then stopped it; started again, PlaceUndrained places it).
  // `deadline` (MonotonicNow's clock) bounds the status reads of NOT_SERVING shards (500 ms
  // each at most); one not read by then is left out.
  std::vector<bool> Usable(const RoutingTable& t, std::vector<bool>* drains = nullptr,
                           absl::Time deadline = absl::InfiniteFuture()) {
    std::vector<bool> up = InRotation(t);
    std::set<std::string> drained;
    if (drains != nullptr) {
      drains->assign(t.shards.size(), false);
      drained = DrainedAndEmpty(t);
    }
    for (size_t s = 0; s < t.shards.size(); ++s) {
      if (!up[s]) {
        if (drains != nullptr && drained.count(t.shards[s]->address()) > 0) (*drains)[s] = true;
        continue;
      }
      if (t.shards[s]->healthy()) continue;
      // NOT_SERVING and holding nothing: waiting for experts, unless it is draining (it will
      // not serve again: experts placed there could not be served).
      absl::StatusOr<v1::ShardStatus> st = StatusBy(*t.shards[s], deadline);
      up[s] = st.ok() && !st->draining();
      if (drains != nullptr) (*drains)[s] = st.ok() && st->draining();
    }
    return up;
  }

  // A placement of strategy `s` (none: the live table's own) over the live table's shards
  // (returned in `*shards`), on those Usable allows (returned in `*usable` when given; `dynamic`
  // alone keeps to them). Works on a copy of the table: Usable may ask shards (until `deadline`),
  // and a switch waits for every holder of the live one to let go of it.
  absl::StatusOr<Placement> ProposeOverLiveTable(std::optional<Strategy> s,
                                                 std::vector<std::shared_ptr<ShardClient>>* shards,
                                                 std::vector<bool>* usable_out = nullptr,
                                                 Placement* live_out = nullptr,
                                                 absl::Time deadline = absl::InfiniteFuture()) {
    RoutingTable now;
    {
      std::shared_ptr<const RoutingTable> live = Table();
      if (live == nullptr) return absl::UnavailableError("the initial placement is still loading");
      now = *live;
    }
    std::vector<bool> drains;
    const std::vector<bool> usable = Usable(now, &drains, deadline);
    *shards = std::move(now.shards);
    if (usable_out != nullptr) *usable_out = usable;
    if (live_out != nullptr) *live_out = now.placement;  // the placement `*shards` belong to
    return Propose(s.value_or(now.placement.strategy), static_cast<int>(shards->size()), usable,
                   drains);
  }

  // Loads the new replicas everywhere (copied from a live replica once the model has trained,
  // else from the checkpoint), switches, then lets the old ones drain away.
  // `based_on`: the version of the live placement that `next` was worked out over (none for the
  // first placement). When another switch has come in between (an operator's Rebalance, a
  // membership change, the dynamic control loop), `next` is not applied: ABORTED, and nothing
  // changes. It would otherwise undo that switch, or leave out the shards it added.
  // `user`: asked for by a Rebalance call, whose failure is said every time (the control loop
  // tries again, each tick or after the cooldown, and says a failure once per reason).
  // `deadline` (MonotonicNow's clock): the call's. Waiting for another switch, for a training
  // step and for the loads ends by it (DEADLINE_EXCEEDED, nothing applied); the drain after an
  // applied switch does not (see SwitchLocked). `cancelled` (may be null): whether the call's
  // client has cancelled it; then nothing is applied either (CANCELLED). The control loop has
  // neither.
  absl::Status Apply(Placement next, std::vector<std::shared_ptr<ShardClient>> next_shards,
                     std::optional<uint64_t> based_on, bool user = false,
                     absl::Time deadline = absl::InfiniteFuture(),
                     const std::function<bool()>& cancelled = nullptr,
                     bool observe_shards = false) {
    // "over 3 of 4 shards" where some hold nothing (drained, or left empty by the strategy).
    const auto describe = [](const Placement& p, int shards) {
      int holding = 0;
      for (int s = 0; s < shards; ++s) holding += !p.ExpertsOn(s).empty();
      return absl::StrCat(StrategyName(p.strategy), " placement over ",
                          holding < shards ? absl::StrCat(holding, " of ") : "", shards,
                          shards == 1 ? " shard" : " shards");
    };
    const std::string what = describe(next, static_cast<int>(next_shards.size()));
    std::unique_lock<common::TimedMutex> lock(placement_mu, std::defer_lock);
    if (deadline == absl::InfiniteFuture()) {
      lock.lock();
    } else if (!lock.try_lock_for(common::TimeLeft(deadline))) {
      absl::Status st = absl::DeadlineExceededError(
          "another placement change was still running when the call's deadline passed (a switch "
          "loads its new replicas before it applies); nothing was applied");
      common::Log("moe-router: %s not applied, the current placement stays: %s\n", what.c_str(),
                  std::string(st.message()).c_str());
      return st;
    }
    if (cancelled && cancelled()) {
      return absl::CancelledError(
          "the caller cancelled the call while it waited for another placement change; nothing "
          "was applied");
    }
    if (based_on.has_value()) {
      uint64_t live = 0;
      {
        std::shared_ptr<const RoutingTable> t = Table();  // let go of before the switch
        if (t != nullptr) live = t->placement.version;
      }
      if (live != *based_on) {
        return absl::AbortedError(absl::StrCat("the placement changed to version ", live,
                                               " while this one was worked out over ", "version ",
                                               *based_on, "; nothing was applied"));
      }
    }
    absl::Status st =
        SwitchLocked(std::move(next), std::move(next_shards), deadline, cancelled, observe_shards);
    // One line per change for the operator (the placement table is in GetPlacement).
    if (st.ok()) {
      last_not_applied.clear();
      // As applied: a first placement leaves out shards found drained (PlaceWithoutTheDrained).
      const std::shared_ptr<const RoutingTable> live = Table();
      common::Log(
          "moe-router: placement version %llu applied: %s\n",
          static_cast<unsigned long long>(version.load()),
          (live ? describe(live->placement, static_cast<int>(live->shards.size())) : what).c_str());
    } else {
      // The first placement and Reconcile try again every tick: a failure is said once.
      const std::string line = absl::StrCat(
          what, " not applied, ",
          Table() == nullptr ? "the router serves once one is" : "the current placement stays",
          ": ", st.message());
      if (user || line != last_not_applied) {
        common::Log("moe-router: %s\n", line.c_str());
      }
      if (!user) last_not_applied = line;
    }
    return st;
  }

  // The first placement found replicas trained up to `latest_step`: a gate of an earlier step
  // (the checkpoint's, or a kept one the router did not get to write after its last step)
  // serves those experts with a gate they were not trained with. Said once, at start.
  void WarnIfGateBehind(uint64_t latest_step) {
    if (latest_step <= gate_step || gate_warned) return;
    gate_warned = true;  // the first placement may be tried many times
    // gate_step 0: no kept gate is served (none in --state-dir, or one of another checkpoint's):
    // "lags" would blame a file that is not there (a helper's walk-through, 2026-12-06).
    const std::string warning =
        gate_state_path.empty() || gate_step == 0
            ? absl::StrCat(
                  "the shards' experts were trained, but this router serves its checkpoint's "
                  "gate, not the gate trained with them (",
                  gate_state_path.empty()
                      ? std::string("a router keeps that only with --state-dir")
                      : absl::StrCat(gate_state_path, " keeps none trained from ",
                                     options.checkpoint),
                  "); give the router the --state-dir of the one that trained them, or start "
                  "the cluster from a checkpoint written by save-checkpoint")
            : absl::StrCat(
                  "the shards' experts carry a later training step than the gate kept "
                  "in ",
                  gate_state_path,
                  " (the router that trained them stopped before it kept its gate): the "
                  "gate lags them by at least one step");
    common::Log("moe-router: warning: %s\n", warning.c_str());
    // Also in GetClusterInfo: an operator who reads only `moe-client info` or `train` sees it
    // (a helper's walk-through, 2026-12-06).
    std::lock_guard<std::mutex> lock(models_mu);
    gate_warning = warning;
  }

  // At start, with --state-dir: the gate kept there by an earlier router replaces the
  // checkpoint's `gate`; none kept leaves it. A kept gate of another shape is refused: it
  // belongs to another model.
  absl::Status ReadKeptGate(common::GateWeights* gate) {
    std::error_code ec;
    std::filesystem::create_directories(options.state_dir, ec);
    if (ec || !std::filesystem::is_directory(options.state_dir, ec)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--state-dir ", options.state_dir, " is not a directory the router can use",
          ec ? absl::StrCat(": ", ec.message()) : ""));
    }
    gate_state_path = (std::filesystem::path(options.state_dir) / "gate.safetensors").string();
    // A router killed while writing its gate leaves the write's temporary file.
    if (const int removed = RemoveUnfinishedGateWrites(options.state_dir, absl::Seconds(2));
        removed > 0) {
      common::Log(
          "moe-router: --state-dir %s: removed %d temporary file(s) of writes that did "
          "not finish (the router stopped while writing)\n",
          options.state_dir.c_str(), removed);
    }
    if (!std::filesystem::exists(gate_state_path, ec)) return absl::OkStatus();
    ASSIGN_OR_RETURN(auto reader, common::SafetensorsReader::Open(gate_state_path));
    gate_seen_epoch = std::max(gate_seen_epoch, KeptGateMarkOf(reader->metadata()).epoch);
    const std::vector<int64_t> weight_shape = {config.num_experts, config.d_model};
    const std::vector<int64_t> bias_shape = {config.num_experts};
    absl::StatusOr<std::vector<float>> weight = reader->ReadFloat("gate.weight", &weight_shape);
    absl::StatusOr<std::vector<float>> bias = std::vector<float>();
    if (!gate->bias.empty()) bias = reader->ReadFloat("gate.bias", &bias_shape);
    if (!weight.ok() || !bias.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          gate_state_path, " keeps the gate of another model than ", options.checkpoint, " (",
          (weight.ok() ? bias : weight).status().message(),
          "): remove it, or give the checkpoint it was trained from"));
    }
    for (const auto& [name, v] : {std::pair{"gate.weight", &*weight}, {"gate.bias", &*bias}}) {
      if (const int64_t i = common::FirstNonFinite(*v); i >= 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            gate_state_path, " keeps a gate that is not finite (", name, "[", i,
            "]): the model it was trained with diverged; remove it to serve the checkpoint's "
            "gate"));
      }
    }
    uint64_t step = 0, done = 0;
    const auto& meta = reader->metadata();
    if (meta.count("train_step") == 0 || !absl::SimpleAtoi(meta.at("train_step"), &step) ||
        meta.count("steps_done") == 0 || !absl::SimpleAtoi(meta.at("steps_done"), &done) ||
        meta.count("checkpoint_gate") == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(gate_state_path,
                       " lacks the train_step, steps_done and checkpoint_gate of its gate: remove "
                       "it"));
    }
    if (meta.at("checkpoint_gate") != checkpoint_gate_print) {
      // The checkpoint's own gate where it was saved from this training (started again from a
      // save-checkpoint file with the --state-dir of the cluster that wrote it): nothing to say.
      // Said once: a router that takes the lease reads the file again.
      common::GateWeights kept;
      kept.weight = *weight;
      kept.bias = *bias;
      if (common::GateFingerprint(kept) != checkpoint_gate_print && !gate_other_checkpoint_said) {
        gate_other_checkpoint_said = true;
        common::Log(
            "moe-router: the gate kept in %s was trained from another checkpoint than "
            "%s (another model's, or steps trained after this checkpoint was saved from it: "
            "those are not kept); serving the checkpoint's gate (the next training step "
            "replaces the file)\n",
            gate_state_path.c_str(), options.checkpoint.c_str());
      }
      return absl::OkStatus();
    }
    // Written since 2026-12-04: "expert:step,..." (an older file has none, and nothing is known).
    std::map<int, uint64_t> expert_steps;
    if (meta.count("expert_steps") > 0 && !meta.at("expert_steps").empty()) {
      for (absl::string_view item : absl::StrSplit(meta.at("expert_steps"), ',')) {
        std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(item, ':');
        int e = -1;
        uint64_t at = 0;
        if (!absl::SimpleAtoi(kv.first, &e) || !absl::SimpleAtoi(kv.second, &at) || e < 0 ||
            e >= config.num_experts) {
          // Only a check leans on it: the gate is served all the same.
          common::Log(
              "moe-router: %s has expert_steps that cannot be read (\"%s\"); serving "
              "its gate without them (an expert that lost its training is not told)\n",
              gate_state_path.c_str(), std::string(item).c_str());
          expert_steps.clear();
          break;
        }
        expert_steps[e] = at;
      }
    }
    gate->weight = std::move(*weight);
    if (!gate->bias.empty()) gate->bias = std::move(*bias);
    gate_step = step;
    // The file counts every step since the checkpoint, this router's own among them where it
    // is read again after this router trained (TakeOverAgain: the other router read them).
    restored_steps = done - std::min(done, steps_done.load());
    reached_step = std::move(expert_steps);
    common::Log("moe-router: serving the gate kept in %s (after %llu training steps)\n",
                gate_state_path.c_str(), static_cast<unsigned long long>(done));
    return absl::OkStatus();
  }

  // Before the first placement: a router that stood by while another trained, the two sharing
  // a --state-dir (a volume both mount), takes over with the gate that router kept there, not
  // the one it read at its own start. Read again where the file's step is another than the
  // gate's; a file that cannot be read is said once per reason, one that cannot be served once
  // per step, and the gate it has stays. Also at a regrant (TakeOverAgain, `regrant`): then
  // a file that cannot be read or served leaves the gate's epoch as it was (KeepGate does not
  // write over a gate kept since that it could not read), and the error (DATA_LOSS) says why;
  // the training lock is then waited for kTrainWait at most (UNAVAILABLE: the control thread's
  // next tick tries again).
  absl::Status ReadKeptGateAgain(bool regrant = false) {
    if (gate_state_path.empty()) return absl::OkStatus();
    std::unique_lock<common::TimedMutex> t(train_mu, std::defer_lock);
    if (!regrant) {
      t.lock();
    } else if (!t.try_lock_for(kTrainWait)) {
      return absl::UnavailableError("a training call held the training lock");
    }
    const uint64_t seen_before = gate_seen_epoch;
    auto failed = [&](absl::string_view why) {
      if (regrant) gate_seen_epoch = seen_before;
      return absl::DataLossError(why);
    };
    // From here the gate this router serves is the cluster's as of its lease epoch: a file that
    // an earlier holder keeps later under an epoch up to this one (it stalled before its write)
    // is written over by this router's next step; another router's under a later epoch means
    // that router has held the lease since (KeepGate).
    gate_seen_epoch = std::max(gate_seen_epoch, lease_epochs->held.load());
    uint64_t step = 0;
    {
      std::error_code ec;
      if (!std::filesystem::exists(gate_state_path, ec)) return absl::OkStatus();  // none kept
      absl::StatusOr<std::unique_ptr<common::SafetensorsReader>> r =
          common::SafetensorsReader::Open(gate_state_path);
      if (!r.ok()) {
        const std::string why(r.status().message());
        if (why != gate_unreadable_said) {
          common::Log(
              "moe-router: the gate kept in %s cannot be read (%s); serving the gate "
              "it has\n",
              gate_state_path.c_str(), why.c_str());
        }
        gate_unreadable_said = why;
        return failed(absl::StrCat("the gate kept in ", gate_state_path, " cannot be read: ", why));
      }
      const auto& meta = (*r)->metadata();
      const auto it = meta.find("train_step");
      if (it == meta.end() || !absl::SimpleAtoi(it->second, &step)) step = UINT64_MAX;
      const KeptGateMark mark = KeptGateMarkOf(meta);
      gate_seen_epoch = std::max(gate_seen_epoch, mark.epoch);
      // This router's own (router ids are one per process): its gate is that one or later (a
      // step whose gate it failed to write left an older file, which is not served again).
      if (mark.kept_by == router_id) return absl::OkStatus();
    }
    // Another step than the gate's: steps are numbered by the router that took them, so a later
    // one may carry a lower number (Trainer::NumberPast). A step read before (gate_read_again)
    // is not read again: served, or not (said once).
    if (step == gate_step) return absl::OkStatus();
    if (step == gate_read_again) {
      return gate_read_again_ok
                 ? absl::OkStatus()
                 : failed(absl::StrCat("the gate kept in ", gate_state_path, " is not served"));
    }
    gate_read_again = step;
    gate_read_again_ok = false;
    common::GateWeights g = *Gate();
    if (const absl::Status st = ReadKeptGate(&g); !st.ok()) {
      common::Log(
          "moe-router: the gate kept in %s changed while this router %s, and is not "
          "served: %s; serving the gate it has\n",
          gate_state_path.c_str(), regrant ? "went without the lease" : "stood by",
          std::string(st.message()).c_str());
      return failed(
          absl::StrCat("the gate kept in ", gate_state_path, " is not served: ", st.message()));
    }
    gate_read_again_ok = true;
    std::lock_guard<std::mutex> gl(gate_mu);
    gate = std::make_shared<const common::GateWeights>(std::move(g));
    return absl::OkStatus();
  }
  // Granted the lease again under another epoch than the one it held (PlacementLease::Ask): this
  // router went a whole lease without renewing it, and another router may have held the lease
  // meanwhile, moved experts, trained them and kept its gate (or the coordinator restarted).
  // Until it has caught up as at a takeover (TakeOverAgain, at the control loop's next tick),
  // its table and gate may not be the shards': training steps, saves, rebalances and the
  // control loop's own changes wait. Counted, so that a grant during a catch-up is not lost.
  std::atomic<uint64_t> regrants_caught_up{0};  // PlacementLease::regrants() caught up with
  uint64_t Regrants() const { return lease == nullptr ? 0 : lease->regrants(); }
  bool RegrantPending() const { return Regrants() != regrants_caught_up.load(); }
  // After the lease was granted again under a new epoch (RegrantPending), as at a takeover:
  // the kept gate is read again (another router's training is served from then on), and what
  // the members hold is read (ObserveShards, which also numbers this router's steps past the
  // shards'). Where they are the table's shards, each that answers holds at least the table's
  // part, no replica outside it is trained past the table's, and none numbers a later
  // placement version than the latest this router had numbered, no other router placed in a
  // way that matters, and nothing more is done (a coordinator restart gives a new epoch too).
  // Otherwise the router's placement (the strategy's for the members, where they changed) is
  // applied starting from what the shards hold, under a version past theirs: what another router
  // moved is copied back from the replicas it left (trained ones included), and what it added
  // is unloaded. Tried each tick; after kRegrantPatience with the lease, a gate not read is
  // given up (the router serves the gate it has), and shards not caught up with too (the router
  // goes on from its table), each said in a line. Control thread.
  static constexpr absl::Duration kRegrantPatience = absl::Seconds(10);
  void TakeOverAgain() {
    const uint64_t regrants = Regrants();
    if (regrant_seen != regrants) {
      regrant_seen = regrants;
      // The latest version this router had numbered (a switch that failed raised the shards it
      // reached to it): another router numbers past it where this router's switch to it told
      // the shards (one that changed nothing there did not: CatchUpWithShards).
      regrant_own_version = version.load();
      regrant_gate_read = false;
      regrant_shards_done = false;
      regrant_waits_said = false;
      regrant_since = absl::InfinitePast();  // a grant's patience is its own
    }
    if (!MayPlaceNow()) {
      regrant_since = common::MonotonicNow();  // the patience counts from the lease's return
      return;
    }
    if (regrant_since == absl::InfinitePast()) regrant_since = common::MonotonicNow();
    const bool patience_left = common::MonotonicNow() - regrant_since < kRegrantPatience;
    if (const std::shared_ptr<const RoutingTable> t = Table(); t != nullptr) {
      // The shards fence the router before this one at once, as a first placement does first.
      SendLeaseEpoch(t->shards, /*at_tick=*/true);
    }
    // The gate, then the shards, each tried every tick until done. A lock held (a step or a
    // placement change begun before the grant) is waited for next tick, without end: what
    // holds it ends, and training waits meanwhile anyway. A gate that cannot be read or served
    // is given up once the patience ends (the router serves the gate it has; the gate fence
    // stops it at its next step if another router's is kept there), and so are shards that
    // cannot be caught up with (it goes on from its table).
    absl::Status gate = absl::OkStatus();
    if (!regrant_gate_read) {
      gate = ReadKeptGateAgain(/*regrant=*/true);
      regrant_gate_read = gate.ok();
    }
    // Waiting for a lock past the patience is said once: training stays refused meanwhile.
    auto waits = [&](const absl::Status& why) {
      if (patience_left || regrant_waits_said) return;
      regrant_waits_said = true;
      common::Log(
          "moe-router: granted the placement lease under a new epoch, this router still "
          "waits to catch up with the kept gate and the shards (%s, by a call begun "
          "before the grant); training steps, saves and rebalances are refused until "
          "it ends\n",
          std::string(why.message()).c_str());
    };
    if (absl::IsUnavailable(gate)) waits(gate);
    if (!regrant_shards_done) {
      bool busy = false;
      bool placed_again = false;
      const absl::Status st = CatchUpWithShards(&busy, &placed_again);
      if (!st.ok()) {
        if (busy) {
          waits(st);
        } else if (!patience_left) {
          const bool gate_failed = !regrant_gate_read && !absl::IsUnavailable(gate);
          GiveUpCatchingUp(regrants,
                           gate_failed ? absl::StrCat(st.message(), "; ", gate.message())
                                       : std::string(st.message()),
                           /*gate=*/!regrant_gate_read, /*shards=*/true);
        }
        return;
      }
      regrant_shards_done = true;
      if (placed_again) {
        common::Log(
            "moe-router: granted the placement lease under a new epoch, this router "
            "found the shards holding other than its table (placed by another router "
            "meanwhile, or restarted): its placement was applied again over what they "
            "hold\n");
      }
    }
    if (regrant_gate_read) {
      CaughtUp(regrants);
    } else if (!absl::IsUnavailable(gate) && !patience_left) {
      GiveUpCatchingUp(regrants, std::string(gate.message()), /*gate=*/true, /*shards=*/false);
    }
  }
  // The shards' part of TakeOverAgain, one try: OK once the members hold this router's
  // placement (`placed_again`: by a switch). `busy`: a lock was held (tried again next tick).
  absl::Status CatchUpWithShards(bool* busy, bool* placed_again) {
    // The shards now, as a takeover reads them: one may have joined or left while this router
    // went without the lease (one that left and held the only trained replica of an expert
    // fails the read until the coordinator lets it go, a lease on).
    bool settling = false;
    absl::StatusOr<std::vector<std::shared_ptr<ShardClient>>> members =
        Members(absl::Milliseconds(500), &settling);
    Placement placed;
    std::vector<std::shared_ptr<ShardClient>> shards;
    uint64_t based_on = 0;
    {
      std::unique_lock<common::TimedMutex> l(placement_mu, std::defer_lock);
      if (!l.try_lock_for(kTrainWait)) {
        *busy = true;
        return absl::UnavailableError("a placement change held its lock");
      }
      // As in SwitchLocked: ObserveShards reads and numbers the steps under the training lock.
      std::unique_lock<common::TimedMutex> train_lock(train_mu, std::defer_lock);
      if (!train_lock.try_lock_for(kTrainWait)) {
        *busy = true;
        return absl::UnavailableError("a training call held the training lock");
      }
      // Not held through the switch: requests routed on the table are waited for by its use
      // count before what the switch unloads goes.
      const std::shared_ptr<const RoutingTable> t = Table();
      if (t == nullptr) {  // the lease lost meanwhile: asked again
        *busy = true;
        return absl::UnavailableError("no placement");
      }
      // The table's shards where the members cannot be read, or where the coordinator has just
      // started and does not list them all yet (as in Reconcile: one not listed yet has not
      // left).
      shards = t->shards;
      if (members.ok() && !(settling && AnyUnlisted(t->shards, *members))) shards = *members;
      const bool same_shards = SameShards(shards, t->shards);
      bool trained = false;
      std::vector<std::pair<std::string, std::string>> unread;
      std::set<std::string> draining;
      std::vector<std::vector<uint64_t>> steps;
      ASSIGN_OR_RETURN(const RoutingTable seen,
                       ObserveShards(shards, &trained, &unread, &draining, &steps));
      if (trained) seen_trained.store(true);
      auto answered = [&](const std::string& address) {
        return std::none_of(unread.begin(), unread.end(),
                            [&](const auto& u) { return u.first == address; });
      };
      // The same where every shard that answered holds at least the table's replicas on it.
      // More is no sign of another router: this router's own switch may not have unloaded yet
      // what it replaced (it does not while the lease is not renewed: a coordinator started
      // again), and the control loop unloads extras (UnloadExtras, which keeps one trained past
      // the placed replicas). But not where a replica outside the table carries a later step
      // than the table's replicas of its expert: another router trained it there (before its
      // own switch unloaded the replicas this table lists), and the table would serve the
      // weights of before. A later version on a shard is not the only sign of another router:
      // one may number its placement as this one did (a switch that changes nothing on a shard
      // does not tell it its version).
      bool same = same_shards && seen.placement.version <= regrant_own_version;
      for (int e = 0; same && e < config.num_experts; ++e) {
        uint64_t placed_step = 0, latest_step = 0;
        for (size_t k = 0; k < seen.placement.replicas[e].size(); ++k) {
          // Not the update of a step the others aborted (PlanStaleReplicas gives it back).
          if (trainer != nullptr && trainer->AbortedUpdate(steps[e][k])) continue;
          latest_step = std::max(latest_step, steps[e][k]);
          if (t->placement.Holds(seen.placement.replicas[e][k], e)) {
            placed_step = std::max(placed_step, steps[e][k]);
          }
        }
        same = latest_step <= placed_step;
      }
      for (int s = 0; same && s < static_cast<int>(t->shards.size()); ++s) {
        const std::vector<int> held = seen.placement.ExpertsOn(s);
        const std::vector<int> placed_here = t->placement.ExpertsOn(s);
        same = !answered(t->shards[s]->address()) ||
               std::includes(held.begin(), held.end(), placed_here.begin(), placed_here.end());
      }
      if (same) return absl::OkStatus();
      based_on = t->placement.version;
      if (same_shards) {
        placed = t->placement;  // a dynamic one as tuned
      } else {
        // Over other shards, the strategy's placement for those that answer, as a membership
        // change makes it: a draining one is no place for experts, and one that holds nothing
        // any more is left out of the fixed formulas (Reconcile's `reachable` and
        // `drained_empty`).
        std::vector<std::shared_ptr<ShardClient>> over;
        std::vector<bool> usable;
        std::vector<bool> drained_empty;
        for (int s = 0; s < static_cast<int>(shards.size()); ++s) {
          const std::string& address = shards[s]->address();
          if (!answered(address)) continue;
          const bool drains = draining.count(address) > 0;
          over.push_back(shards[s]);
          usable.push_back(!drains);
          drained_empty.push_back(drains && seen.placement.ExpertsOn(s).empty());
        }
        shards = std::move(over);
        ASSIGN_OR_RETURN(placed, Propose(t->placement.strategy, static_cast<int>(shards.size()),
                                         usable, drained_empty));
      }
    }
    RETURN_IF_ERROR(Apply(std::move(placed), std::move(shards), based_on, /*user=*/false,
                          absl::InfiniteFuture(), nullptr, /*observe_shards=*/true));
    *placed_again = true;
    return absl::OkStatus();
  }
  void CaughtUp(uint64_t regrants) {
    regrants_caught_up = regrants;
    regrant_since = absl::InfinitePast();
  }
  // Said before the catch-up counts as done (a step it let through may end first). `gate`,
  // `shards`: what was not caught up with.
  void GiveUpCatchingUp(uint64_t regrants, const std::string& why, bool gate, bool shards) {
    const char* what = gate && shards ? "the kept gate and the shards"
                       : gate         ? "the kept gate"
                                      : "the shards";
    const char* from = gate && shards ? "table and gate" : gate ? "gate" : "table";
    common::Log(
        "moe-router: granted the placement lease under a new epoch, this router did "
        "not catch up with %s within %s (%s): it goes on from its %s; if another "
        "router placed or trained meanwhile, restart this router once the shards "
        "answer and the kept gate can be read (it then reads both again)\n",
        what, absl::FormatDuration(kRegrantPatience).c_str(), why.c_str(), from);
    CaughtUp(regrants);
  }
  // Control thread: the grant count the four below are of; since when the catch-up has had the
  // lease (InfinitePast: not yet); the version this router had numbered at the grant; whether
  // the kept gate was read again, and the shards caught up with, for this grant.
  uint64_t regrant_seen = 0;
  absl::Time regrant_since = absl::InfinitePast();
  uint64_t regrant_own_version = 0;
  bool regrant_gate_read = false;
  bool regrant_shards_done = false;
  bool regrant_waits_said = false;  // the line of a wait past the patience
  absl::Status RegrantRefusal() const {
    return absl::UnavailableError(
        "this router was granted the placement lease under a new epoch (another router may "
        "have placed and trained the shards while this one went a lease without it, or the "
        "coordinator restarted), and is reading what the shards hold now; try again in a "
        "second");
  }
  // train_mu: the kept gate's step ReadKeptGateAgain last read, and why it last could not.
  uint64_t gate_read_again = 0;
  bool gate_read_again_ok = false;  // train_mu: whether it was served
  // train_mu (and Start): the lease epoch as of which this router's gate is the cluster's: of
  // the kept gate it last read or wrote, and at its takeover its own (KeepGate: another
  // router's gate kept under a later one means that router has held the lease since).
  uint64_t gate_seen_epoch = 0;
  std::string gate_unreadable_said;

  // Writes the gate of training step `step` to --state-dir (whole or not at all). A failure is
  // told and does not fail the step, which the shards have committed.
  void KeepGate(const common::GateWeights& g, uint64_t step) {
    if (gate_state_path.empty()) return;
    // A router that stalled since the step committed may have lost its lease to a router that
    // shares the directory and trains on: its gate would go over that one's. Asked again where
    // the lease is not current; kept unless another router holds it now (a coordinator that
    // does not answer, after a step whose verdict was settled without it, does not stop it).
    if (!MayPlace()) MayPlaceNow();
    if (LeaseLost()) {
      common::Log(
          "moe-router: the gate of training step %llu was not kept in %s: another "
          "router holds the placement lease now\n",
          static_cast<unsigned long long>(step), gate_state_path.c_str());
      return;
    }
    common::SafetensorsWriter w;
    w.SetMetadata("train_step", absl::StrCat(step));
    w.SetMetadata("steps_done", absl::StrCat(restored_steps + steps_done.load()));
    w.SetMetadata("checkpoint_gate", checkpoint_gate_print);
    std::vector<std::string> expert_steps;
    for (const auto& [e, at] : reached_step) {
      if (at > 0) expert_steps.push_back(absl::StrCat(e, ":", at));
    }
    w.SetMetadata("expert_steps", absl::StrJoin(expert_steps, ","));
    absl::Status st = w.AddF32("gate.weight", {config.num_experts, config.d_model}, g.weight);
    if (st.ok() && !g.bias.empty()) st = w.AddF32("gate.bias", {config.num_experts}, g.bias);
    // Not over a gate another router kept since this one last read or wrote the file
    // (router/kept_gate.h): that router held the lease while this one stalled. A later epoch
    // in this router's own file (or the one it read when it took over) is its coordinator's
    // clock gone behind in a restart: asked past that epoch (as past a shard's), the
    // coordinator raises the holder's epoch, and the gate is kept.
    for (int attempt = 0; st.ok(); ++attempt) {
      uint64_t later = 0;
      const uint64_t epoch = lease_epochs->held.load();
      st = WriteKeptGate(gate_state_path, w, epoch, router_id, gate_seen_epoch, absl::Seconds(2),
                         &later);
      if (st.ok()) gate_seen_epoch = std::max(gate_seen_epoch, epoch);
      if (absl::IsAborted(st) && coordinator != nullptr) {
        // Another router kept its gate since this one last looked: it held the lease while
        // this one stalled, and trained. This router's gate and step numbers are not the
        // cluster's any more; it stops, and started again reads that router's gate.
        lease->Lose(absl::StrCat("the gate kept in ", gate_state_path, ": ", st.message(),
                                 ": this router stops; start it again to take the kept gate"));
      }
      if (!absl::IsFailedPrecondition(st) || later == 0 || attempt > 0) break;
      lease_epochs->See(later);
      if (!MayPlaceNow() || lease_epochs->held.load() <= later) break;
      st = absl::OkStatus();
    }
    if (!st.ok()) {
      common::Log("moe-router: the gate of training step %llu was not kept in %s: %s\n",
                  static_cast<unsigned long long>(step), gate_state_path.c_str(),
                  std::string(st.message()).c_str());
    }
  }

  // Writes the kept gate again, for the experts' training steps kept with it: once an expert's
  // training was found lost, a router started again does not report it again. Nothing when no
  // trained gate is kept (no step was read back at start either).
  void KeepStepsWithGate() {
    if (gate_step == 0) return;
    KeepGate(*Gate(), gate_step);
  }

  // What `shards` hold now, as a routing table of this router's first placement's "old" one:
  // each expert on the shards that have it READY, at the highest placement version any shard
  // has seen. From it the first placement
  //   - numbers its version past every shard's (a shard refuses a version older than its own,
  //     so a restarted router counting from 1 again was refused until it had counted up);
  //   - leaves in place what a shard already holds, copies what moves from a live replica when
  //     the shards were trained (`*trained` is set when any replica has a committed step), and
  //     unloads what the new placement drops;
  //   - brings replicas behind their expert's latest step up to it (ReloadStale).
  // While a shard has experts LOADING (a fresh shard of `--experts all`, one reading its
  // --state-dir, or a copy an earlier router asked for), what it holds is not known yet: an
  // expert being read from --state-dir may carry training no other replica has. So the shards
  // are read again every 100 ms until none is loading and each that holds experts serves
  // (UNAVAILABLE after 10 s: the first placement is tried again). A shard whose status cannot
  // be read makes the placement wait when the others were trained: it may hold the only
  // trained replica of an expert (UNAVAILABLE, tried again). Otherwise one that does not answer
  // at all is listed in `*unread_out` (address, why), and one that answers counts as holding
  // nothing. `*draining_out`: the shards read draining.
  // `steps_out`, where given: each replica's training step, in the shape of the table's
  // `placement.replicas`.
  absl::StatusOr<RoutingTable> ObserveShards(
      const std::vector<std::shared_ptr<ShardClient>>& shards, bool* trained,
      std::vector<std::pair<std::string, std::string>>* unread_out,
      std::set<std::string>* draining_out,
      std::vector<std::vector<uint64_t>>* steps_out = nullptr) {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    // Kept across passes: a shard seen loading and unreadable since is still waited for, and
    // training seen once (on an expert since unloaded or unreadable) is not forgotten.
    std::set<std::string> seen_loading;
    uint64_t latest_step = 0;  // the latest training step any replica holds
    while (true) {
      RoutingTable seen;
      seen.shards = shards;
      seen.placement.strategy = strategy.load();
      seen.placement.num_shards = static_cast<int>(shards.size());
      seen.placement.replicas.assign(config.num_experts, {});
      std::vector<std::vector<uint64_t>> steps(config.num_experts);
      std::vector<std::pair<std::string, std::string>> unread;  // address, why
      std::set<std::string> draining;
      std::string loading;
      for (int s = 0; s < static_cast<int>(shards.size()); ++s) {
        const std::string& address = shards[s]->address();
        absl::StatusOr<v1::ShardStatus> st = shards[s]->GetStatus(absl::Seconds(2));
        if (!st.ok()) {
          unread.emplace_back(address, std::string(st.status().message()));
          if (seen_loading.count(address) && loading.empty()) loading = address;
          continue;
        }
        seen.placement.version =
            std::max<uint64_t>(seen.placement.version, st->placement_version());
        if (st->draining()) draining.insert(address);
        // Loading: an expert LOADING, or experts READY on a shard not serving yet (its initial
        // load is about to end; going live before it serves would leave them unserved). Not a
        // draining shard, nor one whose load failed (neither will turn SERVING by itself).
        int ready = 0;
        bool failed = false, is_loading = false;
        for (const auto& e : st->experts()) {
          ready += e.state() == v1::ExpertStatus::READY;
          failed = failed || e.state() == v1::ExpertStatus::FAILED;
          is_loading = is_loading || e.state() == v1::ExpertStatus::LOADING;
        }
        is_loading = is_loading || (ready > 0 && !st->serving() && !st->draining() && !failed);
        if (is_loading) {
          seen_loading.insert(address);
          if (loading.empty()) loading = address;
        }
        for (const auto& e : st->experts()) {
          if (e.state() != v1::ExpertStatus::READY || e.expert() < 0 ||
              e.expert() >= config.num_experts) {
            continue;
          }
          latest_step = std::max<uint64_t>(latest_step, e.trained_step());
          seen.placement.replicas[e.expert()].push_back(s);  // s ascending: sorted
          steps[e.expert()].push_back(e.trained_step());
        }
        // ReloadStale reads the shards in rotation: see those holding experts as they are now.
        if (!shards[s]->healthy()) shards[s]->CheckHealthNow();
      }
      if (!loading.empty()) {
        if (std::chrono::steady_clock::now() >= give_up || shutting_down.load()) {
          return absl::UnavailableError(absl::StrCat(
              loading, " is still loading experts; the first placement waits until what every "
              "shard holds is known"));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      *trained = *trained || latest_step > 0;
      WarnIfGateBehind(latest_step);
      if (trainer != nullptr) trainer->NumberAfterAnotherRouter(std::max(latest_step, gate_step));
      if (*trained && !unread.empty()) {
        return absl::UnavailableError(absl::StrCat(
            "the shards were trained, and what ", unread.front().first, " holds cannot be read: "
            "it may hold the only trained replica of an expert"));
      }
      // Of those not read, the ones that do not answer at all (nor a health check) are for the
      // caller to leave out; one that answers (its status failing alone) holds nothing here.
      unread_out->clear();
      for (const auto& [address, why] : unread) {
        std::shared_ptr<ShardClient> c = ClientFor(address);
        c->CheckHealthNow();
        if (!c->answering()) {
          unread_out->emplace_back(address, why);
        } else {
          common::Log(
              "moe-router: cannot read what %s holds (%s); placing as if it "
              "held nothing\n",
              address.c_str(), why.c_str());
        }
      }
      RaiseVersion(seen.placement.version);
      *draining_out = std::move(draining);
      if (steps_out != nullptr) *steps_out = std::move(steps);
      return seen;
    }
  }

  // The first placement over shards of which some drain and hold nothing (drained before this
  // router started: a restart while a shard stays drained) is worked out again without them,
  // as a Rebalance or a membership change places: the fixed formulas over the shards that do
  // not drain (`drains`), `dynamic` on those that do not drain. Placed by the formula over all,
  // such a shard was loaded, held up SERVING for 5 s (AwaitPlacedShardsInRotation), and then
  // had its experts moved off again (MoveOffDraining). A draining shard that holds experts
  // keeps its position in the formulas: MoveOffDraining moves them. Returns the shards left
  // out, for drained_off once the switch is applied (an undo places them: PlaceUndrained).
  std::set<std::string> PlaceWithoutTheDrained(const RoutingTable& seen,
                                               const std::set<std::string>& draining,
                                               Placement* next) {
    const int S = static_cast<int>(seen.shards.size());
    std::vector<bool> drains(S, false), usable(S, true);
    std::set<std::string> left_out;
    for (int s = 0; s < S; ++s) {
      const bool drain = draining.count(seen.shards[s]->address()) > 0;
      drains[s] = drain && seen.placement.ExpertsOn(s).empty();
      usable[s] = !drain;
      if (drains[s]) left_out.insert(seen.shards[s]->address());
    }
    if (left_out.empty() || static_cast<int>(left_out.size()) == S || next->num_shards != S) {
      return {};
    }
    absl::StatusOr<Placement> p = Propose(next->strategy, S, usable, drains);
    if (!p.ok()) return {};  // placed as it was: MoveOffDraining takes them out
    *next = *std::move(p);
    return left_out;
  }

  // Apply's work, with placement_mu held.
  // `observe_shards`: start from what the shards hold, as the first placement does, not from
  // the table (TakeOverAgain).
  absl::Status SwitchLocked(Placement next, std::vector<std::shared_ptr<ShardClient>> next_shards,
                            absl::Time deadline, const std::function<bool()>& cancelled,
                            bool observe_shards = false) {
    // Only the holder of a lease renewed less than a lease ago changes the placement.
    if (!MayPlace()) return PlacementRefusal();
    // No training step runs while replicas are copied and the table switches.
    std::unique_lock<common::TimedMutex> train_lock(train_mu, std::defer_lock);
    const std::chrono::nanoseconds left = common::TimeLeft(deadline);
    if (!train_lock.try_lock_for(std::min<std::chrono::nanoseconds>(kTrainWait, left))) {
      return left < kTrainWait
                 ? absl::DeadlineExceededError(
                       "a training step was still running when the call's deadline passed; the "
                       "placement is unchanged")
                 : absl::UnavailableError(
                       "a training step is still running; the placement is unchanged, try "
                       "again once it ends");
    }
    // A shard that has not confirmed the last commit may lack its update: it must confirm (or be
    // leaving) before any copy. One leaving is forgotten only once the switch is applied: if
    // the switch fails it stays in the table, and must still be asked.
    std::shared_ptr<const RoutingTable> old = Table();
    std::set<std::string> drained_left_out;  // by the first placement: PlaceWithoutTheDrained
    if (trainer != nullptr) {
      // With the live table: a shard the switch moves its replicas off may be a copy's source.
      RETURN_IF_ERROR(trainer->RetryConfirmations(RoutingTable{next, next_shards},
                                                  /*drop_absent=*/false, old.get()));
    }
    // The first placement of this router starts from what the shards hold (they may have served
    // and trained under a router before this one): see ObserveShards.
    bool trained = KnownTrained();
    // Over a live table (TakeOverAgain): the table that requests were routed on, retired and
    // waited for as any old table; `old` becomes what the shards hold.
    std::shared_ptr<const RoutingTable> in_use;
    if (old == nullptr || observe_shards) {
      const bool first = old == nullptr;
      in_use = std::move(old);
      std::vector<std::pair<std::string, std::string>> unread;
      std::set<std::string> draining;
      ASSIGN_OR_RETURN(RoutingTable seen, ObserveShards(next_shards, &trained, &unread, &draining));
      first_unread.clear();
      // Trained: as the shards listed say, or as this router's gate kept in --state-dir says
      // (the listed shards may hold none of the training).
      const bool was_trained = trained || restored_steps > 0 || gate_step > 0;
      if (first && first_settling && (was_trained || seen.placement.version > 0)) {
        // The coordinator started again moments ago (with the router, or while it was down):
        // a shard it does not list yet may only not have registered again, and may hold
        // experts, trained ones among them. Placed over the others, its experts would move
        // (trained ones loaded from the checkpoint), and back once it registers.
        return absl::UnavailableError(
            absl::StrCat("coordinator ", options.coordinator,
                         " has just started, and the shards it lists "
                         "were placed before (placement version ",
                         seen.placement.version, was_trained ? ", trained" : "",
                         "): the first placement waits a lease for the others "
                         "to register again, as they may hold experts"));
      }
      if (!unread.empty()) {
        // Not trained (ObserveShards waits otherwise): the control loop places without them.
        for (const auto& [address, why] : unread) first_unread.push_back(address);
        return absl::UnavailableError(absl::StrCat(absl::StrJoin(first_unread, ", "),
                                                   unread.size() == 1 ? " does" : " do",
                                                   " not answer (", unread.front().second, ")"));
      }
      old = std::make_shared<const RoutingTable>(std::move(seen));
      // Not over a live table: its placement (dynamic's, tuned to the load) is applied again.
      if (first) drained_left_out = PlaceWithoutTheDrained(*old, draining, &next);
    }
    if (shutting_down.load()) return absl::CancelledError("the router is shutting down");
    // Replicas behind their expert's latest step are brought up to it first, so that any live
    // replica is a right source, and one that stays is not left behind. After a router restart
    // steps_done is 0, but the shards' weights tell whether they were trained. Without a
    // coordinator (no trainer), the control loop's next tick does it on the table the switch
    // applied: run here, it would copy replicas the switch then unloads, and a copy that failed
    // would fail the switch.
    if (trainer != nullptr) {
      const absl::Status st = ReloadStale(*old, &trained, /*before_step=*/false, deadline);
      if (!st.ok() && Passed(deadline)) {
        return absl::DeadlineExceededError(absl::StrCat(
            "the call's deadline passed while replicas behind their expert's latest training "
            "step were copied up to it (",
            st.message(), "); nothing was applied"));
      }
      RETURN_IF_ERROR(st);
    }
    if (trained) seen_trained.store(true);
    next.version = ++version;
    const int S = static_cast<int>(next_shards.size());
    // What each address held under the old placement.
    std::map<std::string, std::set<int>> held;
    std::map<int, std::vector<std::string>> old_replicas;
    bool lowered_steps = false;  // an expert's training was found lost: its step is kept again
    if (old != nullptr) {
      for (int s = 0; s < static_cast<int>(old->shards.size()); ++s) {
        for (int e : old->placement.ExpertsOn(s)) {
          held[old->shards[s]->address()].insert(e);
          old_replicas[e].push_back(old->shards[s]->address());
        }
      }
    }
    std::set<std::string> next_addrs;
    for (const auto& c : next_shards) next_addrs.insert(c->address());
    std::vector<std::shared_ptr<ShardClient>> joining;  // members this switch adds
    if (old != nullptr) {
      std::set<std::string> old_addrs;
      for (const auto& c : old->shards) old_addrs.insert(c->address());
      for (const auto& c : next_shards) {
        if (old_addrs.count(c->address()) == 0) joining.push_back(c);
      }
    }
    std::set<int> lost_reported;
    StatusReads drain_status;  // DrainingHolder's
    StatusReads join_status;   // JoiningHolder's
    // Each expert's joining source, chosen once for all its replicas (reached_step[e] may be
    // lowered below as it is chosen), and the switch's one budget for members still loading.
    std::map<int, JoinedCopy> joined;
    const absl::Time join_until = std::min(deadline, common::MonotonicNow() + kJoinLoadWait);
    // to_load[s]: source peer ("" = checkpoint) -> experts.
    std::vector<std::map<std::string, std::vector<int>>> to_load(S);
    std::vector<std::vector<int>> to_unload(old ? old->shards.size() : 0);
    for (int s = 0; s < S; ++s) {
      const std::set<int>& had = held[next_shards[s]->address()];
      for (int e : next.ExpertsOn(s)) {
        if (had.count(e)) continue;
        std::string source;
        if (trained) {
          bool staying = false;  // a shard that held it is still a member (maybe out of rotation)
          for (const auto& a : old_replicas[e]) {
            staying = staying || next_addrs.count(a) > 0;
            if (next_addrs.count(a) && ClientFor(a)->healthy()) {
              source = a;
              break;
            }
          }
          // A draining shard is out of rotation but still answers, and its replica is current
          // (no step runs while a replica is out of rotation): moving its experts off copies
          // them from it (MoveOffDraining).
          for (size_t i = 0; source.empty() && i < old_replicas[e].size(); ++i) {
            const std::string& a = old_replicas[e][i];
            if (next_addrs.count(a) && DrainingHolder(a, e, &drain_status)) source = a;
          }
          if (source.empty() && staying) {
            return absl::UnavailableError(absl::StrCat(
                "expert ", e, " has no live replica to copy its trained weights from"));
          }
          std::optional<JoinedCopy> copy;
          if (source.empty()) {
            auto j = joined.find(e);
            if (j == joined.end()) {
              j = joined
                      .emplace(e, JoiningHolder(joining, e, next_shards[s]->address(), join_until,
                                                deadline, &join_status))
                      .first;
            }
            copy = j->second;
            source = copy->address;
          }
          auto reached = reached_step.find(e);
          // A joining member's copy (not an old holder's: `copy` is empty then) behind the
          // latest step.
          const bool behind = copy.has_value() && !copy->address.empty() &&
                              reached != reached_step.end() && copy->step < reached->second;
          if ((source.empty() || behind) && lost_reported.insert(e).second) {
            // Every shard that held it has left for good: its training went with them (all of
            // it, or the steps after a joining member's copy). Waiting would hold the placement
            // (and training) on a shard that is not coming back.
            // (Steps are not told by their ids: large numbers that mean nothing to a user.)
            common::Log(
                "moe-router: expert %d lost its %s: every shard that held it has left; "
                "it %s and trains from there\n",
                e, behind ? "latest training steps" : "training",
                source.empty() ? "is loaded from the checkpoint"
                               : absl::StrCat("is served from the earlier step that ", source,
                                              " joined holding")
                                     .c_str());
            metrics->ExpertLostTraining();
            NoteLostTraining(e);
            // Where it stands now: not reported again by ReloadStale, here or after a restart.
            reached_step[e] = source.empty() ? 0 : copy->step;
            lowered_steps = true;
          }
          // The joining holder itself keeps what it holds (loaded from its --state-dir at start).
          if (!source.empty() && source == next_shards[s]->address()) continue;
        }
        to_load[s][source].push_back(e);
      }
    }
    if (lowered_steps) KeepStepsWithGate();
    if (old != nullptr) {
      for (int s = 0; s < static_cast<int>(old->shards.size()); ++s) {
        const std::string& a = old->shards[s]->address();
        if (!next_addrs.count(a)) continue;  // it left
        const int ns = static_cast<int>(
            std::find_if(next_shards.begin(), next_shards.end(),
                         [&](const auto& c) { return c->address() == a; }) -
            next_shards.begin());
        for (int e : old->placement.ExpertsOn(s)) {
          if (!next.Holds(ns, e)) to_unload[s].push_back(e);
        }
      }
    }
    std::vector<absl::Status> results(S);
    std::vector<std::thread> loaders;
    for (int s = 0; s < S; ++s) {
      if (to_load[s].empty()) continue;
      loaders.emplace_back([&, s] {
        for (const auto& [source, experts] : to_load[s]) {
          results[s] = next_shards[s]
                           ->LoadExperts(experts, next.version, source, LoadTimeout(deadline))
                           .status();
          if (!results[s].ok()) return;
        }
      });
    }
    for (auto& th : loaders) th.join();
    for (int s = 0; s < S; ++s) {
      if (results[s].code() == absl::StatusCode::kFailedPrecondition) {
        // The shard has seen a later placement version (under a router before this one, and
        // joined after this router's first placement read the shards): the next attempt is
        // numbered past it, rather than counting up to it one refused attempt at a time.
        RaiseVersionTo(*next_shards[s], /*fenced=*/false);
      }
    }
    for (int s = 0; s < S; ++s) {
      if (results[s].ok()) continue;
      if (absl::IsDeadlineExceeded(results[s]) && Passed(deadline)) {
        // Cut to the call's time left: what did load is an extra, which the control loop
        // unloads (UnloadExtras), as after any failed switch.
        return absl::DeadlineExceededError(absl::StrCat(
            "the call's deadline passed while ", results[s].message(), "; nothing was applied"));
      }
      return results[s];
    }
    // A shard that just loaded its first experts turned SERVING: see it before switching.
    for (int s = 0; s < S; ++s) {
      // A joining member that keeps what it holds loads nothing here, and serves as soon too.
      const bool joins = std::find(joining.begin(), joining.end(), next_shards[s]) != joining.end();
      if ((!to_load[s].empty() || joins) && !next_shards[s]->healthy()) {
        next_shards[s]->CheckHealthNow();
      }
    }
    // Nor once the deadline has passed with every load done, or the client has cancelled: it
    // has been told DEADLINE_EXCEEDED or CANCELLED, or is about to be (what loaded is unloaded,
    // as above).
    if (Passed(deadline)) {
      return absl::DeadlineExceededError(
          "the call's deadline passed as the new replicas finished loading; nothing was applied");
    }
    if (cancelled && cancelled()) {
      return absl::CancelledError(
          "the caller cancelled the call while the new replicas loaded; nothing was applied");
    }
    {
      // The strategy with its table: the control loop, which reads the table and then proposes
      // for `strategy`, never proposes the old strategy over the new table (based_on would let
      // that through, and undo an operator's Rebalance).
      // The old table is `retiring` in the same step: StillNeeded, which reads both under
      // table_mu, never sees the new table without it.
      std::lock_guard<std::mutex> tl(table_mu);
      strategy.store(next.strategy);
      table = std::make_shared<RoutingTable>(RoutingTable{next, next_shards});
      retiring = in_use ? in_use : old;
    }
    if (!drained_left_out.empty()) {
      std::lock_guard<std::mutex> lock(models_mu);
      drained_off.insert(drained_left_out.begin(), drained_left_out.end());
    }
    if (trainer != nullptr) trainer->DropUnconfirmedOutside(*Table());
    train_lock.unlock();  // steps now use the new table
    metrics->SetPlacementVersion(static_cast<double>(next.version));
    metrics->SetImbalance(Imbalance(next, load_stats->Load(), TakesLoad(*Table())));
    metrics->Rebalanced();
    last_rebalance = std::chrono::steady_clock::now();
    // Requests routed with the old table still hold it: let them finish before its replicas go.
    // With nothing to unload (shards only joined or left) there is nothing to wait for, and
    // waiting would hold up the control loop behind a slow request.
    const bool unloads = std::any_of(to_unload.begin(), to_unload.end(),
                                     [](const std::vector<int>& u) { return !u.empty(); });
    // Every request on the old table ends by its deadline, which --timeout-s caps: wait that
    // long (at least the 60 s the cap defaults to below it), so no replica goes under one.
    // Not cut to the call's deadline: the switch is applied, and the old replicas must outlive
    // the requests that hold them (a Rebalance answered late still applied: DECISIONS.md).
    const auto drain_until =
        std::chrono::steady_clock::now() +
        absl::ToChronoNanoseconds(std::clamp(options.default_timeout + absl::Seconds(1),
                                             absl::Seconds(60), absl::Hours(24 * 365)));
    // Until then a shard the old table places replicas on is still needed (StillNeeded): a
    // request routed on it may yet send there, a drained shard's last resort among others.
    const std::shared_ptr<const RoutingTable>& routed = in_use ? in_use : old;
    while (unloads && routed.use_count() > 1 && std::chrono::steady_clock::now() < drain_until &&
           !shutting_down.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    {
      std::lock_guard<std::mutex> lock(table_mu);
      retiring.reset();
    }
    // Not while shutting down: requests on the old table may still be finishing, and what is
    // left loaded is unloaded by the next router's first placement.
    // Nor once the lease has run out meanwhile (UnloadExtras does it once it is renewed).
    for (size_t s = 0; s < to_unload.size() && !shutting_down.load() && MayPlace(); ++s) {
      if (!to_unload[s].empty()) {
        old->shards[s]->UnloadExperts(to_unload[s], next.version, absl::Seconds(10)).IgnoreError();
      }
    }
    return absl::OkStatus();
  }

  // What a shard answered of its experts in one control-loop tick: nothing when its status could
  // not be read.
  struct Holding {
    bool read = false;
    std::map<int, uint64_t> ready;  // READY experts and their training steps
    std::set<int> loading;
  };

  // Prints `line` (what a placement action on a shard came to) unless it is the failure
  // `said` last: a success is always said, a failure once until it changes or passes.
  static void SayOnce(std::string& said, const std::string& line, bool ok) {
    if (ok || line != said) common::Log("moe-router: %s\n", line.c_str());
    said = ok ? "" : line;
  }

  // Raises this router's placement version to the one `shard` has seen (read now), after the
  // shard refused a change as older (FAILED_PRECONDITION): its next change there is numbered
  // past it, rather than counting up to it one refused attempt at a time. `fenced`: not where
  // the shard was placed under a later lease epoch than this router holds.
  void RaiseVersionTo(ShardClient& shard, bool fenced) {
    absl::StatusOr<v1::ShardStatus> st = shard.GetStatus(absl::Seconds(2));
    if (!st.ok() || (fenced && st->lease_epoch() > lease_epochs->held.load())) return;
    RaiseVersion(st->placement_version());
  }

  // Raises `version` to at least `to`, in one atomic step: a load and a store could undo a
  // switch's increment made between them.
  void RaiseVersion(uint64_t to) {
    uint64_t was = version.load();
    while (was < to && !version.compare_exchange_weak(was, to)) {
    }
  }

  // Unloads what a shard holds beyond its part of placement `t` (`held`: this tick's statuses).
  // A shard that joins or comes back after the first placement with experts of its own (the
  // default `--experts all`, or ones read back from --state-dir) kept them loaded for good:
  // only the first placement unloaded. So do the loads of a switch that failed half-way. Not
  // while a switch runs or after one ran since `held` was read (placement_mu, and the table
  // still `t`): its new replicas would look like extras. Kept: a replica trained past every
  // placed replica of its expert read READY this tick (it holds training they lack: ReloadStale
  // copies it to them, ReloadMissing loads a missing one from it, and it goes once they have it).
  void UnloadExtras(const std::shared_ptr<const RoutingTable>& t,
                    const std::vector<Holding>& held) {
    if (!MayPlace()) return;  // asked again next tick
    const int S = static_cast<int>(t->shards.size());
    std::vector<std::vector<int>> extras(S);
    bool any = false;
    for (int s = 0; s < S; ++s) {
      for (const auto& [e, step] : held[s].ready) {
        if (e < 0 || e >= config.num_experts || t->placement.Holds(s, e)) continue;
        bool covered = step == 0;
        for (int r : t->placement.replicas[e]) {
          auto it = held[r].ready.find(e);
          covered = covered || (it != held[r].ready.end() && it->second >= step);
        }
        if (!covered) continue;
        extras[s].push_back(e);
        any = true;
      }
    }
    if (!any || shutting_down.load()) return;
    std::unique_lock<common::TimedMutex> lock(placement_mu, std::try_to_lock);
    if (!lock.owns_lock() || Table() != t) return;  // a switch runs or ran: next tick
    for (int s = 0; s < S; ++s) {
      if (extras[s].empty()) continue;
      // The router's latest version number, not the table's: a switch that failed had the
      // shards that it reached raise theirs to its number, and they refuse any older one.
      const absl::Status st =
          t->shards[s]->UnloadExperts(extras[s], version.load(), absl::Seconds(10)).status();
      const std::string line = absl::StrCat(
          "shard ", t->shards[s]->address(), " held experts ", absl::StrJoin(extras[s], ","),
          " beyond its part of placement version ", t->placement.version, ": ",
          st.ok() ? "unloaded" : st.message());
      SayOnce(extras_failed[t->shards[s]->address()], line, st.ok());
    }
  }

  // Loads `missing[s]` on each shard s of `t`, with train_mu held. Untrained weights come from
  // the checkpoint. Trained ones (`trained`: this router knows of training, or a replica was read
  // at a training step) come from the replica that has the expert READY at the latest step
  // (`held`; one without an aborted update first, then one in rotation on a tie: see
  // ReloadStale), or from a replica outside the table trained past them (one that UnloadExtras
  // kept), whether or not this router knows of any training. When every other replica answered
  // without it, loading or ready (or there is none: a restarted shard held the only one, as
  // under `sharded` or half of `hybrid`), no replica holds that training: the shard loads the
  // expert as it would at start, from its --state-dir when it keeps one, else from the
  // checkpoint; ReloadStale reports the training lost if the step it comes back at is behind the
  // one the expert had reached. Left missing, it had no replica for good. While a replica that
  // may still hold it is unread or loading it, it waits (the next tick).
  void ReloadMissing(const RoutingTable& t, const std::vector<std::vector<int>>& missing,
                     const std::vector<Holding>& held, bool trained) {
    // Each shard's loads take a while: the lease is checked before each (asked again next tick),
    // and that no grant since wants a catch-up first.
    for (int s = 0; s < static_cast<int>(t.shards.size()) && MayPlace() && !RegrantPending(); ++s) {
      std::map<std::string, std::vector<int>> by_source;
      for (int e : missing[s]) {
        // Preferred: no aborted update (see ReloadStale), the latest step, in rotation.
        auto rank = [&](int r) {
          const uint64_t step = held[r].ready.at(e);
          return std::tuple(trainer == nullptr || !trainer->AbortedUpdate(step), step,
                            t.shards[r]->healthy());
        };
        // A replica outside the table with training of its own (UnloadExtras keeps one trained
        // past the table's replicas: another router trained it there, or a user's call did).
        // Before, the checkpoint or an older table replica was loaded, and its training lost.
        int extra = -1;
        for (int r = 0; r < static_cast<int>(t.shards.size()); ++r) {
          const auto it = held[r].ready.find(e);
          if (r == s || it == held[r].ready.end() ||
              !TrainedOutside(t.placement, r, e, it->second,
                              trainer != nullptr && trainer->AbortedUpdate(it->second))) {
            continue;
          }
          if (extra < 0 || rank(r) > rank(extra)) extra = r;
        }
        if (!trained && extra < 0) {
          by_source[""].push_back(e);
          continue;
        }
        int source = -1;
        bool may_hold = false;  // a replica that might hold the training but cannot be a source
        for (int r : t.placement.replicas[e]) {
          if (r == s) continue;
          if (!held[r].ready.count(e)) {
            may_hold = may_hold || !held[r].read || held[r].loading.count(e);
            continue;
          }
          if (source < 0 || rank(r) > rank(source)) source = r;
        }
        if (extra >= 0 && (source < 0 || rank(extra) > rank(source))) {
          // Later than any table replica read; where none was read and one may hold the
          // training (unread, or loading it), the next tick, as without the extra.
          if (may_hold && source < 0) continue;
          source = extra;
        }
        if (source >= 0) {
          by_source[t.shards[source]->address()].push_back(e);
        } else if (!may_hold) {
          by_source[""].push_back(e);
        }
      }
      for (const auto& [source, experts] : by_source) {
        const uint64_t under = std::max(t.placement.version, version.load());
        const absl::Status st =
            t.shards[s]->LoadExperts(experts, under, source, absl::Minutes(5)).status();
        if (st.code() == absl::StatusCode::kFailedPrecondition && LeaseFences()) {
          // The shard has seen a later placement version (another router placed it while this
          // one went without the lease, or a user's call): as in SwitchLocked, this router's
          // version is raised to the shard's, and the shard's loads from now on are sent under
          // it (a shard refuses only an older one). Left at the table's, the load was refused
          // at every tick, and each request paid a round on the missing replica. Only under
          // the lease, and not where the shard was placed under a later epoch (this router is
          // the one fenced off: the lease loop stops it): without one, two routers placing the
          // same shards would load and unload each other's replicas at every tick.
          RaiseVersionTo(*t.shards[s], /*fenced=*/true);
        }
        const std::string line = absl::StrCat(
            "shard ", t.shards[s]->address(), " lacked experts ", absl::StrJoin(experts, ","),
            " of placement version ", t.placement.version, ": ",
            st.ok()
                ? absl::StrCat("loaded again", source.empty() ? "" : absl::StrCat(" from ", source))
                : absl::StrCat("loading them again failed (", st.message(),
                               "); tried again at the next tick"));
        SayOnce(reload_failed[absl::StrCat(t.shards[s]->address(), " ", source)], line, st.ok());
      }
    }
  }

  // What a replica at training step `step` holds, for a user.
  static const char* HeldText(uint64_t step) {
    return step == 0 ? "the checkpoint's weights" : "the weights of an earlier training step";
  }

  // Copies again, from a replica at the latest training step, every replica of an expert whose
  // weights are at an older step (ExpertStatus.trained_step): a shard that came back with the
  // checkpoint's weights (restarted with --experts all), or one that confirmed a commit whose
  // step it no longer had (restarted, or dropped after step_ttl); the latest may be a replica
  // outside the table (another router trained it there: PlanStaleReplicas). A replica that carries
  // the update of a step the others aborted (a shard that applied a lost commit and left the table
  // before it was settled, then came back) is never a source, and is given back the weights of
  // the latest other replica (PlanStaleReplicas). Runs with train_mu held and
  // every shard confirmed, so no update is on its way to any replica: before each step (which
  // would otherwise stamp its step on a stale replica too), before a placement change copies
  // replicas, before a save, and on each control-loop tick (without a coordinator: on a tick
  // that reads a trained replica, and before a save). UNAVAILABLE when a copy failed; `trained` (if
  // not null) tells whether any replica has been trained. With `before_step`, also UNAVAILABLE when
  // the status of a shard in rotation cannot be read: the step would train its replicas
  // unchecked, and one may be stale (elsewhere such a shard is left for the next check).
  absl::Status ReloadStale(const RoutingTable& t, bool* trained = nullptr, bool before_step = false,
                           absl::Time deadline = absl::InfiniteFuture()) {
    const int S = static_cast<int>(t.shards.size());
    std::vector<std::map<int, uint64_t>> at(S);  // READY experts' steps, per shard in rotation
    for (int s = 0; s < S; ++s) {
      if (!t.shards[s]->healthy()) {
        // Before a step, a shard with replicas out of rotation refuses it: back by the time the
        // step starts, its replicas would train unchecked. Otherwise it is neither a source nor
        // a target now.
        // Its experts are named, as Infer names an expert without a healthy replica.
        const std::vector<int> on = t.placement.ExpertsOn(s);
        if (before_step && !on.empty()) {
          // Where a trained expert has no other replica to copy from (in rotation, or on a
          // shard that drains), nothing can move it while this shard is gone: its training is
          // on it (a rebalance that would copy it is refused). A shard that drains is not gone:
          // its experts move off (as the last tick read them: a killed shard still answers
          // until two health checks have failed).
          std::set<std::string> drains;
          {
            std::lock_guard<std::mutex> ml(models_mu);
            drains = draining_now;
          }
          auto source = [&](int r) {
            return r < S && (t.shards[r]->healthy() || drains.count(t.shards[r]->address()) > 0);
          };
          std::vector<int> only;  // trained experts with no other source, this shard gone
          if (KnownTrained() && drains.count(t.shards[s]->address()) == 0) {
            for (int e : on) {
              const std::vector<int>& rs = t.placement.replicas[e];
              if (std::none_of(rs.begin(), rs.end(), [&](int r) { return r != s && source(r); })) {
                only.push_back(e);
              }
            }
          }
          return absl::UnavailableError(absl::StrCat(
              "replicas of expert", on.size() == 1 ? " " : "s ", absl::StrJoin(on, ", "), " on ",
              t.shards[s]->address(), " are out of rotation: the step could not commit; ",
              only.empty()
                  ? "retry once the shard is back or the placement has moved off it"
                  : absl::StrCat("retry once the shard is back (expert",
                                 only.size() == 1 ? " " : "s ", absl::StrJoin(only, ", "),
                                 only.size() == 1 ? " has" : " have",
                                 " no other replica in rotation, and the training is on it)")));
        }
        continue;
      }
      absl::StatusOr<v1::ShardStatus> st = t.shards[s]->GetStatus(absl::Milliseconds(500));
      if (!st.ok() && before_step) {
        return absl::UnavailableError(absl::StrCat(
            "cannot check the replicas on ", t.shards[s]->address(), " before the step (",
            st.status().message(), "); the step is refused, try again"));
      }
      if (!st.ok()) continue;
      for (const auto& e : st->experts()) {
        if (e.state() != v1::ExpertStatus::READY) continue;
        at[s][e.expert()] = e.trained_step();
        if (trained != nullptr && e.trained_step() > 0) *trained = true;
        // A shard back with a step past this router's (kept in its --state-dir under a router
        // that numbered higher): later steps are numbered past it, or it would skip them.
        if (trainer != nullptr) trainer->NumberPast(e.trained_step());
      }
    }
    const StalePlan plan = PlanStaleReplicas(
        t.placement, at,
        [this](uint64_t step) { return trainer != nullptr && trainer->AbortedUpdate(step); },
        &reached_step);
    // Experts that lost their training, by what their replicas hold now (HeldText). Steps are
    // told so, not by their ids (large numbers that mean nothing to a user: see Trainer).
    std::map<std::string, std::vector<int>> lost;
    for (const auto& [e, held] : plan.lost) {
      // Every replica is behind a step this expert had reached: the one that held it restarted
      // (the only replica, under sharded or hybrid), or the cluster started again on shards
      // that do not hold it (the step read back with the kept gate). Nothing serves those
      // weights now.
      lost[HeldText(held)].push_back(e);
      metrics->ExpertLostTraining();
      NoteLostTraining(e);
    }
    for (int s = 0; s < S; ++s) {
      for (const auto& [source, experts] : plan.copy[s]) {
        for (int e : experts) {
          common::Log(
              "moe-router: expert %d on %s holds %s, its replica on %s a later training "
              "step: copying it again\n",
              e, t.shards[s]->address().c_str(), HeldText(at[s].at(e)),
              t.shards[source]->address().c_str());
        }
      }
      for (const auto& [source, experts] : plan.give_back[s]) {
        common::Log(
            "moe-router: expert(s) %s on %s carry the update of a step that the "
            "other shards aborted (the shard applied it while it could not be asked, "
            "and was not settled while listed): giving them back the weights of their "
            "replicas on %s\n",
            absl::StrJoin(experts, ",").c_str(), t.shards[s]->address().c_str(),
            t.shards[source]->address().c_str());
      }
    }
    if (!lost.empty()) KeepStepsWithGate();
    for (const auto& [held, experts] : lost) {
      common::Log(
          "moe-router: expert(s) %s lost their training: every replica holds %s, older "
          "than the training reached (the only trained replica restarted without it, "
          "or the cluster started again on shards that do not hold it: a shard's "
          "--state-dir keeps the experts that shard held, so start again from a "
          "checkpoint written by save-checkpoint, or with the --shards and the fixed "
          "--placement that trained them; a dynamic or rebalanced placement is not "
          "found again); they serve and train from those weights now\n",
          absl::StrJoin(experts, ",").c_str(), held.c_str());
    }
    int copied = 0;
    const absl::Status result = CarryOutStalePlan(
        t, plan, std::max(t.placement.version, version.load()), LoadTimeout(deadline), &copied);
    metrics->StaleReplicasRecopied(copied);
    return result;
  }

  // The addresses of the shards of `shards` outside `usable` onto which placement `p` loads
  // an expert that `live` (over `live_shards`) does not place there already: the load would
  // fail there, and the switch with it (after taking a placement version).
  static std::set<std::string> LoadsOntoDown(
      const Placement& p, const std::vector<std::shared_ptr<ShardClient>>& shards,
      const std::vector<bool>& usable, const Placement& live,
      const std::vector<std::shared_ptr<ShardClient>>& live_shards) {
    std::set<std::string> out;
    for (int e = 0; e < static_cast<int>(p.replicas.size()); ++e) {
      for (int r : p.replicas[e]) {
        if (usable[r]) continue;
        bool held = false;
        for (int s : live.replicas[e]) {
          held = held || live_shards[s]->address() == shards[r]->address();
        }
        if (!held) out.insert(shards[r]->address());
      }
    }
    return out;
  }

  // "A drains" or "A, B drain": the router's lines that name draining shards.
  template <typename Addresses>
  static std::string ShardsThatDrain(const Addresses& addresses) {
    return absl::StrCat(absl::StrJoin(addresses, ", "),
                        addresses.size() == 1 ? " drains" : " drain");
  }

  // The experts that proposal `p` (over shards whose `usable` is given) places on no usable
  // shard, where the live table `t` has a replica of them in rotation.
  static std::vector<int> LeftUnserved(const Placement& p, const std::vector<bool>& usable,
                                       const RoutingTable& t) {
    std::vector<int> out;
    for (int e = 0; e < static_cast<int>(p.replicas.size()); ++e) {
      const bool served =
          std::any_of(p.replicas[e].begin(), p.replicas[e].end(), [&](int r) { return usable[r]; });
      const bool served_now =
          e < static_cast<int>(t.placement.replicas.size()) &&
          std::any_of(t.placement.replicas[e].begin(), t.placement.replicas[e].end(),
                      [&](int r) { return t.shards[r]->healthy(); });
      if (!served && served_now) out.push_back(e);
    }
    return out;
  }

  void SetNotPlaced(std::set<std::string> addresses) {
    std::lock_guard<std::mutex> lock(models_mu);
    not_placed = std::move(addresses);
  }

  void NoteLostTraining(int expert) {
    std::lock_guard<std::mutex> lock(lost_mu);
    lost_training.insert(expert);
    lost_untold.insert(expert);
  }

  // Shard `c`'s status, read within 500 ms and not past `deadline` (MonotonicNow's clock); with
  // no time left, not read (DEADLINE_EXCEEDED): the control loop asks again after its cooldown,
  // and a call ends by its deadline anyway.
  static absl::StatusOr<v1::ShardStatus> StatusBy(ShardClient& c, absl::Time deadline) {
    const absl::Duration wait =
        std::min(absl::Milliseconds(500), deadline - common::MonotonicNow());
    if (wait <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError("no time left to read the shard's status");
    }
    return c.GetStatus(wait);
  }

  // Each shard's status, read once for a switch or a check (keyed by address).
  using StatusReads = std::map<std::string, absl::StatusOr<v1::ShardStatus>>;

  // Expert `e`'s READY replica on shard `c` while `c` drains, from its status (read into
  // `seen` on first use, by StatusBy `deadline`); null where it does not answer, does not drain,
  // or holds no READY replica of `e`.
  static const v1::ExpertStatus* ReadyWhileDraining(ShardClient& c, int e, absl::Time deadline,
                                                    StatusReads* seen) {
    if (!c.answering()) return nullptr;
    auto it = seen->find(c.address());
    if (it == seen->end()) it = seen->emplace(c.address(), StatusBy(c, deadline)).first;
    const absl::StatusOr<v1::ShardStatus>& st = it->second;
    if (!st.ok() || !st->draining()) return nullptr;
    for (const v1::ExpertStatus& x : st->experts()) {
      if (x.expert() == e && x.state() == v1::ExpertStatus::READY) return &x;
    }
    return nullptr;
  }

  // Whether the shard at `address` drains and holds expert `e` READY at the latest step that
  // expert reached, with no update of an aborted step: a source for moving it off (SwitchLocked,
  // with train_mu held). `seen` keeps each shard's status for the switch (one read each).
  bool DrainingHolder(const std::string& address, int e, StatusReads* seen) {
    const v1::ExpertStatus* x =
        ReadyWhileDraining(*ClientFor(address), e, absl::InfiniteFuture(), seen);
    if (x == nullptr) return false;
    if (trainer != nullptr && trainer->AbortedUpdate(x->trained_step())) return false;
    auto reached = reached_step.find(e);
    return reached == reached_step.end() || x->trained_step() >= reached->second;
  }

  // A joining member's copy of a trained expert (JoiningHolder): where, and at which step.
  struct JoinedCopy {
    std::string address;  // "" where no joining member holds it trained
    uint64_t step = 0;
  };

  // The best source among shards that join with this switch (`joining`: in the next table, not
  // the old one) for trained expert `e` whose every old holder has left: the one that holds it
  // READY at the highest training step (the shard `prefer` on a tie), none at step 0 or at an
  // aborted update's. Such a member was started again at another address with the --state-dir
  // of a shard that left, and loaded its trained experts from it at start (a helper's
  // walk-through, 2026-12-06: they were called lost and loaded from the checkpoint elsewhere);
  // its copy may be a step or more behind the latest (a kill during training). A member still
  // loading `e` is read again until `until` (one budget for the whole switch). Statuses are read
  // into `seen` (once a shard while not loading). train_mu held.
  JoinedCopy JoiningHolder(const std::vector<std::shared_ptr<ShardClient>>& joining, int e,
                           const std::string& prefer, absl::Time until, absl::Time deadline,
                           StatusReads* seen) {
    JoinedCopy best;
    // Loading (a member registers while its initial experts load): read again until it is not.
    auto loading = [e](const absl::StatusOr<v1::ShardStatus>& st) {
      return st.ok() && std::any_of(st->experts().begin(), st->experts().end(),
                                    [e](const v1::ExpertStatus& x) {
                                      return x.expert() == e &&
                                             x.state() == v1::ExpertStatus::LOADING;
                                    });
    };
    for (const auto& c : joining) {
      if (!c->answering()) continue;
      // The first read, and one more of a member seen loading before, within the read's own
      // 500 ms (not the budget: a member that used it up must not leave the others unread).
      auto it = seen->find(c->address());
      if (it == seen->end()) {
        it = seen->emplace(c->address(), StatusBy(*c, deadline)).first;
      } else if (loading(it->second)) {
        it->second = StatusBy(*c, deadline);
      }
      while (loading(it->second) && common::MonotonicNow() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));  // no event to wait on
        it->second = StatusBy(*c, deadline);
      }
      if (!it->second.ok() || it->second->draining()) continue;
      for (const v1::ExpertStatus& x : it->second->experts()) {
        if (x.expert() != e || x.state() != v1::ExpertStatus::READY || x.trained_step() == 0) {
          continue;
        }
        if (trainer != nullptr && trainer->AbortedUpdate(x.trained_step())) continue;
        if (x.trained_step() > best.step ||
            (x.trained_step() == best.step && c->address() == prefer)) {
          best = {c->address(), x.trained_step()};
        }
      }
    }
    return best;
  }

  // Whether the shard at `address` holds any replica in the live placement, or in the one a
  // switch has just replaced while requests routed on it still run (ShardClient::
  // SetStillNeeded): a drain keeps its stream open until MoveOffDraining has taken the shard
  // out of the placement (its experts moved or served elsewhere) and those requests are done,
  // so that "drained" means that nothing is placed on it and nothing will be sent to it.
  bool StillNeeded(const std::string& address) {
    if (shutting_down.load()) return false;  // it keeps no stream, and holds up no drain
    std::shared_ptr<const RoutingTable> live, old;
    {
      std::lock_guard<std::mutex> lock(table_mu);
      live = table;
      old = retiring.lock();
    }
    for (const std::shared_ptr<const RoutingTable>& t : {live, old}) {
      if (t == nullptr) continue;
      for (int s = 0; s < static_cast<int>(t->shards.size()); ++s) {
        if (t->shards[s]->address() == address && !t->placement.ExpertsOn(s).empty()) return true;
      }
    }
    return false;
  }

  // A switch the control loop works out over the live table `t`: applied unless another came
  // in between (Apply's based_on). `t` is let go of for it (Apply waits for every holder of the
  // live table) and is the live table after it. A failure is logged and tried again next tick.
  // Returns whether the tick ends here: the switch was applied, or the table changed anyway
  // (what the tick read is out of date: the next one reads again). `*applied`: whether it was.
  // `next` and `shards` stay by value: a caller passes `t->shards`, and `t` may be the last
  // holder of that table when it is let go of.
  bool SwitchFromTick(std::shared_ptr<const RoutingTable>& t, Placement next,
                      std::vector<std::shared_ptr<ShardClient>> shards, bool* applied = nullptr) {
    const uint64_t based_on = t->placement.version;
    t.reset();
    const bool ok = Apply(std::move(next), std::move(shards), based_on).ok();
    if (applied != nullptr) *applied = ok;
    t = Table();
    return ok || t == nullptr || t->placement.version != based_on;
  }

  // A shard that drains (ShardStatus.draining: its preStop hook, or `moe-client drain`) is out
  // of rotation for good, and leaves the placement: a training step refuses to run while a
  // shard out of rotation holds replicas. Its replica of an expert is dropped where a shard in
  // rotation holds that expert READY at the draining replica's step (no aborted update);
  // where no usable shard holds it, it moves, in the same switch, to the usable shard that
  // holds the fewest experts, copied from the draining shard (or from the checkpoint,
  // untrained). The shard keeps its stream (StillNeeded) until it holds no replica, so its
  // drain ends once it has left the placement. Returns whether a switch was applied (the tick
  // ends there); `t` is the live table after it.
  bool MoveOffDraining(std::shared_ptr<const RoutingTable>& t, const std::vector<bool>& draining,
                       const std::vector<Holding>& held) {
    const int S = static_cast<int>(t->shards.size());
    if (std::none_of(draining.begin(), draining.end(), [](bool d) { return d; })) {
      drain_wait.clear();
      return false;
    }
    std::vector<bool> usable = Usable(*t);
    std::vector<int> count(S, 0);
    for (int s = 0; s < S; ++s) {
      usable[s] = usable[s] && !draining[s];
      count[s] = static_cast<int>(t->placement.ExpertsOn(s).size());
    }
    Placement next = t->placement;
    std::map<int, std::vector<int>> moved;  // target shard -> experts given to it
    std::vector<int> dropped;               // experts served elsewhere, off the draining shards
    std::vector<int> stuck;                 // experts no usable shard can take
    std::vector<int> waiting;  // held by a usable shard, not READY at the draining one's step
    for (int e = 0; e < static_cast<int>(next.replicas.size()); ++e) {
      std::vector<int>& where = next.replicas[e];
      if (std::none_of(where.begin(), where.end(), [&](int r) { return draining[r]; })) continue;
      uint64_t step = 0;  // the latest step a draining replica holds (an aborted one's: none)
      for (int d : where) {
        if (!draining[d]) continue;
        auto it = held[d].ready.find(e);
        if (it != held[d].ready.end() &&
            !(trainer != nullptr && trainer->AbortedUpdate(it->second))) {
          step = std::max(step, it->second);
        }
      }
      const bool served = std::any_of(where.begin(), where.end(), [&](int r) {
        if (draining[r] || !held[r].read || !t->shards[r]->healthy()) return false;
        auto it = held[r].ready.find(e);
        return it != held[r].ready.end() && it->second >= step &&
               !(trainer != nullptr && trainer->AbortedUpdate(it->second));
      });
      std::vector<int> kept;
      for (int r : where) {
        if (!draining[r]) kept.push_back(r);
      }
      if (served) {
        where = kept;
        dropped.push_back(e);
        continue;
      }
      if (std::any_of(where.begin(), where.end(), [&](int r) { return usable[r]; })) {
        waiting.push_back(e);  // a usable replica not READY (or behind): asked again next tick
        continue;
      }
      int best = -1;
      for (int s = 0; s < S; ++s) {
        if (usable[s] && (best < 0 || count[s] < count[best])) best = s;
      }
      if (best < 0) {
        stuck.push_back(e);  // served from the draining shard as a last resort
        continue;
      }
      kept.push_back(best);
      std::sort(kept.begin(), kept.end());
      where = kept;
      ++count[best];
      moved[best].push_back(e);
    }
    if (moved.empty() && dropped.empty() && stuck.empty() && waiting.empty()) return false;
    std::vector<std::string> drains;
    for (int s = 0; s < S; ++s) {
      if (draining[s]) drains.push_back(t->shards[s]->address());
    }
    if (!moved.empty() || !dropped.empty()) {
      std::lock_guard<std::mutex> lock(models_mu);
      drained_off.insert(drains.begin(), drains.end());
    }
    std::vector<std::string> plan;
    for (const auto& [target, experts] : moved) {
      plan.push_back(absl::StrCat("expert(s) ", absl::StrJoin(experts, ","), " onto ",
                                  t->shards[target]->address()));
    }
    const std::string why = absl::StrCat(
        ShardsThatDrain(drains),
        plan.empty() ? "" : absl::StrCat(": copying ", absl::StrJoin(plan, "; ")),
        dropped.empty()
            ? ""
            : absl::StrCat(plan.empty() ? ": " : "; ", drains.size() == 1 ? "its" : "their",
                           " replica(s) of expert(s) ", absl::StrJoin(dropped, ","),
                           " leave the placement (served by shards in rotation)"),
        stuck.empty()
            ? ""
            : absl::StrCat("; no shard in rotation can take expert(s) ", absl::StrJoin(stuck, ","),
                           ", served from the draining shard meanwhile (its drain "
                           "waits: start another shard, or undo the drain)"),
        waiting.empty()
            ? ""
            : absl::StrCat("; expert(s) ", absl::StrJoin(waiting, ","),
                           " stay on the draining shard until a replica in rotation is READY at "
                           "its step (its drain waits meanwhile)"));
    if (why != drain_wait) {
      drain_wait = why;
      common::Log("moe-router: %s\n", why.c_str());
    }
    if (moved.empty() && dropped.empty()) return false;
    // A failure: the rest of this tick runs meanwhile (it may settle what held the switch back:
    // a commit a shard has not confirmed).
    return SwitchFromTick(t, std::move(next), t->shards);
  }

  // A shard that MoveOffDraining took out of the placement and that answers again, not
  // draining, with none draining and the membership settled: a drain undone, or a drained
  // shard stopped and started again at its address (a StatefulSet's rolling restart within the
  // coordinator's lease, or a fixed --shards list). The strategy's own layout over the table's
  // shards is applied again where it gives such a shard experts, loads nothing onto a shard
  // that is down or drains, and leaves no expert without a shard in rotation. Only those
  // shards: one the strategy leaves empty (`sharded` with more shards than experts, `dynamic`)
  // would otherwise have `dynamic` re-proposed each tick, past its cooldown and threshold.
  // Returns whether a switch was applied (the tick ends there).
  bool PlaceUndrained(std::shared_ptr<const RoutingTable>& t, const std::vector<bool>& draining,
                      const std::vector<Holding>& held, bool membership_changes) {
    const int S = static_cast<int>(t->shards.size());
    std::set<std::string> off;
    {
      std::lock_guard<std::mutex> lock(models_mu);
      for (auto it = drained_off.begin(); it != drained_off.end();) {
        int s = 0;
        while (s < S && t->shards[s]->address() != *it) ++s;
        const bool placed_again = s < S && !draining[s] && !t->placement.ExpertsOn(s).empty();
        it = (s == S || placed_again) ? drained_off.erase(it) : std::next(it);
      }
      off = drained_off;
    }
    if (std::any_of(draining.begin(), draining.end(), [](bool d) { return d; }) ||
        !membership_wait.empty() || membership_changes) {
      return false;
    }
    std::vector<int> empty;
    for (int s = 0; s < S; ++s) {
      if (off.count(t->shards[s]->address()) > 0 && held[s].read && t->shards[s]->answering() &&
          t->placement.ExpertsOn(s).empty()) {
        empty.push_back(s);
      }
    }
    if (empty.empty()) return false;
    // Another drained shard that has stopped since keeps out of the formula (Usable).
    std::vector<bool> drains;
    const std::vector<bool> usable = Usable(*t, &drains);
    absl::StatusOr<Placement> p = Propose(t->placement.strategy, S, usable, drains);
    if (!p.ok() || p->replicas == t->placement.replicas ||
        std::none_of(empty.begin(), empty.end(), [&](int s) { return !p->ExpertsOn(s).empty(); }) ||
        !LoadsOntoDown(*p, t->shards, usable, t->placement, t->shards).empty() ||
        !LeftUnserved(*p, usable, *t).empty()) {
      return false;
    }
    return SwitchFromTick(t, *std::move(p), t->shards);
  }

  // Reloads what a restarted shard lost, copies replicas left behind by training again, and
  // rebalances a dynamic placement past the threshold.
  void Reconcile() {
    // Keeps the coordinator's channel connected (an idle channel connects only when asked): a
    // step finds it ready, and `info` reads its state as it is, not "connecting".
    if (coordinator_channel != nullptr) coordinator_channel->GetState(/*try_to_connect=*/true);
    // A lease not renewed for a lease is asked for again here; until it is granted, the tick's
    // changes are refused where they are made (SwitchLocked, ReloadMissing, UnloadExtras).
    if (!MayPlaceNow() && LeaseLost()) return;
    if (RegrantPending()) return;  // granted again by that ask: TakeOverAgain first
    std::shared_ptr<const RoutingTable> t = Table();
    if (t == nullptr) return;
    SendLeaseEpoch(t->shards, /*at_tick=*/true);
    bool membership_changes = false;  // the members differ from the table's shards
    {
      // Follow membership: a shard that joined or left changes the placement; so does one
      // found serving another model (read below) or one back with this router's (with a fixed
      // --shards list, only those). Until a switch to the members succeeds, asked every tick.
      bool settling = false;
      absl::StatusOr<std::vector<std::shared_ptr<ShardClient>>> members =
          Members(absl::Milliseconds(500), &settling);
      if (members.ok()) {
        const bool same = SameShards(*members, t->shards);
        membership_changes = !same;
        // A coordinator started again knows a member only from its next heartbeat: until a
        // lease has passed, a placed shard it does not list has not left (a placement without
        // it would move its experts away and back).
        const bool unlisted = AnyUnlisted(t->shards, *members);
        if (!same && settling && unlisted) {
          // Asked again next tick.
        } else if (!same) {
          // A member that does not answer (it joined the coordinator but the router cannot
          // reach it) would fail the switch at the load, every tick: dynamic keeps off it, and
          // a placement that would load onto it waits (said once), the rest of the tick runs.
          // A draining member is no place for experts either: it will not serve again (asked
          // of every member: one still in rotation may have begun to drain since its last
          // health check).
          std::vector<bool> reachable;
          std::set<std::string> drains;
          for (const auto& c : *members) {
            bool r = c->healthy() || c->answering();
            if (r) {
              absl::StatusOr<v1::ShardStatus> st = c->GetStatus(absl::Milliseconds(500));
              r = st.ok() ? !st->draining() : c->healthy();
              if (st.ok() && st->draining()) drains.insert(c->address());
            }
            reachable.push_back(r);
          }
          // A draining member that holds nothing in the live placement (MoveOffDraining has
          // taken it out) is left out of the fixed formulas: placed over the others, the change
          // need not wait for it to stop. One that still holds replicas keeps its position
          // (MoveOffDraining moves them first, and waits for replicas that are not READY).
          // A member that drained and has stopped since (DrainedAndEmpty in the live table, and
          // unreachable) is left out as well, as in Usable.
          const std::set<std::string> drained = DrainedAndEmpty(*t);
          std::vector<bool> drained_empty;
          for (size_t i = 0; i < members->size(); ++i) {
            const std::string& a = (*members)[i]->address();
            bool placed = false;
            for (int s = 0; s < static_cast<int>(t->shards.size()); ++s) {
              placed =
                  placed || (t->shards[s]->address() == a && !t->placement.ExpertsOn(s).empty());
            }
            drained_empty.push_back((!placed && drains.count(a) > 0) ||
                                    (drained.count(a) > 0 && !reachable[i]));
          }
          absl::StatusOr<Placement> p = Propose(
              t->placement.strategy, static_cast<int>(members->size()), reachable, drained_empty);
          std::set<std::string> onto_down;
          std::vector<int> unserved;
          if (p.ok()) {
            onto_down = LoadsOntoDown(*p, *members, reachable, t->placement, t->shards);
            unserved = LeftUnserved(*p, reachable, *t);
          }
          if (p.ok() && onto_down.empty() && unserved.empty()) {
            bool applied = false;
            SwitchFromTick(t, *std::move(p), *members, &applied);
            if (applied) {
              SetNotPlaced({});
              // Left out while they drain: an undo places them (PlaceUndrained), also one that
              // joined draining and was never placed.
              std::lock_guard<std::mutex> lock(models_mu);
              for (size_t i = 0; i < members->size(); ++i) {
                if (drained_empty[i]) drained_off.insert((*members)[i]->address());
              }
            }
            return;
          }
          // A draining member answers: it is no "not placed, does not answer" shard.
          std::set<std::string> silent;
          for (const std::string& a : onto_down) {
            if (!drains.count(a)) silent.insert(a);
          }
          if (p.ok() && !onto_down.empty()) SetNotPlaced(silent);
          // A proposal that would leave an expert only on shards that drain or are down, where
          // a shard in rotation serves it now, or load onto a draining shard that still holds
          // replicas (it keeps its position in the formula until MoveOffDraining has moved
          // them off), waits for that.
          std::set<std::string> holding;  // draining members the formula still counts
          for (size_t i = 0; i < members->size(); ++i) {
            if (drains.count((*members)[i]->address()) && !drained_empty[i]) {
              holding.insert((*members)[i]->address());
            }
          }
          const std::string until_drained =
              holding.empty()
                  ? ""
                  : absl::StrCat(" (", ShardsThatDrain(holding),
                                 holding.size() == 1
                                     ? ": its experts move off first, or undo the drain)"
                                     : ": their experts move off first, or undo the drains)");
          std::vector<std::string> onto;  // who it would load onto, and why not
          if (!silent.empty()) {
            onto.push_back(absl::StrCat(
                absl::StrJoin(silent, ", "),
                silent.size() == 1 ? ", which does not answer" : ", which do not answer"));
          }
          if (silent.size() < onto_down.size()) onto.push_back("a shard that drains");
          const std::string why =
              !p.ok() ? std::string(p.status().message())
              : !onto_down.empty()
                  ? absl::StrCat("it would load experts onto ", absl::StrJoin(onto, ", and "),
                                 until_drained)
                  : absl::StrCat("it would leave expert(s) ", absl::StrJoin(unserved, ","),
                                 " only on shards that drain or are down, where a shard in "
                                 "rotation serves them now",
                                 until_drained);
          if (why != membership_wait) {
            membership_wait = why;
            common::Log("moe-router: the shards changed, but the placement waits: %s\n",
                        why.c_str());
          }
        } else {
          membership_wait.clear();
          SetNotPlaced({});
        }
      }
    }
    // What each shard is missing of its placement (a restarted shard: everything).
    std::vector<std::vector<int>> missing(t->shards.size());
    std::vector<Holding> held(t->shards.size());
    std::vector<bool> draining(t->shards.size(), false);
    bool any_missing = false;
    bool any_trained = false;  // a replica read at a training step
    for (int s = 0; s < static_cast<int>(t->shards.size()); ++s) {
      absl::StatusOr<v1::ShardStatus> st = t->shards[s]->GetStatus(absl::Milliseconds(500));
      // A shard restarted from another model gets nothing loaded: it leaves the placement on
      // the next tick (above).
      if (!st.ok() || !ServesModel(t->shards[s]->address(), *st)) continue;
      draining[s] = st->draining();
      Holding& h = held[s];
      h.read = true;
      for (const auto& e : st->experts()) {
        if (e.state() == v1::ExpertStatus::READY) h.ready[e.expert()] = e.trained_step();
        if (e.state() == v1::ExpertStatus::LOADING) h.loading.insert(e.expert());
      }
      for (int e : t->placement.ExpertsOn(s)) {
        if (!h.ready.count(e) && !h.loading.count(e)) missing[s].push_back(e);
      }
      any_missing = any_missing || !missing[s].empty();
      for (const auto& [e, step] : h.ready) any_trained = any_trained || step > 0;
    }
    {
      std::set<std::string> drains;
      for (int s = 0; s < static_cast<int>(t->shards.size()); ++s) {
        if (draining[s]) drains.insert(t->shards[s]->address());
      }
      metrics->SetShardsDraining(drains);
      std::lock_guard<std::mutex> lock(models_mu);
      draining_now = std::move(drains);
    }
    if (MoveOffDraining(t, draining, held)) return;
    if (PlaceUndrained(t, draining, held, membership_changes)) return;
    if (trainer != nullptr || any_missing || any_trained) {
      // Not while a step runs: a copy could miss its update (tried again next tick).
      std::unique_lock<common::TimedMutex> train_lock(train_mu, std::defer_lock);
      if (train_lock.try_lock_for(any_missing ? kTrainWait : std::chrono::seconds(0))) {
        // Shards that missed a commit's confirmation are asked again first: until each has
        // applied that update, none may be the source of a copy.
        // The table read before the lock may have been replaced meanwhile: next tick, then.
        // Copies are placement changes too: only with a current lease (MayPlace).
        if (Table() == t && MayPlace() &&
            (trainer == nullptr || trainer->RetryConfirmations(*t).ok())) {
          // Replicas behind first: then every live replica is a right source for what is
          // missing, and the shards' steps tell whether it was trained (after a router restart
          // steps_done is 0; reading the checkpoint then would serve untrained weights).
          // Without a coordinator (no trainer) too, where a replica is trained: shards started
          // again from their --state-dir can hold training that other replicas lack.
          bool trained = KnownTrained();
          if (trainer != nullptr || any_trained) {
            ReloadStale(*t, &trained).IgnoreError();  // logged; next tick
          }
          if (trained) seen_trained.store(true);
          // A replica read at a training step is training, whether or not this router knows of
          // any (without a coordinator, no step of this router's).
          ReloadMissing(*t, missing, held, trained || any_trained);
        }
      }
    }
    UnloadExtras(t, held);
    const std::vector<double> load = load_stats->Load();
    const double imbalance = Imbalance(t->placement, load, TakesLoad(*t));
    metrics->SetImbalance(imbalance);
    // The strategy of the table this tick read (Apply stores both together).
    if (t->placement.strategy != Strategy::kDynamic || load_stats->batches() == 0) return;
    if (std::chrono::steady_clock::now() - last_rebalance.load() <
        absl::ToChronoNanoseconds(options.rebalance_cooldown)) {
      return;
    }
    if (imbalance <= options.imbalance_threshold) {
      auto_refused.clear();
      return;
    }
    t.reset();  // Apply waits for every holder of the current table to let go of it
    std::vector<std::shared_ptr<ShardClient>> current;
    std::vector<bool> usable;
    Placement live;
    absl::StatusOr<Placement> next =
        ProposeOverLiveTable(Strategy::kDynamic, &current, &usable, &live);
    // A switch away from dynamic since the check above: it stays (Apply's based_on is then
    // the switch's own version, and would not refuse this proposal).
    if (live.strategy != Strategy::kDynamic) return;
    // Both sides over the same shards (Usable asks an empty one whether it drains, where
    // TakesLoad knows only what the last tick read), and never the placement that is live
    // already: a drained, empty shard otherwise read as idle, and every cooldown applied a new
    // version for nothing.
    if (!next.ok() || next->replicas == live.replicas ||
        Imbalance(*next, load, usable) >= Imbalance(live, load, usable) - 0.05) {
      auto_refused.clear();
      return;
    }
    // Checked as an operator's switch is: where a trained expert's holders are all out of
    // rotation, the proposal copies it from nowhere, and SwitchLocked would fail it after
    // taking a version and re-reading every replica's step. Either way, refused or failed, the
    // next try waits out the cooldown, not the next tick: a failed switch has loaded replicas and
    // unloaded them again. (Unless another switch came in meanwhile: it set the cooldown.)
    absl::Status st =
        CheckSwitchable(*next, current, usable, live, common::MonotonicNow() + kAutoCheckWait);
    const bool refused = !st.ok();
    if (refused) {
      // The same reason is said once (the imbalance moves with every tick).
      if (st.message() != auto_refused) {
        common::Log(
            "moe-router: dynamic rebalance skipped (load imbalance %.2f, threshold %.2f), "
            "tried again after each --rebalance-cooldown-s; until then the experts it "
            "names fail UNAVAILABLE: %s\n",
            imbalance, options.imbalance_threshold, std::string(st.message()).c_str());
      }
      auto_refused = std::string(st.message());
    } else {
      auto_refused.clear();
      st = Apply(*next, std::move(current), live.version);
    }
    std::shared_ptr<const RoutingTable> now = Table();
    if (!st.ok() && now != nullptr && now->placement.version == live.version) {
      last_rebalance = std::chrono::steady_clock::now();
      metrics->RebalanceSkipped(refused);
    }
  }

  // One try of the first placement. Shards that do not answer (ObserveShards) are left out once
  // none of them has answered for `leave_out_after`, as the coordinator lists only the shards that
  // have joined: the router serves over those that answer, and Reconcile gives the others
  // experts once they do (before, a fixed --shards list with one shard down never served).
  // Until then a slow shard is waited for. Never when this router's kept gate says the model
  // was trained: a shard that is down may hold an expert's only trained replica (ObserveShards
  // waits already when a shard that answers holds trained experts).
  absl::Status FirstPlacement(
      std::map<std::string, std::chrono::steady_clock::time_point>* unread_since) {
    bool settling = false;
    absl::StatusOr<std::vector<std::shared_ptr<ShardClient>>> members =
        Members(absl::Seconds(2), &settling);
    if (!members.ok()) return members.status();
    SendLeaseEpoch(*members, /*at_tick=*/false);
    {
      std::lock_guard<common::TimedMutex> l(placement_mu);
      first_settling = settling;
    }
    std::vector<std::string> all;  // the members of this try, before any is left out
    for (const auto& c : *members) all.push_back(c->address());
    std::set<std::string> left_out;
    std::string wait;
    absl::Status st;
    for (int attempt = 0; attempt < 2; ++attempt) {
      absl::StatusOr<Placement> p = Propose(strategy.load(), static_cast<int>(members->size()));
      st = p.ok() ? Apply(*p, *members, std::nullopt) : p.status();
      std::vector<std::string> unread;
      {
        std::lock_guard<common::TimedMutex> l(placement_mu);
        unread.swap(first_unread);
      }
      // A shard stops counting as silent once it has left the members or answers its health
      // checks; not because this attempt did not read it (it was left out, or the attempt
      // failed before reading).
      const auto now = std::chrono::steady_clock::now();
      for (auto it = unread_since->begin(); it != unread_since->end();) {
        const bool member = std::find(all.begin(), all.end(), it->first) != all.end();
        it = member && !ClientFor(it->first)->answering() ? std::next(it)
                                                          : unread_since->erase(it);
      }
      for (const std::string& a : unread) unread_since->try_emplace(a, now);
      if (st.ok() || unread.empty()) break;
      std::set<std::string> not_answering = left_out;
      not_answering.insert(unread.begin(), unread.end());
      SetNotPlaced(not_answering);
      if (unread.size() >= members->size()) break;  // none answers: Apply said why
      if (restored_steps > 0 || gate_step > 0) {
        wait = absl::StrCat("the model was trained (the gate kept in --state-dir has ",
                            restored_steps, " training steps), and ",
                            absl::StrJoin(unread, ", "),
                            " may hold the only trained replica of an expert");
      } else {
        for (const std::string& a : unread) {
          if (now - unread_since->at(a) < absl::ToChronoNanoseconds(options.leave_out_after)) {
            wait = absl::StrCat(a, " does not answer, and may only be slow: a shard is left out "
                                "once it has not answered for ",
                                absl::FormatDuration(options.leave_out_after));
          }
        }
      }
      if (!wait.empty()) break;
      std::erase_if(*members, [&](const std::shared_ptr<ShardClient>& c) {
        return std::find(unread.begin(), unread.end(), c->address()) != unread.end();
      });
      left_out.insert(unread.begin(), unread.end());
    }
    if (!wait.empty() && wait != first_wait) {
      common::Log("moe-router: the first placement waits: %s\n", wait.c_str());
    }
    first_wait = wait;  // said again if it comes back after something else
    if (st.ok() && !left_out.empty()) {
      common::Log(
          "moe-router: the first placement went ahead over the %zu %s, without %s; "
          "%s given experts once %s\n",
          members->size(), members->size() == 1 ? "shard that answers" : "shards that answer",
          absl::StrJoin(left_out, ", ").c_str(), left_out.size() == 1 ? "it is" : "they are",
          left_out.size() == 1 ? "it answers" : "they answer");
    }
    return st;
  }

  // Before the router says SERVING: each shard of the first placement is seen in rotation, up to
  // `limit` in all. The placement checked each shard's health once after its loads; on a busy
  // machine that check can time out, and the shard stayed out until its next periodic check, so
  // a training step sent at READY was refused ("out of rotation") with no shard down. A shard
  // still out after `limit` is said in a line, and serving starts anyway (its requests go to
  // the other replicas, or to it as a last resort).
  void AwaitPlacedShardsInRotation(absl::Duration limit) {
    const std::shared_ptr<const RoutingTable> t = Table();
    if (t == nullptr) return;
    const absl::Time until = common::MonotonicNow() + limit;
    for (int s = 0; s < static_cast<int>(t->shards.size()); ++s) {
      ShardClient& c = *t->shards[s];
      if (t->placement.ExpertsOn(s).empty()) continue;
      while (!c.healthy() && common::MonotonicNow() < until && !shutting_down.load()) {
        c.CheckHealthNow();
        if (!c.healthy()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      if (!c.healthy() && !shutting_down.load()) {
        const ShardClient::OutOfRotation out = c.out_of_rotation();
        common::Log(
            "moe-router: serving, but shard %s is not in rotation yet (%s); its "
            "replicas are used once its health check says SERVING\n",
            c.address().c_str(),
            out.why.empty() ? "no health check has answered" : out.why.c_str());
      }
    }
  }

  void ControlLoop() {
    // Since when each shard the first placement could not read has not answered.
    std::map<std::string, std::chrono::steady_clock::time_point> unread_since;
    std::unique_lock<std::mutex> lock(control_mu);
    while (!stopping) {
      lock.unlock();
      if (!ready.HasBeenNotified()) {
        // Standing by (NotReady says why) until this router holds the placement lease.
        absl::Status st = absl::UnavailableError("");
        if (MayPlaceNow()) {
          regrants_caught_up = Regrants();             // the first placement reads the shards
          ReadKeptGateAgain().IgnoreError();           // said in the log; the gate it has stays
          st = FirstPlacement(&unread_since);
        }
        if (st.ok() && !LeaseLost()) {  // lost meanwhile: OnLeaseLost dropped the table
          AwaitPlacedShardsInRotation(absl::Seconds(5));
          // OnLeaseLost says NOT_SERVING under serving_mu: SERVING is said only before it.
          std::lock_guard<std::mutex> s(serving_mu);
          if (!LeaseLost()) {
            server->GetHealthCheckService()->SetServingStatus(true);
            ready.Notify();
          }
        } else if (!st.message().empty()) {
          std::lock_guard<std::mutex> l(models_mu);
          not_ready_why = std::string(st.message());
        }
      } else {
        // Reconcile would work from a table that may not be the shards' until then.
        if (RegrantPending()) TakeOverAgain();
        if (!RegrantPending()) Reconcile();
      }
      lock.lock();
      control_cv.wait_for(lock,
                          ready.HasBeenNotified()
                              ? absl::ToChronoNanoseconds(options.reconcile_interval)
                              : std::chrono::milliseconds(250),
                          [this] { return stopping || control_wake; });
      control_wake = false;
    }
  }

  // ---- RPC handlers ----

  // Checks the call's token. A call refused is answered UNAUTHENTICATED and counted under
  // `method` in the request metrics.
  bool Admit(grpc::CallbackServerContext* ctx, grpc::ServerUnaryReactor* reactor,
             const char* method) {
    if (Authorized(ctx)) return true;
    metrics->Request(method, CodeName(absl::StatusCode::kUnauthenticated), 0.0);
    reactor->Finish(Unauthenticated());
    return false;
  }

  // Finishes a unary call answered on the gRPC thread, counted under `method`.
  void Answer(grpc::ServerUnaryReactor* reactor, const char* method,
              std::chrono::steady_clock::time_point start, const grpc::Status& st) {
    metrics->Request(method, CodeName(static_cast<absl::StatusCode>(st.error_code())),
                     Seconds(start));
    reactor->Finish(st);
  }

  // Checks the token, then runs `work(deadline)` (which returns the call's status) on the admin
  // pool and finishes the unary call with it, recorded under `method` in the request metrics. A
  // call whose deadline passed while it waited for a thread is not started. The deadline is cut
  // to --timeout-s; with `uncapped`, it is the client's own, or that long without one.
  template <typename Work>
  grpc::ServerUnaryReactor* Offload(grpc::CallbackServerContext* ctx, const char* method, Work work,
                                    std::optional<absl::Duration> uncapped = std::nullopt) {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    if (!Admit(ctx, reactor, method)) return reactor;
    const auto start = std::chrono::steady_clock::now();
    const absl::Time client_deadline = ClientDeadline(ctx);
    const absl::Time deadline = !uncapped.has_value() ? Capped(client_deadline)
                                : client_deadline != absl::InfiniteFuture()
                                    ? client_deadline
                                    : common::MonotonicNow() + *uncapped;
    if (!admin_pool->Submit([this, reactor, method, start, deadline, client_deadline, uncapped,
                             work = std::move(work)] {
          absl::Status st =
              common::MonotonicNow() < deadline
                  ? work(deadline)
                  : absl::DeadlineExceededError(absl::StrCat(
                        method,
                        ": the deadline passed while the call waited behind other "
                        "training, save and rebalance calls; try again with a longer deadline"));
          if (!uncapped.has_value()) {
            st = NameCap(std::move(st), client_deadline, deadline);
          } else if (absl::IsDeadlineExceeded(st) && client_deadline == absl::InfiniteFuture()) {
            st = absl::DeadlineExceededError(
                absl::StrCat(st.message(), " (a ", method, " that comes without a deadline gets ",
                             absl::FormatDuration(*uncapped), "; give it a longer one)"));
          }
          metrics->Request(method, CodeName(st.code()), Seconds(start));
          reactor->Finish(common::ToGrpcStatus(st));
        })) {
      reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "router is shutting down"));
    }
    return reactor;
  }

  // Infer's reactor: the default one, but for the client's cancellation.
  class InferReactor final : public grpc::ServerUnaryReactor {
   public:
    explicit InferReactor(std::shared_ptr<RequestCancel> cancel) : cancel_(std::move(cancel)) {}
    void OnCancel() override { cancel_->Cancel(); }
    void OnDone() override { delete this; }

   private:
    const std::shared_ptr<RequestCancel> cancel_;
  };

  grpc::ServerUnaryReactor* Infer(grpc::CallbackServerContext* ctx, const v1::InferRequest* req,
                                  v1::InferResponse* resp) override {
    const absl::Time client_deadline = ClientDeadline(ctx);
    auto cancel =
        std::make_shared<RequestCancel>(dispatcher.get(), client_deadline, &shutting_down);
    grpc::ServerUnaryReactor* reactor = new InferReactor(cancel);
    if (!Admit(ctx, reactor, "Infer")) return reactor;
    const auto start = std::chrono::steady_clock::now();
    const absl::Time deadline = Capped(client_deadline);
    Forward(req, resp, deadline, std::move(cancel),
            [this, reactor, start, deadline, client_deadline](absl::Status st) {
              st = NameCap(std::move(st), client_deadline, deadline);
              metrics->Request("Infer", CodeName(st.code()), Seconds(start));
              reactor->Finish(common::ToGrpcStatus(st));
            });
    return reactor;
  }

  grpc::ServerBidiReactor<v1::InferRequest, v1::InferResponse>* InferStream(
      grpc::CallbackServerContext* ctx) override;

  // Decodes an [N, d_model] tensor of finite values.
  absl::StatusOr<std::vector<float>> FiniteMatrix(const v1::Tensor& t, const char* what,
                                                  int64_t* n) {
    const int64_t d = config.d_model;
    if (t.shape_size() == 2 && t.shape(0) > options.max_batch_tokens) {
      return absl::ResourceExhaustedError(absl::StrCat(what, ": ", t.shape(0),
                                                       " tokens exceed the limit of ",
                                                       options.max_batch_tokens));
    }
    common::DecodeLimits limits;
    limits.max_elements = options.max_batch_tokens * d;
    ASSIGN_OR_RETURN(common::TensorView v, common::DecodeMatrix(t, what, d, limits));
    *n = v.dim(0);
    std::vector<float> x = common::ViewToFloat(v);
    RETURN_IF_ERROR(common::CheckTokens(x, *n, d, what));
    return x;
  }

  absl::Status Train(const v1::TrainStepRequest& req, v1::TrainStepResponse* resp,
                     absl::Time deadline) {
    if (trainer == nullptr) {
      return absl::FailedPreconditionError(
          "TrainStep needs the coordinator: start moe-router with --coordinator HOST:PORT");
    }
    int64_t n = 0, n_dy = 0;
    ASSIGN_OR_RETURN(std::vector<float> x, FiniteMatrix(req.tokens(), "tokens", &n));
    ASSIGN_OR_RETURN(std::vector<float> dy, FiniteMatrix(req.grad_output(), "grad_output", &n_dy));
    if (n_dy != n) {
      return absl::InvalidArgumentError(absl::StrCat("grad_output has ", n_dy,
                                                     " rows, tokens has ", n));
    }
    // A negative rate would climb the loss, a negative coefficient reward imbalance.
    for (auto [name, v] : {std::pair<const char*, float>{"learning_rate", req.learning_rate()},
                           {"aux_loss_coef", req.aux_loss_coef()},
                           {"z_loss_coef", req.z_loss_coef()}}) {
      if (!std::isfinite(v) || v < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, " must be a finite number >= 0, got ", v));
      }
    }
    // Refused before the training lock too, which the catch-up needs (and again below: a grant
    // may come while the step waits for the lock).
    if (RegrantPending()) return RegrantRefusal();
    std::unique_lock<common::TimedMutex> lock(train_mu, std::defer_lock);
    if (!lock.try_lock_for(common::TimeLeft(deadline))) {
      return absl::DeadlineExceededError(
          "the deadline passed while waiting for the previous training step or an expert copy "
          "to finish");
    }
    std::shared_ptr<const RoutingTable> t = Table();
    if (t == nullptr) return NotReady();
    // A coordinator that cannot be reached fails the step before it starts: its commit would
    // wait out the step's whole deadline, then be settled as a lost verdict.
    const absl::Duration connect_wait =
        coordinator_channel->GetState(/*try_to_connect=*/true) == GRPC_CHANNEL_TRANSIENT_FAILURE
            ? kCoordinatorReconnectWait
            : kCoordinatorConnectWait;
    const absl::Time connect_by = std::min(deadline, common::MonotonicNow() + connect_wait);
    if (!coordinator_channel->WaitForConnected(common::ToWallDeadline(connect_by))) {
      if (connect_by == deadline) {
        return absl::DeadlineExceededError(absl::StrCat(
            "the deadline passed while waiting for a connection to coordinator ",
            options.coordinator, ": the step was not started and no weight changed"));
      }
      return absl::UnavailableError(absl::StrCat(
          "coordinator ", options.coordinator, " does not answer (",
          absl::FormatDuration(connect_wait),
          " without a connection): the step was not started and no weight changed; check that "
          "it runs and that the router's --coordinator names it"));
    }
    // A step copies replicas and changes weights: only the holder of a current lease runs one
    // (a router just woken from a stall learns here that another took over).
    if (!MayPlaceNow()) return PlacementRefusal();
    if (RegrantPending()) return RegrantRefusal();
    // Every replica at the same step first: the step stamps its id on each one it updates.
    RETURN_IF_ERROR(trainer->RetryConfirmations(*t));
    RETURN_IF_ERROR(ReloadStale(*t, /*trained=*/nullptr, /*before_step=*/true));
    std::shared_ptr<const common::GateWeights> gw = Gate();
    TrainParams p{req.learning_rate(), req.aux_loss_coef(), req.z_loss_coef(),
                  options.capacity_factor, options.bf16_allreduce};
    ASSIGN_OR_RETURN(TrainResult r, trainer->Step(*t, *gw, x.data(), dy.data(), n, p, deadline));
    // The experts that had rows reached this step (their replicas carry its id): known now, not
    // only once a later status read sees it, so a replica restarting right after still has its
    // loss reported (ReloadStale).
    for (size_t e = 0; e < r.gating.expert_load.size(); ++e) {
      if (r.gating.expert_load[e] > 0) {
        uint64_t& reached = reached_step[static_cast<int>(e)];
        reached = std::max(reached, r.step);
      }
    }
    auto next = std::make_shared<common::GateWeights>(*gw);
    for (size_t i = 0; i < next->weight.size(); ++i) {
      next->weight[i] -= req.learning_rate() * r.gate_weight[i];
    }
    for (size_t i = 0; i < next->bias.size(); ++i) {
      next->bias[i] -= req.learning_rate() * r.gate_bias[i];
    }
    resp->set_step(restored_steps + ++steps_done);
    gate_step = r.step;
    KeepGate(*next, r.step);
    {
      // The gate now trains with the experts: the warning's advice (the --state-dir of the router
      // that trained them) would throw this step away.
      std::lock_guard<std::mutex> lock(models_mu);
      gate_warning.clear();
    }
    {
      std::lock_guard<std::mutex> gl(gate_mu);
      gate = std::move(next);
    }
    common::EncodeTensor(r.grad_input, {n, config.d_model}, common::WireType::kFloat32,
                         resp->mutable_grad_input());
    v1::RoutingStats* s = resp->mutable_stats();
    s->set_dropped_assignments(r.gating.dropped);
    s->set_load_balance_loss(r.gating.load_balance_loss);
    s->set_router_z_loss(r.gating.router_z_loss);
    std::lock_guard<std::mutex> lost_lock(lost_mu);
    for (int e : lost_untold) resp->add_lost_training_experts(e);
    lost_untold.clear();
    return absl::OkStatus();
  }

  absl::Status Save(const v1::SaveCheckpointRequest& req, v1::SaveCheckpointResponse* resp,
                    absl::Time deadline = absl::InfiniteFuture()) {
    if (req.path().empty()) return absl::InvalidArgumentError("path is empty");
    // Over the file this router serves from (a helper's walk-through, 2026-12-06: written without
    // a word), every --state-dir kept from it, the router's gate and the shards' experts, would be
    // ignored at the next start as trained from other weights, and the model would read as
    // trained from a checkpoint it was not.
    struct stat to, from;
    if (stat(req.path().c_str(), &to) == 0 && stat(options.checkpoint.c_str(), &from) == 0 &&
        to.st_dev == from.st_dev && to.st_ino == from.st_ino) {
      return absl::FailedPreconditionError(absl::StrCat(
          req.path(), " is the checkpoint this router serves (--checkpoint ", options.checkpoint,
          "): written over, the training its shards and router keep in their --state-dir would "
          "be ignored at their next start; save to another path, and start the cluster from "
          "that file"));
    }
    // Into a --state-dir (a helper's walk-through, 2026-12-07: over a shard's
    // expert-4.safetensors, whose training the shard lost at its next start): this router's,
    // or a directory holding a shard's .lock or a router's gate.lock (left there after their
    // process). Refused whatever the name: a file there could take the place of what the
    // directory keeps.
    std::filesystem::path into = std::filesystem::path(req.path()).parent_path();
    if (into.empty()) into = ".";
    {
      std::error_code ec, own_ec;
      std::string why;
      if (!options.state_dir.empty() &&
          std::filesystem::weakly_canonical(into, ec) ==
              std::filesystem::weakly_canonical(options.state_dir, own_ec) &&
          !ec && !own_ec) {
        why = "this router's --state-dir";
      } else if (std::filesystem::exists(into / ".lock", ec)) {
        why = "a --state-dir: it holds .lock, as a shard's does";
      } else if (std::filesystem::exists(into / "gate.lock", ec)) {
        why = "a --state-dir: it holds gate.lock, as a router's does";
      }
      if (!why.empty()) {
        return absl::FailedPreconditionError(absl::StrCat(
            req.path(), " is in ", into.string(), ", ", why,
            "; a file written there could take the place of the training it keeps: save to "
            "another directory"));
      }
    }
    if (RegrantPending()) return RegrantRefusal();  // before the lock too, as in Train
    // Weights do not move while we read them. Bounded: a step stuck on the coordinator must not
    // hold this call (and its admin thread) past the step's own wait.
    std::unique_lock<common::TimedMutex> lock(train_mu, std::defer_lock);
    if (!lock.try_lock_for(kTrainWait)) {
      return absl::UnavailableError(
          "a training step is still running; try the save again once it ends");
    }
    std::shared_ptr<const RoutingTable> t = Table();
    if (t == nullptr) return NotReady();
    if (RegrantPending()) return RegrantRefusal();
    if (trainer != nullptr) {  // a replica that has not confirmed the last commit may be stale
      RETURN_IF_ERROR(trainer->RetryConfirmations(*t));
    }
    // Replicas behind their expert's latest step are copied up to it, and an expert whose every
    // replica is behind is reported as having lost its training, before they are read (as on
    // the control loop's next tick), within the call's deadline; without a coordinator too
    // (shards back from their --state-dir). A failure is logged; the replicas are compared.
    if (MayPlace()) {
      ReloadStale(*t, /*trained=*/nullptr, /*before_step=*/false, deadline).IgnoreError();
    }
    common::Checkpoint ck;
    ck.config = config;
    ck.gate = *Gate();
    ck.experts.resize(config.num_experts);
    bool identical = true;
    for (int e = 0; e < config.num_experts; ++e) {
      // Every replica in rotation is read and compared. One out of rotation (a dead or stalled
      // shard) is tried only while no replica has been read; a replica that cannot be read is
      // reported, and the expert fails the save only when none could be.
      std::vector<int> order = t->placement.replicas[e];
      std::stable_partition(order.begin(), order.end(),
                            [&](int s) { return t->shards[s]->healthy(); });
      bool divergent = false;
      int read = 0;
      std::vector<std::string> unread;
      for (int s : order) {
        const std::string& address = t->shards[s]->address();
        absl::StatusOr<std::string> bytes =
            read > 0 && !t->shards[s]->healthy()
                ? absl::UnavailableError("out of rotation")
                : t->shards[s]->ExportExpert(e, absl::Seconds(60));
        absl::StatusOr<common::ExpertWeights> w =
            bytes.ok() ? common::ParseExpert(*bytes, config, e) : bytes.status();
        if (!w.ok()) {  // unreachable, not loaded there, or a bad copy: another replica may do
          unread.push_back(absl::StrCat("expert ", e, " on ", address, ": ",
                                        w.status().message()));
          continue;
        }
        if (read++ == 0) {
          ck.experts[e] = std::move(*w);
        } else if (!SameBits(*w, ck.experts[e])) {
          divergent = true;
        }
      }
      if (read == 0) {
        return absl::UnavailableError(absl::StrCat("no replica of expert ", e,
                                                   " could be read: ", absl::StrJoin(unread, "; ")));
      }
      for (std::string& u : unread) resp->add_unread_replicas(std::move(u));
      if (divergent) {
        identical = false;
        resp->add_divergent_experts(e);
      }
    }
    if (absl::Status st = common::SaveCheckpoint(req.path(), ck, options.load.tensor_prefix);
        !st.ok()) {
      // The file could not be written: the path is the router's, which a client on another
      // host may not have in mind.
      const bool writing = st.code() == absl::StatusCode::kPermissionDenied ||
                           st.code() == absl::StatusCode::kFailedPrecondition ||
                           st.code() == absl::StatusCode::kDataLoss;
      if (!writing) return st;
      return absl::Status(st.code(), absl::StrCat("on the router's host, ", st.message()));
    }
    {
      // Where it went, whole: a relative path is the router's working directory's.
      std::error_code ec;
      const std::filesystem::path whole = std::filesystem::absolute(req.path(), ec);
      resp->set_path(ec ? req.path() : whole.string());
    }
    resp->set_replicas_identical(identical);
    resp->set_step(restored_steps + steps_done.load());
    std::lock_guard<std::mutex> lost_lock(lost_mu);
    for (int e : lost_training) resp->add_lost_training_experts(e);
    return absl::OkStatus();
  }

  grpc::ServerUnaryReactor* TrainStep(grpc::CallbackServerContext* ctx,
                                      const v1::TrainStepRequest* req,
                                      v1::TrainStepResponse* resp) override {
    return Offload(ctx, "TrainStep",
                   [this, req, resp](absl::Time deadline) { return Train(*req, resp, deadline); });
  }

  grpc::ServerUnaryReactor* SaveCheckpoint(grpc::CallbackServerContext* ctx,
                                           const v1::SaveCheckpointRequest* req,
                                           v1::SaveCheckpointResponse* resp) override {
    return Offload(ctx, "SaveCheckpoint",
                   [this, req, resp](absl::Time deadline) { return Save(*req, resp, deadline); });
  }

  grpc::ServerUnaryReactor* GetClusterInfo(grpc::CallbackServerContext* ctx,
                                           const v1::GetClusterInfoRequest*,
                                           v1::ClusterInfo* info) override {
    auto* reactor = ctx->DefaultReactor();
    if (!Admit(ctx, reactor, "GetClusterInfo")) return reactor;
    const auto start = std::chrono::steady_clock::now();
    info->set_d_model(config.d_model);
    info->set_d_ff(config.d_ff);
    info->set_num_experts(config.num_experts);
    info->set_top_k(config.top_k);
    info->set_activation(std::string(common::ActivationName(config.activation)));
    info->set_gated(config.gated);
    info->set_normalize_topk(config.normalize_topk);
    info->set_capacity_factor(options.capacity_factor);
    info->set_max_request_tokens(options.max_batch_tokens);
    if (coordinator_channel != nullptr) {
      info->set_coordinator(options.coordinator);
      info->set_coordinator_state(CoordinatorState());
      info->set_placement_lease(lease == nullptr ? "" : lease->State());
    }
    std::shared_ptr<const RoutingTable> t = Table();
    info->set_placement_strategy(
        std::string(StrategyName(t ? t->placement.strategy : strategy.load())));
    if (t) info->set_placement_version(t->placement.version);
    if (!t) info->set_not_ready(std::string(NotReady().message()));
    {
      std::lock_guard<std::mutex> lock(models_mu);
      if (!gate_warning.empty()) info->add_warnings(gate_warning);
    }
    for (int s = 0; t && s < static_cast<int>(t->shards.size()); ++s) {
      v1::ShardInfo* si = info->add_shards();
      si->set_address(t->shards[s]->address());
      const bool healthy = t->shards[s]->healthy();
      si->set_healthy(healthy);
      si->set_state(healthy                          ? "serving"
                    : t->shards[s]->answering()      ? "not_serving"
                                                     : "unreachable");
      for (int e : t->placement.ExpertsOn(s)) si->add_experts(e);
      si->set_placement_version(t->placement.version);
      if (!healthy) {
        const ShardClient::OutOfRotation out = t->shards[s]->out_of_rotation();
        if (!out.why.empty()) {
          si->set_out_of_rotation_reason(out.why);
          si->set_out_of_rotation_ms(absl::ToInt64Milliseconds(common::MonotonicNow() - out.since));
        }
      }
    }
    {
      // The entry of `address` among those listed so far, or null.
      auto listed = [&](const std::string& address) -> v1::ShardInfo* {
        for (auto& placed : *info->mutable_shards()) {
          if (placed.address() == address) return &placed;
        }
        return nullptr;
      };
      std::lock_guard<std::mutex> lock(models_mu);
      for (auto& placed : *info->mutable_shards()) {
        placed.set_draining(!placed.healthy() && draining_now.count(placed.address()) > 0);
      }
      for (const auto& [address, why] : models) {
        if (why.empty()) continue;  // this router's model
        // One still placed (found by the last status read, taken out on the next tick).
        v1::ShardInfo* si = listed(address);
        if (si == nullptr) si = info->add_shards();
        si->set_healthy(false);
        si->set_address(address);
        si->set_state("incompatible");
        si->set_detail(why);
      }
      for (const std::string& address : not_placed) {
        if (listed(address) != nullptr) continue;
        v1::ShardInfo* si = info->add_shards();
        si->set_address(address);
        si->set_healthy(false);
        si->set_state("unreachable");
        si->set_detail("not placed: it does not answer, and is given experts once it does");
      }
    }
    Answer(reactor, "GetClusterInfo", start, grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* GetPlacement(grpc::CallbackServerContext* ctx,
                                         const v1::GetPlacementRequest*,
                                         v1::Placement* out) override {
    auto* reactor = ctx->DefaultReactor();
    if (!Admit(ctx, reactor, "GetPlacement")) return reactor;
    const auto start = std::chrono::steady_clock::now();
    std::shared_ptr<const RoutingTable> t = Table();
    if (t == nullptr) {
      Answer(reactor, "GetPlacement", start,
             grpc::Status(grpc::StatusCode::UNAVAILABLE, "the initial placement is still loading"));
      return reactor;
    }
    *out = ToProto(t->placement, true);
    Answer(reactor, "GetPlacement", start, grpc::Status::OK);
    return reactor;
  }

  // Whether placements `a` and `b` are the same strategy placing the same replicas.
  static bool SameLayout(const Placement& a, const Placement& b) {
    return a.strategy == b.strategy && a.replicas == b.replicas;
  }

  // FAILED_PRECONDITION when a user's switch to `p` (from `live`, over `current` shards of
  // which `usable` are in rotation) must be refused: the static strategies place by formula,
  // down shards included, so one could leave an expert with every replica out of rotation (its
  // requests would all fail), or load experts onto a shard out of rotation (`replicated` with a
  // shard down: the load would fail there, and the switch with it). A trained expert copied
  // onto a shard needs a replica to copy from, in rotation or draining: where its only holders
  // are down, SwitchLocked would refuse (UNAVAILABLE) after taking a version, and a dry run
  // would not have said so. `deadline` bounds the status reads of holders out of rotation. `p` the
  // same as `live` is checked too: a strategy asked for again that leaves experts unserved is no
  // answer to give without a word.
  absl::Status CheckSwitchable(const Placement& p,
                               const std::vector<std::shared_ptr<ShardClient>>& current,
                               const std::vector<bool>& usable, const Placement& live,
                               absl::Time deadline) {
    const bool same = SameLayout(p, live);
    const bool trained = KnownTrained();
    // Whether expert e's trained weights may be read from a replica `live` places: one in
    // rotation, or a READY one on a shard that drains (whether it is at the expert's latest
    // step, DrainingHolder tells in the switch); always, for an untrained model (the
    // checkpoint's).
    StatusReads statuses;
    auto has_source = [&](int e) {
      if (!trained || live.replicas[e].empty()) return true;
      for (int s : live.replicas[e]) {
        if (usable[s]) return true;
        if (ReadyWhileDraining(*current[s], e, deadline, &statuses) != nullptr) return true;
      }
      return false;
    };
    // `dynamic` places on the shards in rotation, copying there what it must: offered where
    // every expert has a replica to copy from (else it is refused too).
    bool dynamic_serves = true;
    for (int e = 0; e < static_cast<int>(p.replicas.size()) && dynamic_serves; ++e) {
      dynamic_serves = has_source(e);
    }
    const char* or_dynamic = p.strategy == Strategy::kDynamic || !dynamic_serves
                                 ? ""
                                 : ", or choose dynamic, which places replicas only on shards "
                                   "in rotation";
    std::vector<int> stranded;
    std::set<std::string> down;
    for (int e = 0; e < static_cast<int>(p.replicas.size()); ++e) {
      bool served = false;
      for (int r : p.replicas[e]) {
        served = served || usable[r];
        if (!usable[r]) down.insert(current[r]->address());
      }
      if (!served) stranded.push_back(e);
    }
    if (!stranded.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          StrategyName(p.strategy), " placement ", same ? "(the live one) leaves" : "would leave",
          " experts ", absl::StrJoin(stranded, ","),
          " with no replica on a shard in rotation (out of rotation: ", absl::StrJoin(down, ", "),
          same ? "): their requests fail UNAVAILABLE. " : "); the current placement stays. ",
          down.size() == 1 ? "Bring the shard back" : "Bring the shards back", or_dynamic));
    }
    const std::set<std::string> onto_down = LoadsOntoDown(p, current, usable, live, current);
    if (!onto_down.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          StrategyName(p.strategy), " placement would load experts onto ",
          absl::StrJoin(onto_down, ", "), ", out of rotation; the current placement stays. ",
          onto_down.size() == 1 ? "Bring the shard back" : "Bring the shards back", or_dynamic));
    }
    std::vector<int> no_source;
    std::set<std::string> holders;
    for (int e = 0; e < static_cast<int>(p.replicas.size()); ++e) {
      bool copied = false;  // p places e on a shard that live does not
      for (int r : p.replicas[e]) {
        copied = copied || std::find(live.replicas[e].begin(), live.replicas[e].end(), r) ==
                               live.replicas[e].end();
      }
      if (!copied || has_source(e)) continue;
      no_source.push_back(e);
      for (int s : live.replicas[e]) holders.insert(current[s]->address());
    }
    if (!no_source.empty()) {
      // Also where a holder is only starting again (it serves once it has loaded them): the
      // call cannot tell that from a shard that is gone, and says what to wait for.
      return absl::FailedPreconditionError(absl::StrCat(
          StrategyName(p.strategy), " placement would copy trained experts ",
          absl::StrJoin(no_source, ","),
          " onto other shards, but every shard that holds them is out of rotation (",
          absl::StrJoin(holders, ", "), "); the current placement stays. ",
          holders.size() == 1 ? "Bring the shard back first (or wait until it serves again, if "
                                "it is starting): their training is on it"
                              : "Bring the shards back first (or wait until they serve again, if "
                                "they are starting): their training is on them"));
    }
    return absl::OkStatus();
  }

  grpc::ServerUnaryReactor* Rebalance(grpc::CallbackServerContext* ctx,
                                      const v1::RebalanceRequest* req,
                                      v1::Placement* out) override {
    // Not cut to --timeout-s: a switch's loads take what the experts' size needs, and a model
    // whose loads outlast the cap could never switch (each attempt's loads unloaded again). It
    // ends by the client's own deadline (kRebalanceWithoutDeadline without one), and a call its
    // client cancels applies nothing either.
    auto work = [this, req, out, ctx](absl::Time deadline) -> absl::Status {
      if (!req->dry_run() && !MayPlaceNow()) return PlacementRefusal();
      if (!req->dry_run() && RegrantPending()) return RegrantRefusal();
      // No strategy: the one of the table each attempt reads, so that a retry after another
      // operator's switch keeps that switch's strategy instead of undoing it.
      std::optional<Strategy> asked;
      if (!req->strategy().empty()) {
        ASSIGN_OR_RETURN(asked, ParseStrategy(req->strategy()));
      }
      // Worked out again over the new placement when another switch came in meanwhile.
      for (int attempt = 1;; ++attempt) {
        std::vector<std::shared_ptr<ShardClient>> current;
        std::vector<bool> usable;
        Placement live;
        ASSIGN_OR_RETURN(Placement p,
                         ProposeOverLiveTable(asked, &current, &usable, &live, deadline));
        // The live placement again (a rebalance to the current strategy with nothing changed,
        // or one resent after a reconnect) is answered with it: a new version would move nothing.
        // Unless it leaves experts with no replica in rotation (CheckSwitchable says so).
        const bool unchanged = SameLayout(p, live);
        const absl::Status refusal = CheckSwitchable(p, current, usable, live, deadline);
        if (req->dry_run()) {  // the proposal, and why the call itself would be refused
          *out = ToProto(p, false);
          out->set_refusal(std::string(refusal.message()));
          return absl::OkStatus();
        }
        RETURN_IF_ERROR(refusal);
        if (unchanged) {
          *out = ToProto(live, true);
          return absl::OkStatus();
        }
        const absl::Status st = Apply(p, std::move(current), live.version, /*user=*/true, deadline,
                                      [ctx] { return ctx->IsCancelled(); });
        if (absl::IsAborted(st) && attempt < 3) continue;
        RETURN_IF_ERROR(st);
        *out = ToProto(Table()->placement, true);
        return absl::OkStatus();
      }
    };
    return Offload(ctx, "Rebalance", std::move(work), kRebalanceWithoutDeadline);
  }

  void DoShutdown(absl::Duration grace) {
    std::call_once(shutdown_once, [&] {
      server->GetHealthCheckService()->Shutdown();
      {
        std::lock_guard<std::mutex> lock(control_mu);
        stopping = true;
      }
      control_cv.notify_all();
      // The control loop may be inside a switch, loading experts (minutes at most): end those
      // calls, so that it returns now, leaving the current placement as it is.
      shutting_down = true;
      CloseStreams();
      std::vector<std::shared_ptr<ShardClient>> all;
      {
        std::lock_guard<std::mutex> lock(clients_mu);
        for (const auto& [address, client] : clients) all.push_back(client);
      }
      if (std::shared_ptr<const RoutingTable> t = Table()) {
        all.insert(all.end(), t->shards.begin(), t->shards.end());
      }
      for (const auto& c : all) c->CancelAdminCalls();
      // Their health threads outlive this object's members (they stop with the clients, which
      // are destroyed last): no call into it from them after this.
      for (const auto& c : all) c->SetStillNeeded(nullptr);
      all.clear();
      if (control.joinable()) control.join();
      // Requests in flight may finish within the grace period; after it, whatever still waits
      // for a shard fails with UNAVAILABLE, so the server's shutdown (which waits for every
      // call to finish) ends, and no batch is left holding a shard client.
      const absl::Time until = common::MonotonicNow() + grace;
      std::thread cancel_late([this, until] {
        {
          std::unique_lock<std::mutex> lock(inflight_mu);
          inflight_cv.wait_for(lock, common::TimeLeft(until), [this] { return inflight == 0; });
        }
        dispatcher->Shutdown();
      });
      server->Shutdown(common::ToWallDeadline(until));
      pool->Shutdown();
      admin_pool->Shutdown();
      cancel_late.join();
      // No switch can start now (the control loop and Rebalance's pool have ended): the lease,
      // renewed until now, is given up.
      if (lease != nullptr) {
        lease->Stop();
        lease->Release();
      }
      // Forwards use this object until their `done` has run.
      std::unique_lock<std::mutex> lock(inflight_mu);
      inflight_cv.wait(lock, [this] { return inflight == 0; });
    });
  }

  // Null without a coordinator: the router places without a lease. Declared last, so that it is
  // destroyed first: its thread calls into the members above until it ends (DoShutdown ends it).
  std::unique_ptr<PlacementLease> lease;
};

// InferStream: requests are forwarded concurrently (up to kMaxInFlight per stream); responses go
// back in request order. State shared with the forwards lives in a core that outlives the
// reactor.
struct InferStreamCore : common::StreamOutbox<v1::InferRequest, v1::InferResponse> {
  std::map<uint64_t, std::unique_ptr<v1::InferResponse>> done;  // finished, not yet written
  uint64_t next_to_write = 0;
  // Reading stops while this many requests are in flight, and resumes as they complete.
  static constexpr int kMaxInFlight = 64;
  bool read_paused = false;
  std::function<void()> resume_read;  // the reactor's StartRead; valid while reactor is set

  // The requests in flight, for the client's cancellation of the stream (mu).
  std::map<uint64_t, std::shared_ptr<RequestCancel>> cancels;

  // The client cancelled the stream: so are the requests in flight.
  void CancelRequests() {
    std::map<uint64_t, std::shared_ptr<RequestCancel>> all;
    {
      std::lock_guard<std::mutex> lock(mu);
      all.swap(cancels);
    }
    for (auto& [seq, cancel] : all) cancel->Cancel();
  }

  void Complete(uint64_t seq, std::unique_ptr<v1::InferResponse> resp) {
    std::lock_guard<std::mutex> lock(mu);
    --pending;
    cancels.erase(seq);
    if (read_paused && ReadingLocked() && reactor != nullptr && pending < kMaxInFlight) {
      read_paused = false;
      resume_read();
    }
    done[seq] = std::move(resp);
    while (!done.empty() && done.begin()->first == next_to_write) {
      PushLocked(std::move(done.begin()->second));
      done.erase(done.begin());
      ++next_to_write;
    }
    MaybeFinishLocked();
  }
};

class InferStreamReactor final : public grpc::ServerBidiReactor<v1::InferRequest, v1::InferResponse> {
 public:
  InferStreamReactor(RouterServer::Impl* impl, grpc::CallbackServerContext* ctx)
      : impl_(impl), ctx_(ctx), core_(std::make_shared<InferStreamCore>()) {
    core_->reactor = this;
    core_->resume_read = [this] { StartRead(&request_); };
    if (!impl_->Authorized(ctx)) {
      impl_->metrics->Request("InferStream", CodeName(absl::StatusCode::kUnauthenticated), 0.0);
      core_->End(RouterServer::Impl::Unauthenticated());
      return;
    }
    {
      std::lock_guard<std::mutex> lock(impl_->streams_mu);
      impl_->streams.insert(core_);
    }
    // Registered before the check: a shutdown that began since either sees this stream or is
    // seen here.
    if (impl_->shutting_down.load()) {
      core_->CloseWhenIdle(RouterServer::Impl::GoingAway());  // nothing pending: ends it now
      return;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      core_->ReadsDone();
      return;
    }
    auto req = std::make_shared<v1::InferRequest>(std::move(request_));
    const uint64_t seq = next_seq_++;
    const absl::Time client_deadline = RouterServer::Impl::ClientDeadline(ctx_);
    auto cancel = std::make_shared<RequestCancel>(impl_->dispatcher.get(), client_deadline,
                                                  &impl_->shutting_down);
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      // A read started before the stream was ended (a shutdown closing it while idle, or the
      // client's cancellation): its answer could not be written, and the client was told to
      // send it elsewhere.
      if (core_->finished) return;
      ++core_->pending;
      // With the check above: a cancellation of the stream either came first or finds it.
      core_->cancels[seq] = cancel;
      if (core_->ReadingLocked()) {
        if (core_->pending < InferStreamCore::kMaxInFlight) {
          StartRead(&request_);
        } else {
          core_->read_paused = true;
        }
      }
    }
    const absl::Time deadline = impl_->Capped(client_deadline);
    const auto start = std::chrono::steady_clock::now();
    RouterServer::Impl* impl = impl_;
    std::shared_ptr<InferStreamCore> core = core_;
    auto resp = std::make_shared<v1::InferResponse>();
    impl->Forward(req.get(), resp.get(), deadline, std::move(cancel),
                  [impl, core, req, resp, seq, start, deadline, client_deadline](absl::Status st) {
                    st = impl->NameCap(std::move(st), client_deadline, deadline);
                    impl->metrics->Request("InferStream", CodeName(st.code()), Seconds(start));
                    auto out = std::make_unique<v1::InferResponse>();
                    if (st.ok()) {
                      out->Swap(resp.get());
                    } else {
                      out->set_request_id(req->request_id());
                      out->set_code(static_cast<int>(st.code()));
                      out->set_message(std::string(st.message()));
                    }
                    core->Complete(seq, std::move(out));
                  });
  }

  void OnWriteDone(bool ok) override { core_->WriteDone(ok); }

  void OnCancel() override {
    core_->End(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the caller"));
    core_->CancelRequests();
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(impl_->streams_mu);
      impl_->streams.erase(core_);
    }
    core_->Detach();
    delete this;
  }

 private:
  RouterServer::Impl* impl_;
  grpc::CallbackServerContext* ctx_;
  std::shared_ptr<InferStreamCore> core_;
  v1::InferRequest request_;
  uint64_t next_seq_ = 0;
};

grpc::ServerBidiReactor<v1::InferRequest, v1::InferResponse>* RouterServer::Impl::InferStream(
    grpc::CallbackServerContext* ctx) {
  return new InferStreamReactor(this, ctx);
}

void RouterServer::Impl::CloseStreams() {
  std::vector<std::shared_ptr<InferStreamCore>> open;
  {
    std::lock_guard<std::mutex> lock(streams_mu);
    open.assign(streams.begin(), streams.end());
  }
  // Outside streams_mu: a Finish may run the reactor's OnDone, which takes it.
  for (const auto& core : open) core->CloseWhenIdle(GoingAway());
}

RouterServer::RouterServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

RouterServer::~RouterServer() {
  Shutdown();
  impl_->server->Wait();
}

absl::StatusOr<std::unique_ptr<RouterServer>> RouterServer::Start(RouterServerOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  impl->router_id = RandomId();
  RouterServerOptions& o = impl->options;
  if (o.checkpoint.empty()) return common::UsageError("--checkpoint is required");
  if (o.shards.empty() && o.coordinator.empty()) {
    return common::UsageError(
        "give --shards HOST:PORT,... or --coordinator HOST:PORT to follow its membership");
  }
  if (o.capacity_factor < 0) return common::UsageError("--capacity-factor must be >= 0");
  common::LoadOptions lo = o.load;
  lo.experts = std::vector<int>{};  // the router needs the gate only
  ASSIGN_OR_RETURN(std::unique_ptr<common::SafetensorsReader> reader,
                   common::SafetensorsReader::Open(o.checkpoint));
  ASSIGN_OR_RETURN(common::Checkpoint ck, common::LoadCheckpoint(*reader, lo));
  impl->config = ck.config;
  ASSIGN_OR_RETURN(impl->model_fingerprint,
                   common::ModelFingerprint(*reader, ck.config, lo.tensor_prefix));
  if (!o.state_dir.empty()) {
    impl->checkpoint_gate_print = common::GateFingerprint(ck.gate);
    RETURN_IF_ERROR(impl->ReadKeptGate(&ck.gate));
  }
  impl->gate = std::make_shared<const common::GateWeights>(std::move(ck.gate));
  if (!o.coordinator.empty()) {
    impl->coordinator_channel = grpc::CreateCustomChannel(
        o.coordinator, common::ChannelCredentials(), common::ClientChannelArgs(o.limits));
    impl->coordinator = v1::Coordinator::NewStub(impl->coordinator_channel);
    impl->coordinator_channel->GetState(/*try_to_connect=*/true);  // connected by READY
    v1::Coordinator::Stub* stub = impl->coordinator.get();
    Impl* lessee = impl.get();
    impl->trainer = std::make_unique<Trainer>(
        impl->config,
        [stub, lessee, address = o.coordinator](
            const v1::CommitStepRequest& sent) -> absl::StatusOr<v1::CommitStepResponse> {
          // Sent with this router's id: the coordinator refuses a step from a router that does
          // not hold the placement lease.
          v1::CommitStepRequest req = sent;
          req.set_router_id(lessee->router_id);
          // Longer than the coordinator can take (the reductions' timeout + 1 s, then 5 s for
          // the second phase): giving up first would abort a step it may be committing.
          grpc::ClientContext ctx;
          ctx.set_deadline(std::chrono::system_clock::now() +
                           std::chrono::milliseconds(req.timeout_ms() + 8000));
          // Wait for the channel rather than fail on a connection attempt that timed out: a
          // call that never left is no lost verdict, but the router cannot tell it from one,
          // and would wait out the coordinator's window (the first step of a router under
          // TSan failed so, its first connection slower than the cluster's 100 ms attempt).
          // gRPC sends the call at most once either way.
          ctx.set_wait_for_ready(true);
          v1::CommitStepResponse resp;
          grpc::Status st = stub->CommitStep(&ctx, req, &resp);
          if (!st.ok()) {
            const absl::Status e = common::FromGrpcStatus(st);
            return absl::Status(e.code(), absl::StrCat("coordinator ", address, ": ", e.message()));
          }
          return resp;
        });
  }
  impl->registry = o.registry ? o.registry : std::make_shared<prometheus::Registry>();
  impl->metrics = std::make_unique<RouterMetrics>(*impl->registry, impl->config.num_experts, o.shards);
  if (impl->coordinator != nullptr) {
    PlacementLease::Hooks hooks;
    hooks.regranted = [raw = impl.get()] {
      {
        std::lock_guard<std::mutex> l(raw->control_mu);
        raw->control_wake = true;  // TakeOverAgain now, not at the next tick
      }
      raw->control_cv.notify_all();
    };
    hooks.lost = [raw = impl.get()] {
      {
        // Taken so that WaitOrLeaseLost cannot test LeaseLost() and then wait past this notify.
        std::lock_guard<std::mutex> l(raw->control_mu);
      }
      raw->control_cv.notify_all();
    };
    hooks.loop_ended_lost = [raw = impl.get()] { raw->OnLeaseLost(); };
    impl->lease =
        std::make_unique<PlacementLease>(impl->coordinator.get(), o.coordinator, impl->router_id,
                                         impl->lease_epochs, impl->metrics.get(), std::move(hooks));
  }
  impl->load_stats = std::make_unique<LoadStats>(impl->config.num_experts);
  DispatcherOptions dopt;
  dopt.wire = o.wire;
  dopt.min_split_rows = o.min_split_rows;
  Impl* pooled = impl.get();
  dopt.offload = [pooled](std::function<void()> work) {
    return pooled->pool->Submit(std::move(work));
  };
  impl->dispatcher = std::make_unique<Dispatcher>(impl->config, std::move(dopt));
  impl->strategy.store(o.strategy);
  for (const std::string& a : o.shards) impl->ClientFor(a);
  impl->pool = std::make_unique<common::ThreadPool>(std::max(1, o.worker_threads));
  impl->admin_pool = std::make_unique<common::ThreadPool>(kAdminThreads);

  if (!o.metrics_address.empty()) {
    ASSIGN_OR_RETURN(impl->metrics_endpoint,
                     common::MetricsEndpoint::Start(o.metrics_address, impl->registry));
  }
  ASSIGN_OR_RETURN(common::StartedServer started,
                   common::StartServer(o.address, {impl.get()}, o.limits,
                                       common::Clients::kUsers));
  impl->server = std::move(started.server);
  impl->port = started.port;
  Impl* raw = impl.get();
  impl->metrics->SetPlacementLeaseHeld(impl->coordinator == nullptr);
  if (impl->lease != nullptr) {
    impl->lease->SetAddress(absl::StrCat(HostName(), ":", impl->port));
    impl->lease->Start();
  }
  impl->control = std::thread([raw] { raw->ControlLoop(); });
  return std::unique_ptr<RouterServer>(new RouterServer(std::move(impl)));
}

int RouterServer::port() const { return impl_->port; }
int RouterServer::metrics_port() const {
  return impl_->metrics_endpoint ? impl_->metrics_endpoint->port() : 0;
}
std::string RouterServer::address() const { return absl::StrCat("127.0.0.1:", impl_->port); }
void RouterServer::Shutdown(absl::Duration grace) { impl_->DoShutdown(grace); }
void RouterServer::Wait() { impl_->server->Wait(); }

absl::Status RouterServer::WaitOrLeaseLost(absl::Duration grace) {
  {
    std::unique_lock<std::mutex> lock(impl_->control_mu);
    impl_->control_cv.wait(lock, [this] { return impl_->stopping || impl_->LeaseLost(); });
  }
  const absl::Status lost = impl_->lease == nullptr ? absl::OkStatus() : impl_->lease->LostStatus();
  if (!lost.ok()) impl_->DoShutdown(grace);
  impl_->server->Wait();
  return lost;
}
const std::shared_ptr<prometheus::Registry>& RouterServer::registry() const {
  return impl_->registry;
}

absl::Status RouterServer::WaitUntilReady(absl::Duration timeout) {
  if (!impl_->ready.WaitForNotificationWithTimeout(timeout)) {
    return absl::DeadlineExceededError(
        "the router's placement is not live yet (are the shards up?)");
  }
  return absl::OkStatus();
}

}  // namespace moe::router
