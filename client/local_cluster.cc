#include "client/local_cluster.h"

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "services/common/checkpoint.h"
#include "services/common/security.h"
#include "services/common/server_util.h"
#include "services/common/status_macros.h"

namespace moe::client {

namespace {

// A service that did not come up, named as the user knows it (its own line above says why).
absl::StatusOr<int> Named(const std::string& name, absl::StatusOr<int> port) {
  if (port.ok()) return port;
  return absl::Status(port.status().code(),
                      absl::StrCat(name, " did not start: ", port.status().message()));
}

}  // namespace

std::string ExecutableDir() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string path(buf, static_cast<size_t>(n));
  return path.substr(0, path.rfind('/'));
}

std::string LocalCluster::ShardHost(int i) const {
  return i < static_cast<int>(options_.shard_hosts.size()) ? options_.shard_hosts[i] : "127.0.0.1";
}

std::vector<std::string> LocalCluster::RouterShardAddresses() const {
  std::vector<std::string> out;
  for (int i = 0; i < static_cast<int>(shard_addresses_.size()); ++i) {
    out.push_back(options_.route_shard ? options_.route_shard(i, shard_addresses_[i])
                                       : shard_addresses_[i]);
  }
  return out;
}

std::vector<std::string> LocalCluster::ShardArgs(int i, int port, bool wrapped) const {
  std::vector<std::string> args;
  if (wrapped && i < static_cast<int>(options_.shard_wrappers.size())) {
    args = options_.shard_wrappers[i];
  }
  args.insert(args.end(), {options_.bin_dir + "/moe-expert-server", "--checkpoint",
                           options_.checkpoint, "--host", ShardHost(i), "--port",
                           std::to_string(port), "--experts", "none"});
  if (options_.metrics_port >= 0) {
    args.insert(args.end(), {"--metrics-port", std::to_string(options_.metrics_port + 1 + i)});
  }
  if (!coordinator_address_.empty()) {
    args.insert(args.end(), {"--coordinator", coordinator_address_});  // membership
  }
  if (!options_.state_dir.empty()) {
    args.insert(args.end(), {"--state-dir", absl::StrCat(options_.state_dir, "/shard-", i)});
  }
  args.insert(args.end(), options_.shard_args.begin(), options_.shard_args.end());
  args.insert(args.end(), options_.common_args.begin(), options_.common_args.end());
  return args;
}

std::vector<std::string> LocalCluster::RouterArgs(int port) const {
  std::vector<std::string> args = {options_.bin_dir + "/moe-router", "--checkpoint",
                                    options_.checkpoint, "--host", "127.0.0.1", "--port",
                                    std::to_string(port), "--shards",
                                    absl::StrJoin(RouterShardAddresses(), ","), "--placement",
                                    options_.placement};
  if (options_.metrics_port >= 0) {
    args.insert(args.end(), {"--metrics-port", std::to_string(options_.metrics_port)});
  }
  if (!coordinator_address_.empty()) {
    args.insert(args.end(), {"--coordinator", coordinator_address_});
  }
  if (!options_.state_dir.empty()) {
    args.insert(args.end(), {"--state-dir", absl::StrCat(options_.state_dir, "/router")});
  }
  args.insert(args.end(), options_.router_args.begin(), options_.router_args.end());
  args.insert(args.end(), options_.common_args.begin(), options_.common_args.end());
  return args;
}

