#include "services/coordinator/coordinator_server.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "moe/v1/coordinator.grpc.pb.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "services/common/clock.h"
#include "services/common/failpoint.h"
#include "services/common/grpc_status.h"
#include "services/common/log.h"
#include "services/common/security.h"
#include "services/common/server_util.h"
#include "services/common/status_macros.h"
#include "services/common/thread_pool.h"

namespace moe::coordinator {

class CoordinatorServer::Impl final : public v1::Coordinator::CallbackService {
 public:
  CoordinatorOptions options;
  std::shared_ptr<prometheus::Registry> registry;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<common::MetricsEndpoint> metrics_endpoint;
  std::unique_ptr<common::ThreadPool> pool;
  int port = 0;

  std::mutex mu;
  // Leases and the settling window run on the steady clock: a step of the wall clock (NTP
  // after a host restart) neither expires every member nor keeps the coordinator settling.
  using Clock = std::chrono::steady_clock;
  std::map<std::string, Clock::time_point> members;
  uint64_t membership_version = 0;
  const Clock::time_point started = Clock::now();  // a lease from it, members still register
  std::atomic<uint64_t> generation{0};
  std::mutex step_mu;  // one step at a time
  // The placement lease (mu): the router that places experts on the members, and when it last
  // asked; empty id: none holds it.
  struct LeaseHolder {
    std::string id;
    std::string address;
    Clock::time_point renewed;
  } lease_holder;
  // What became of the last holder: "none" (no grant since the coordinator started; a router
  // that defers while settling is refused only then), "released" or "lapsed".
  std::string lease_previous = "none";
  // The epoch of the current (or last) grant: raised for each new holder, and past a router's
  // PlacementLeaseRequest.min_epoch. It starts from the wall clock (milliseconds since 1970
  // times 2^20, below 2^64 until the year 2500) so that a restarted coordinator's epochs
  // are above its last life's; a clock behind that is made up for by min_epoch.
  uint64_t lease_epoch = static_cast<uint64_t>(absl::ToUnixMillis(absl::Now())) << 20;

  prometheus::Family<prometheus::Counter>* steps_family;
  prometheus::Counter* commits;
  prometheus::Counter* aborts;
  prometheus::Family<prometheus::Counter>* failures_family;
  prometheus::Histogram* allreduce_seconds;
  prometheus::Counter* allreduce_bytes;
  prometheus::Gauge* bus_bandwidth;
  prometheus::Gauge* members_gauge;
  std::map<std::string, prometheus::Counter*> lease_grants;  // by `previous`

  void InitMetrics() {
    steps_family = &prometheus::BuildCounter()
                        .Name("moe_coordinator_steps_total")
                        .Help("Training steps by outcome")
                        .Register(*registry);
    commits = &steps_family->Add({{"outcome", "commit"}});
    aborts = &steps_family->Add({{"outcome", "abort"}});
    failures_family = &prometheus::BuildCounter()
                           .Name("moe_coordinator_allreduce_failures_total")
                           .Help(
                               "Failed gradient reductions by status code; DEADLINE_EXCEEDED "
                               "also counts a step aborted as too late to commit")
                           .Register(*registry);
    // The codes a reduction fails with, present at zero so that dashboards and alerts see the
    // series before the first failure; any other code is added when it happens.
    for (const char* code : {"ABORTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"}) {
      failures_family->Add({{"code", code}});
    }
    allreduce_seconds = &prometheus::BuildHistogram()
                             .Name("moe_coordinator_allreduce_seconds")
                             .Help("Time of one replica group's gradient all-reduce")
                             .Register(*registry)
                             .Add({}, prometheus::Histogram::BucketBoundaries{
                                          1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
                                          0.5, 1, 2.5, 5, 10, 20, 30, 60});
    allreduce_bytes = &prometheus::BuildCounter()
                           .Name("moe_coordinator_allreduce_bytes_total")
                           .Help("Gradient bytes all-reduced (buffer size per group)")
                           .Register(*registry)
                           .Add({});
    bus_bandwidth = &prometheus::BuildGauge()
                         .Name("moe_coordinator_allreduce_bus_bandwidth_bytes_per_second")
                         .Help("2 (N-1)/N * bytes / time of the last all-reduce")
                         .Register(*registry)
                         .Add({});
    auto& changes = prometheus::BuildCounter()
                        .Name("moe_coordinator_placement_lease_grants_total")
                        .Help(
                            "Placement leases granted to a router that did not hold it, by what "
                            "became of the last holder: none (the first since the coordinator "
                            "started), released (it stopped), lapsed (not renewed for a lease)")
                        .Register(*registry);
    for (const char* previous : {"none", "released", "lapsed"}) {
      lease_grants[previous] = &changes.Add({{"previous", previous}});
    }
    members_gauge = &prometheus::BuildGauge()
                         .Name("moe_coordinator_members")
                         .Help("Shards holding a lease")
                         .Register(*registry)
                         .Add({});
  }