absl::Status LocalCluster::WaitUntilRouterServes(absl::Time deadline) {
  auto channel = grpc::CreateChannel(router_address_, common::ChannelCredentials());
  while (true) {
    auto h = common::CheckHealth(channel.get(), absl::Seconds(1));
    if (h.ok() && *h == common::HealthState::kServing) return absl::OkStatus();
    if (router_.Exited()) return absl::InternalError("the router exited during start-up");
    if (options_.stop_requested && options_.stop_requested()) {
      return absl::CancelledError("stopped before the cluster was ready");
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError("the router did not become SERVING in time");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

absl::StatusOr<std::unique_ptr<LocalCluster>> LocalCluster::Start(
    const LocalClusterOptions& options, absl::Duration timeout) {
  std::unique_ptr<LocalCluster> c;
  absl::Status st = StartInto(options, timeout, &c);
  if (st.code() == absl::StatusCode::kCancelled && c != nullptr) {
    // What started stops as on a stop after ready; one that did not stop cleanly is told.
    const absl::Status stopped = c->Stop(absl::Seconds(10));
    if (!stopped.ok()) {
      return absl::InternalError(
          absl::StrCat("stopped before the cluster was ready: ", stopped.message()));
    }
  }
  if (!st.ok()) return st;
  return c;
}

absl::Status LocalCluster::StartInto(const LocalClusterOptions& options, absl::Duration timeout,
                                     std::unique_ptr<LocalCluster>* out) {
  *out = std::unique_ptr<LocalCluster>(new LocalCluster());
  LocalCluster* c = out->get();
  auto stopping = [&] { return options.stop_requested && options.stop_requested(); };
  c->options_ = options;
  if (c->options_.bin_dir.empty()) c->options_.bin_dir = ExecutableDir();
  if (access(options.checkpoint.c_str(), R_OK) != 0) {
    return absl::NotFoundError(absl::StrCat("checkpoint ", options.checkpoint,
                                            " not found (make one with moe-client init-checkpoint)"));
  }
  {
    // Read (its header and gate) before anything starts: a file that is not a checkpoint is
    // told in one line, not as a shard that failed to start.
    common::LoadOptions header_only;
    header_only.experts = std::vector<int>{};
    absl::StatusOr<common::Checkpoint> ck = common::LoadCheckpoint(options.checkpoint, header_only);
    if (!ck.ok()) {
      // Its errors mostly name the file already.
      const absl::string_view m = ck.status().message();
      return absl::Status(ck.status().code(),
                          absl::StartsWith(m, options.checkpoint)
                              ? absl::StrCat("checkpoint ", m)
                              : absl::StrCat("checkpoint ", options.checkpoint, ": ", m));
    }
  }
  if (options.coordinator) {
    if (options.verbose) std::fprintf(stderr, "moe-cluster: starting the coordinator\n");
    ASSIGN_OR_RETURN(c->coordinator_, common::Subprocess::Spawn(c->CoordinatorArgs(0)));
    ASSIGN_OR_RETURN(int cport, Named("the coordinator",
                                      c->coordinator_.ReadListeningPort(absl::Seconds(60))));
    c->coordinator_address_ = absl::StrCat("127.0.0.1:", cport);
  }
  for (int i = 0; i < options.shards; ++i) {
    if (stopping()) return absl::CancelledError("stopped before the cluster was ready");
    if (options.verbose) std::fprintf(stderr, "moe-cluster: starting shard %d\n", i);
    ASSIGN_OR_RETURN(common::Subprocess p, common::Subprocess::Spawn(c->ShardArgs(i, 0)));
    ASSIGN_OR_RETURN(int port,
                     Named(absl::StrCat("shard ", i), p.ReadListeningPort(absl::Seconds(60))));
    c->shard_addresses_.push_back(absl::StrCat(c->ShardHost(i), ":", port));
    c->shards_.push_back(std::move(p));
  }
  if (stopping()) return absl::CancelledError("stopped before the cluster was ready");
  if (options.verbose) std::fprintf(stderr, "moe-cluster: starting the router\n");
  ASSIGN_OR_RETURN(c->router_, common::Subprocess::Spawn(c->RouterArgs(options.router_port)));
  ASSIGN_OR_RETURN(int port, Named("the router", c->router_.ReadListeningPort(absl::Seconds(60))));
  c->router_address_ = absl::StrCat("127.0.0.1:", port);
  if (options.verbose) std::fprintf(stderr, "moe-cluster: waiting for the placement to load\n");
  return c->WaitUntilRouterServes(absl::Now() + timeout);
}

absl::StatusOr<common::Subprocess> LocalCluster::RespawnOnPort(
    const std::function<absl::StatusOr<common::Subprocess>()>& spawn, int port,
    const std::string& name) {
  // The port came from the ephemeral range, and while nothing listens on it, the connections
  // that keep trying to reach it can briefly take it as their own local port (a loopback
  // connect may even pick it and connect to itself). Such a connection fails and goes within
  // moments, so a process that cannot bind yet is started again, for up to 10 s.
  const absl::Time until = absl::Now() + absl::Seconds(10);
  absl::Status last;
  do {
    ASSIGN_OR_RETURN(common::Subprocess p, spawn());
    absl::StatusOr<int> got = p.ReadListeningPort(absl::Seconds(60));
    if (got.ok() && *got == port) return p;
    last = got.ok() ? absl::InternalError("it took another port") : got.status();
    p.Signal(SIGKILL);
    p.Wait(absl::Seconds(5)).IgnoreError();
    absl::SleepFor(absl::Milliseconds(200));
  } while (absl::Now() < until);
  return absl::UnavailableError(
      absl::StrCat(name, " could not listen on port ", port, " again: ", last.message()));
}

int LocalCluster::PortOf(const std::string& address) {
  return std::atoi(address.c_str() + address.rfind(':') + 1);
}

std::vector<std::string> LocalCluster::ShardCommand(int i, bool wrapped) const {
  return ShardArgs(i, PortOf(shard_addresses_[i]), wrapped);
}

std::vector<std::string> LocalCluster::RouterCommand() const {
  return RouterArgs(PortOf(router_address_));
}

std::vector<std::string> LocalCluster::CoordinatorCommand() const {
  return CoordinatorArgs(PortOf(coordinator_address_));
}

absl::Status LocalCluster::RestartShard(int i) {
  const int port = PortOf(shard_addresses_[i]);
  ASSIGN_OR_RETURN(shards_[i],
                   RespawnOnPort([&] { return common::Subprocess::Spawn(ShardCommand(i)); }, port,
                                 absl::StrCat("shard ", i)));
  return absl::OkStatus();
}

std::vector<std::string> LocalCluster::CoordinatorArgs(int port) const {
  std::vector<std::string> args = {options_.bin_dir + "/moe-coordinator", "--host", "127.0.0.1",
                                   "--port", std::to_string(port)};
  args.insert(args.end(), options_.common_args.begin(), options_.common_args.end());
  if (options_.metrics_port >= 0) {
    args.insert(args.end(),
                {"--metrics-port", std::to_string(options_.metrics_port + 1 + options_.shards)});
  }
  return args;
}

absl::Status LocalCluster::RestartCoordinator() {
  ASSIGN_OR_RETURN(coordinator_,
                   RespawnOnPort([&] { return common::Subprocess::Spawn(CoordinatorCommand()); },
                                 PortOf(coordinator_address_), "the coordinator"));
  return absl::OkStatus();
}

absl::Status LocalCluster::RestartRouter(absl::Duration timeout) {
  ASSIGN_OR_RETURN(router_,
                   RespawnOnPort([&] { return common::Subprocess::Spawn(RouterCommand()); },
                                 PortOf(router_address_), "the router"));
  return WaitUntilRouterServes(absl::Now() + timeout);
}

absl::Status LocalCluster::Stop(absl::Duration grace) {
  std::vector<std::string> problems;
  auto stop = [&](common::Subprocess& p, const std::string& name) {
    if (p.pid() <= 0) return;
    const absl::StatusOr<int> st = p.Wait(grace);
    if (!st.ok()) {
      problems.push_back(absl::StrCat(name, " (pid ", p.pid(), ") still ran after ",
                                      absl::FormatDuration(grace), "; killed"));
      p.Signal(SIGKILL);
      p.Wait(absl::Seconds(5)).IgnoreError();
    } else if (*st != 0) {
      problems.push_back(
          absl::StrCat(name, " (pid ", p.pid(), ") ", common::DescribeWaitStatus(*st)));
    }
  };
  router_.Signal(SIGTERM);
  stop(router_, "the router");
  for (auto& s : shards_) s.Signal(SIGTERM);
  for (size_t i = 0; i < shards_.size(); ++i) stop(shards_[i], absl::StrCat("shard ", i));
  if (!coordinator_address_.empty()) {
    coordinator_.Signal(SIGTERM);
    stop(coordinator_, "the coordinator");
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("not every service stopped cleanly: ",
                                          absl::StrJoin(problems, "; ")));
}

LocalCluster::~LocalCluster() = default;

}  // namespace moe::client