  void ExpireLocked() {
    const Clock::time_point now = Clock::now();
    for (auto it = members.begin(); it != members.end();) {
      if (absl::FromChrono(now - it->second) > options.lease) {
        it = members.erase(it);
        ++membership_version;
      } else {
        ++it;
      }
    }
    members_gauge->Set(static_cast<double>(members.size()));
  }

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* ctx,
                                     const v1::RegisterRequest* req,
                                     v1::RegisterResponse* resp) override {
    auto* reactor = ctx->DefaultReactor();
    if (req->address().empty()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "address is empty"));
      return reactor;
    }
    std::lock_guard<std::mutex> lock(mu);
    ExpireLocked();
    if (members.emplace(req->address(), Clock::now()).second) {
      ++membership_version;
    } else {
      members[req->address()] = Clock::now();
    }
    members_gauge->Set(static_cast<double>(members.size()));
    resp->set_membership_version(membership_version);
    resp->set_lease_ms(absl::ToInt64Milliseconds(options.lease));
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const v1::HeartbeatRequest* req,
                                      v1::HeartbeatResponse* resp) override {
    auto* reactor = ctx->DefaultReactor();
    std::lock_guard<std::mutex> lock(mu);
    ExpireLocked();
    auto it = members.find(req->address());
    if (it != members.end()) it->second = Clock::now();
    resp->set_known(it != members.end());
    resp->set_membership_version(membership_version);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  // The coordinator started less than a lease ago, and at least what a shard takes to register
  // again: its next heartbeat (a quarter lease) after its channel's reconnect backoff (at most
  // 1 s, ClientChannelArgs). A restarted coordinator knows no member, nor the lease's holder,
  // until they ask again.
  bool Settling() const {
    return absl::FromChrono(Clock::now() - started) <
           std::max(options.lease, options.lease / 4 + absl::Milliseconds(1500));
  }

  static std::string RouterName(const std::string& id, const std::string& address) {
    return address.empty() ? absl::StrCat("router ", id)
                           : absl::StrCat("router ", address, " (", id, ")");
  }

  grpc::ServerUnaryReactor* AcquirePlacementLease(grpc::CallbackServerContext* ctx,
                                                  const v1::PlacementLeaseRequest* req,
                                                  v1::PlacementLeaseResponse* resp) override {
    auto* reactor = ctx->DefaultReactor();
    if (req->router_id().empty()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "router_id is empty"));
      return reactor;
    }
    std::lock_guard<std::mutex> lock(mu);
    const Clock::time_point now = Clock::now();
    resp->set_lease_ms(absl::ToInt64Milliseconds(options.lease));
    LeaseHolder& h = lease_holder;
    if (!h.id.empty() && h.id != req->router_id() &&
        absl::FromChrono(now - h.renewed) > options.lease) {
      common::Log(
          "moe-coordinator: the placement lease of %s lapsed (not renewed for %lld ms)\n",
          RouterName(h.id, h.address).c_str(),
          static_cast<long long>(absl::ToInt64Milliseconds(absl::FromChrono(now - h.renewed))));
      h = LeaseHolder{};
      lease_previous = "lapsed";
    }
    if (h.id.empty() && lease_previous == "none" && Settling() && req->defer_while_settling()) {
      resp->set_settling(true);
      reactor->Finish(grpc::Status::OK);
      return reactor;
    }
    if (h.id.empty() || h.id == req->router_id()) {
      if (h.id.empty()) {
        ++lease_epoch;
        common::Log("moe-coordinator: %s holds the placement lease\n",
                    RouterName(req->router_id(), req->router_address()).c_str());
        lease_grants[lease_previous]->Increment();
      }
      if (req->min_epoch() >= lease_epoch &&
          req->min_epoch() < common::kMaxLeaseEpoch - (uint64_t{1} << 32)) {
        common::Log(
            "moe-coordinator: the shards were placed (or the router's gate kept) under "
            "lease epoch %llu, past this coordinator's %llu (it restarted with its clock "
            "behind): the lease of %s goes on under epoch %llu\n",
            static_cast<unsigned long long>(req->min_epoch()),
            static_cast<unsigned long long>(lease_epoch),
            RouterName(req->router_id(), req->router_address()).c_str(),
            static_cast<unsigned long long>(req->min_epoch() + 1));
        lease_epoch = req->min_epoch() + 1;
      }
      h = LeaseHolder{req->router_id(), req->router_address(), now};
      resp->set_granted(true);
      resp->set_epoch(lease_epoch);
    } else {
      resp->set_holder_id(h.id);
      resp->set_holder_address(h.address);
      resp->set_holder_expires_in_ms(
          absl::ToInt64Milliseconds(options.lease - absl::FromChrono(now - h.renewed)));
    }
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* ReleasePlacementLease(grpc::CallbackServerContext* ctx,
                                                  const v1::PlacementLeaseRequest* req,
                                                  v1::PlacementLeaseResponse* resp) override {
    auto* reactor = ctx->DefaultReactor();
    std::lock_guard<std::mutex> lock(mu);
    resp->set_lease_ms(absl::ToInt64Milliseconds(options.lease));
    if (!req->router_id().empty() && lease_holder.id == req->router_id()) {
      common::Log("moe-coordinator: %s gave the placement lease up\n",
                  RouterName(lease_holder.id, lease_holder.address).c_str());
      lease_holder = LeaseHolder{};
      lease_previous = "released";
    }
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* ListMembers(grpc::CallbackServerContext* ctx,
                                        const v1::ListMembersRequest*,
                                        v1::Membership* out) override {
    auto* reactor = ctx->DefaultReactor();
    std::lock_guard<std::mutex> lock(mu);
    ExpireLocked();
    out->set_version(membership_version);
    out->set_settling(Settling());
    for (const auto& [addr, seen] : members) {
      v1::Member* m = out->add_members();
      m->set_address(addr);
      m->set_last_seen_ms_ago(absl::ToInt64Milliseconds(absl::FromChrono(Clock::now() - seen)));
    }
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* CommitStep(grpc::CallbackServerContext* ctx,
                                       const v1::CommitStepRequest* req,
                                       v1::CommitStepResponse* resp) override {
    auto* reactor = ctx->DefaultReactor();
    // The latest moment to decide a commit. The router's call ends 8 s after the step's timeout;
    // from 1.5 s before that it settles a verdict it has not received itself, from the shards
    // (Trainer::kCoordinatorGrace), and a commit's FinishStep calls take up to kFinishTimeout,
    // with 0.5 s for messages in flight. A step that only starts after this (queued behind
    // another router's) or whose reductions end after it is aborted, never committed late.
    // On MonotonicNow's clock: a step of the wall clock must not commit a step late or abort
    // one in time. No deadline stays none (absl::Time saturates at InfiniteFuture).
    const absl::Time decide_by = common::FromWallDeadline(ctx->deadline()) -
                                 absl::FromChrono(kFinishTimeout) - absl::Milliseconds(2000);
    if (!pool->Submit([this, reactor, req, resp, decide_by] {
          RunStep(*req, resp, decide_by);
          reactor->Finish(grpc::Status::OK);
        })) {
      reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator is shutting down"));
    }
    return reactor;
  }

  // One channel per shard, kept: a fresh connection per call can fail transiently on a busy host.
  std::mutex stubs_mu;
  std::map<std::string, std::shared_ptr<v1::ExpertShard::Stub>> stubs;
  std::shared_ptr<v1::ExpertShard::Stub> ShardStub(const std::string& address) {
    std::lock_guard<std::mutex> lock(stubs_mu);
    auto& s = stubs[address];
    if (s == nullptr) {
      s = v1::ExpertShard::NewStub(grpc::CreateCustomChannel(
          address, common::ChannelCredentials(), common::ClientChannelArgs(options.limits)));
    }
    return s;
  }

  // Reduce every group (groups in parallel, every member of a group in parallel); then commit
  // everywhere if all succeeded, else abort everywhere. Takes at most the request's timeout plus
  // 1 s for the reductions and kFinishTimeout for the second phase (the router waits that long).
  static constexpr auto kFinishTimeout = std::chrono::seconds(5);
  static constexpr auto kAbortTimeout = std::chrono::milliseconds(500);

  // The second phase on one shard. A commit is retried until `deadline`; an abort is not, and
  // waits at most kAbortTimeout (`deadline` unused): a shard it misses changes no weight either
  // (it drops the step when it goes stale, after step_ttl), and a dead or stalled member of a
  // failed ring must not hold the answer back.
  grpc::Status FinishOn(const std::string& shard, uint64_t step, bool commit, float learning_rate,
                        std::chrono::system_clock::time_point deadline) {
    v1::FinishStepRequest fr;
    fr.set_train_step(step);
    fr.set_commit(commit);
    fr.set_learning_rate(learning_rate);
    v1::FinishStepResponse fresp;
    grpc::ClientContext cctx;
    cctx.set_deadline(commit ? deadline : std::chrono::system_clock::now() + kAbortTimeout);
    cctx.set_wait_for_ready(commit);
    return ShardStub(shard)->FinishStep(&cctx, fr, &fresp);
  }

  // Aborts `step` on every shard of the request at once (each shard also breaks the reductions
  // of the step still running there) and returns when all have answered.
  void AbortEverywhere(const v1::CommitStepRequest& req) {
    std::vector<std::thread> threads;
    for (const std::string& shard : req.shards()) {
      threads.emplace_back([&, shard] {
        (void)FinishOn(shard, req.train_step(), /*commit=*/false, 0.f, {});
      });
    }
    for (auto& t : threads) t.join();
  }

  void RunStep(const v1::CommitStepRequest& req, v1::CommitStepResponse* resp,
               absl::Time decide_by) {
    std::lock_guard<std::mutex> step_lock(step_mu);
    std::string other_holder;
    {
      std::lock_guard<std::mutex> lock(mu);
      const LeaseHolder& h = lease_holder;
      if (!req.router_id().empty() && !h.id.empty() && h.id != req.router_id() &&
          absl::FromChrono(Clock::now() - h.renewed) <= options.lease) {
        other_holder = RouterName(h.id, h.address);
      }
    }
    if (!other_holder.empty()) {
      AbortEverywhere(req);  // the shards drop the step's state now
      aborts->Increment();
      resp->set_committed(false);
      resp->set_not_lease_holder(true);
      resp->set_reason(absl::StrCat(
          other_holder, " holds the placement lease at this coordinator: a step from router ",
          req.router_id(), " is refused, as only the router that places the experts trains them"));
      return;
    }
    if (common::MonotonicNow() > decide_by) {
      AbortEverywhere(req);
      failures_family->Add({{"code", "DEADLINE_EXCEEDED"}}).Increment();
      aborts->Increment();
      resp->set_committed(false);
      resp->set_reason(
          "the step started too late to commit within the router's wait (it was queued behind "
          "another step)");
      return;
    }
    const uint32_t timeout_ms = req.timeout_ms() > 0 ? req.timeout_ms() : 30000;
    struct Call {
      int group;
      int rank;
      grpc::Status status;
      v1::ReduceGradientsResponse resp;
      bool first_failure = false;  // the failed call that aborted the step
    };
    std::vector<Call> calls;
    for (int g = 0; g < req.groups_size(); ++g) {
      if (req.groups(g).shards_size() < 2) continue;
      for (int r = 0; r < req.groups(g).shards_size(); ++r) {
        calls.push_back({g, r, {}, {}, false});
      }
    }
    std::vector<uint64_t> generations(req.groups_size());
    for (auto& gen : generations) gen = generation.fetch_add(1) + 1;
    std::atomic<bool> aborting{false};
    std::vector<std::thread> threads;
    for (Call& c : calls) {
      threads.emplace_back([&, this] {
        const v1::ReplicaGroup& group = req.groups(c.group);
        v1::ReduceGradientsRequest rr;
        rr.set_train_step(req.train_step());
        rr.set_group(absl::StrCat("step", req.train_step(), "-group", c.group));
        for (int e : group.experts()) rr.add_experts(e);
        for (const auto& s : group.shards()) rr.add_members(s);
        rr.set_rank(c.rank);
        rr.set_generation(generations[c.group]);
        rr.set_timeout_ms(timeout_ms);
        rr.set_bf16_wire(req.bf16_wire());
        rr.set_learning_rate(req.learning_rate());
        rr.set_expect_step_state(std::find(req.computed_shards().begin(),
                                           req.computed_shards().end(),
                                           group.shards(c.rank)) != req.computed_shards().end());
        grpc::ClientContext cctx;
        cctx.set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(timeout_ms + 1000));
        // Ride out a connection attempt that fails transiently; the deadline still bounds it.
        cctx.set_wait_for_ready(true);
        c.status = ShardStub(group.shards(c.rank))->ReduceGradients(&cctx, rr, &c.resp);
        if (!c.status.ok() && !aborting.exchange(true)) {
          // The step cannot commit now. Abort it everywhere at once: the members still in a
          // reduction (waiting on a rank that died before sending anything, or on a stalled
          // one) then fail in moments rather than at their deadline.
          c.first_failure = true;
          AbortEverywhere(req);
        }
      });
    }
    for (auto& t : threads) t.join();
    std::string reason;
    // Report the root cause: the member that failed first (the others failed because of the
    // abort that followed), else one that failed by itself rather than one that then waited for
    // it until the deadline.
    auto rank_of = [](const Call& c) {
      if (c.first_failure) return 2;
      return c.status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED && !c.status.ok() ? 1
                                                                                           : 0;
    };
    std::stable_sort(calls.begin(), calls.end(),
                     [&](const Call& a, const Call& b) { return rank_of(a) > rank_of(b); });
    for (const Call& c : calls) {
      if (!c.status.ok()) {
        failures_family
            ->Add({{"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(
                                c.status.error_code()))}})
            .Increment();
        if (reason.empty()) {
          reason = absl::StrCat("group ", c.group, " rank ", c.rank, " (",
                                req.groups(c.group).shards(c.rank), "): ", c.status.error_message());
          resp->set_code(c.status.error_code());
        }
      } else if (c.rank == 0) {
        const int n = req.groups(c.group).shards_size();
        const double bytes =
            (req.bf16_wire() ? 2.0 : 4.0) * static_cast<double>(c.resp.elements());
        allreduce_seconds->Observe(c.resp.seconds());
        allreduce_bytes->Increment(bytes);
        resp->set_allreduce_bytes(resp->allreduce_bytes() + static_cast<int64_t>(bytes));
        resp->set_allreduce_seconds(std::max(resp->allreduce_seconds(), c.resp.seconds()));
        if (c.resp.seconds() > 0) {
          bus_bandwidth->Set(2.0 * (n - 1) / n * bytes / c.resp.seconds());
        }
      }
    }
    if (reason.empty() && common::MonotonicNow() > decide_by) {
      // Counted as a reduction that failed its deadline, as a step that started too late is.
      failures_family->Add({{"code", "DEADLINE_EXCEEDED"}}).Increment();
      reason = "the reductions ended too late to commit within the router's wait";
      AbortEverywhere(req);
    }
    const bool commit = reason.empty();
    // Second phase: every shard commits, or every shard aborts. Bounded by kFinishTimeout: a
    // shard that does not confirm in time is reported, not waited for.
    const auto finish_deadline = std::chrono::system_clock::now() + kFinishTimeout;
    auto finish_on = [&](int s) {
      return FinishOn(req.shards(s), req.train_step(), commit, req.learning_rate(),
                      finish_deadline);
    };
    if (commit && req.shards_size() > 0 && common::Failpoint("coordinator_exit_mid_commit")) {
      // As if killed between the decision and the answer: the commit reaches one shard only.
      (void)finish_on(0);
      common::Log("moe-coordinator: failpoint coordinator_exit_mid_commit: exiting\n");
      std::_Exit(3);
    }
    std::vector<grpc::Status> finish(req.shards_size());
    threads.clear();
    // An abort went everywhere as the first reduction failed.
    for (int s = 0; s < req.shards_size() && commit; ++s) {
      threads.emplace_back([&, s] { finish[s] = finish_on(s); });
    }
    for (auto& t : threads) t.join();
    for (int s = 0; s < req.shards_size() && commit; ++s) {
      if (!finish[s].ok()) {
        resp->add_unconfirmed_shards(req.shards(s));
        if (reason.empty()) {
          reason = absl::StrCat("commit on ", req.shards(s), " not confirmed: ",
                                finish[s].error_message());
        }
      }
    }
    resp->set_committed(commit);
    resp->set_reason(reason);
    (commit ? commits : aborts)->Increment();
  }
};

CoordinatorServer::CoordinatorServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

CoordinatorServer::~CoordinatorServer() {
  Shutdown();
  impl_->server->Wait();
}

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(
    CoordinatorOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  impl->registry =
      impl->options.registry ? impl->options.registry : std::make_shared<prometheus::Registry>();
  impl->InitMetrics();
  impl->pool = std::make_unique<common::ThreadPool>(4);
  if (!impl->options.metrics_address.empty()) {
    ASSIGN_OR_RETURN(impl->metrics_endpoint, common::MetricsEndpoint::Start(
                                                 impl->options.metrics_address, impl->registry));
  }
  ASSIGN_OR_RETURN(common::StartedServer started,
                   common::StartServer(impl->options.address, {impl.get()}, impl->options.limits));
  impl->server = std::move(started.server);
  impl->port = started.port;
  impl->server->GetHealthCheckService()->SetServingStatus(true);
  return std::unique_ptr<CoordinatorServer>(new CoordinatorServer(std::move(impl)));
}

int CoordinatorServer::port() const { return impl_->port; }
int CoordinatorServer::metrics_port() const {
  return impl_->metrics_endpoint ? impl_->metrics_endpoint->port() : 0;
}
std::string CoordinatorServer::address() const { return absl::StrCat("127.0.0.1:", impl_->port); }
void CoordinatorServer::Shutdown(absl::Duration grace) {
  impl_->server->GetHealthCheckService()->Shutdown();
  impl_->server->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  impl_->pool->Shutdown();
}
void CoordinatorServer::Wait() { impl_->server->Wait(); }
const std::shared_ptr<prometheus::Registry>& CoordinatorServer::registry() const {
  return impl_->registry;
}

}  // namespace moe::coordinator
