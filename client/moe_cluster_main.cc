// moe-cluster: starts a local cluster (expert shards and the router) on loopback, waits until
// every service is SERVING, prints `READY router=HOST:PORT`, and stops everything on SIGINT or
// SIGTERM. Run with --help for the flags.

#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "client/cpu_limit.h"
#include "client/local_cluster.h"
#include "router/router_flags.h"
#include "services/common/flags.h"
#include "services/common/log.h"
#include "services/common/security.h"
#include "services/common/server_util.h"
#include "services/common/signals.h"
#include "services/common/status_macros.h"
#include "services/common/subprocess.h"

namespace {

constexpr char kUsage[] = R"(moe-cluster: runs a local moe-cluster (coordinator, expert shards, router) on loopback.

usage: moe-cluster --checkpoint PATH [flags]

  Prints "READY router=HOST:PORT" once every service is SERVING, and stops them all on
  SIGINT or SIGTERM.

  --shards N               expert-shard servers to start (default 4)
  --placement S            replicated | sharded | hybrid (default) | dynamic
  --router-port N          router port (default 50051; 0 picks a free one)
  --shard-threads N        compute threads per shard (default 1)
  --metrics-port N         router /metrics on N, shard i on N+1+i, coordinator on N+1+shards
                           (default: off)
  --capacity-factor C      passed to the router (default 0: unlimited)
  --overflow drop|spill    passed to the router (default drop)
  --wire fp32|bf16         passed to the router (default fp32)
  --bin-dir DIR            where moe-coordinator, moe-expert-server and moe-router are
                           (default: beside this program)
  --tls-dir DIR            TLS everywhere with the files of scripts/make-certs.sh DIR
  --require-client-cert    mutual TLS: services refuse callers without DIR's client certificate
  --auth-token-file F      the router requires "authorization: Bearer <token in F>"
  --pin-shards             run shard i on CPU i mod cores (equal CPU shares, for benchmarks)
  --shard-cpus C           limit each shard to C CPUs (a cgroup CPU quota each, like machines
                           of that size; for benchmarks; needs root)
  --router-args "ARGS"     more flags for the router, space-separated
  --state-dir DIR          shard i keeps its trained experts in DIR/shard-i, the router its
                           trained gate in DIR/router, and each started again loads them from
                           there (training survives a restart)
  --no-restart             leave a service (shard, router, coordinator) that exits on its own
                           stopped, and say the command that starts it again by hand (by
                           default it is started again on its port, at most 5 times a minute)

A service that exits on its own is reported on stderr when it does, and so is its new pid
once it is started again (stdout carries only the lines up to READY: a caller that stops
reading it then never blocks this program). The exit status is 0 when every service still
running at Ctrl-C (or SIGTERM) stopped cleanly and none was given up for failing 5 times
within a minute, else 1 with a line naming the ones that did not. Ctrl-C before READY stops
what has started at once (exit 0).
)";

// `args` as one shell command line: an argument with a character outside a safe set is
// single-quoted.
std::string ShellJoin(const std::vector<std::string>& args) {
  std::vector<std::string> quoted;
  for (const std::string& a : args) {
    const bool safe = !a.empty() && a.find_first_not_of(
                                        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop"
                                        "qrstuvwxyz0123456789_-.,:/=@+%") == std::string::npos;
    quoted.push_back(safe ? a : absl::StrCat("'", absl::StrReplaceAll(a, {{"'", "'\\''"}}), "'"));
  }
  return absl::StrJoin(quoted, " ");
}

absl::Status Run(int argc, char** argv) {
  using moe::common::Flags;
  ASSIGN_OR_RETURN(
      Flags f, Flags::Parse(argc, argv, 1,
                            {{"checkpoint", true}, {"shards", true}, {"placement", true},
                             {"router-port", true}, {"shard-threads", true},
                             {"metrics-port", true}, {"capacity-factor", true},
                             {"overflow", true}, {"wire", true}, {"bin-dir", true},
                             {"tls-dir", true}, {"require-client-cert", false},
                             {"pin-shards", false}, {"shard-cpus", true}, {"router-args", true},
                             {"auth-token-file", true}, {"state-dir", true}, {"no-restart", false}}));
  ASSIGN_OR_RETURN(std::string checkpoint, f.Require("checkpoint"));
  // Checked first: the checks below compute ports from it.
  ASSIGN_OR_RETURN(int64_t num_shards, f.GetIntInRange("shards", 4, 1, 64));
  ASSIGN_OR_RETURN(int64_t router_port, f.GetPort("router-port", 50051));
  ASSIGN_OR_RETURN(int64_t shard_threads, f.GetInt("shard-threads", 1));
  ASSIGN_OR_RETURN(int64_t metrics_port, f.GetInt("metrics-port", -1));
  if (metrics_port == 0) {
    // Each service takes its own port from the block at N; there is no "pick a free one" here.
    return moe::common::UsageError(
        "--metrics-port 0 is not supported: the services' /metrics take a block of ports from N "
        "(router N, shard i N+1+i, coordinator N+1+shards); give a free N, such as 9400");
  }
  if (metrics_port < -1 || metrics_port > 65535 - 2 - num_shards) {
    return moe::common::UsageError(absl::StrCat(
        "--metrics-port must leave room for ", num_shards + 2,
        " ports below 65536 (router, shards, coordinator), got ", metrics_port));
  }
  // Checked here, not by the services: a mistake is told before a single process starts.
  if (shard_threads < 1 || shard_threads > 256) {
    return moe::common::UsageError(
        absl::StrCat("--shard-threads must be in [1, 256], got ", shard_threads));
  }
  RETURN_IF_ERROR(moe::router::ParseRouterChoices(f).status());  // the router's own check
  if (f.Has("require-client-cert") && !f.Has("tls-dir")) {
    // Without TLS the services would serve plaintext and ask no caller for a certificate.
    return moe::common::UsageError("--require-client-cert needs --tls-dir");
  }
  if (metrics_port > 0 && router_port >= metrics_port &&
      router_port <= metrics_port + num_shards + 1) {
    return moe::common::UsageError(
        absl::StrCat("--router-port ", router_port, " is in the block of --metrics-port ",
                     metrics_port, " (ports ", metrics_port, " to ", metrics_port + num_shards + 1,
                     ": router, shards, coordinator); give ports apart"));
  }
  // Ports in use are told before anything starts, by this program's flags (the service that
  // failed to listen would name its own, and a port the user never typed).
  if (router_port != 0) {
    RETURN_IF_ERROR(
        moe::common::ProbeListenAddress(absl::StrCat("127.0.0.1:", router_port), "--router-port"));
  }
  for (int64_t i = 0; metrics_port > 0 && i < num_shards + 2; ++i) {
    const int64_t port = metrics_port + i;
    if (moe::common::ProbeListenAddress(absl::StrCat("127.0.0.1:", port), "--metrics-port").ok()) {
      continue;
    }
    const std::string whose = i == 0            ? "the router's"
                              : i <= num_shards ? absl::StrCat("shard ", i - 1, "'s")
                                                : "the coordinator's";
    return absl::UnavailableError(
        absl::StrCat("--metrics-port ", metrics_port, ": port ", port, " (", whose,
                     " /metrics) is in use by another process or needs privileges; give "
                     "another N (ports N to N+",
                     num_shards + 1, " must be free)"));
  }
  const std::string bin = f.Get("bin-dir", moe::client::ExecutableDir());
  // Checked before any service starts: a missing one was a progress line, the shell's "cannot
  // run" and "did not start" (three lines for one mistake).
  for (const char* service : {"moe-coordinator", "moe-expert-server", "moe-router"}) {
    const std::string path = absl::StrCat(bin, "/", service);
    if (access(path.c_str(), X_OK) != 0) {
      return absl::NotFoundError(absl::StrCat(
          "no program ", path, " to run (", std::strerror(errno), "); ",
          f.Has("bin-dir") ? "--bin-dir must name the directory of the built binaries (build/bin)"
                           : "moe-cluster runs the services beside it: give --bin-dir DIR"));
    }
  }
  moe::common::BlockTerminationSignals();
  moe::client::LocalClusterOptions o;
  o.bin_dir = bin;
  o.checkpoint = checkpoint;
  o.shards = static_cast<int>(num_shards);
  o.placement = f.Get("placement", "hybrid");
  o.router_port = static_cast<int>(router_port);
  o.metrics_port = static_cast<int>(metrics_port);
  o.shard_args = {"--threads", std::to_string(shard_threads)};
  o.state_dir = f.Get("state-dir");
  for (const char* pass : {"capacity-factor", "overflow", "wire"}) {
    if (f.Has(pass)) o.router_args.insert(o.router_args.end(), {absl::StrCat("--", pass), f.Get(pass)});
  }
  if (f.Has("tls-dir")) {
    // Services present DIR/server.crt to each other; this launcher checks health as a client.
    const std::string dir = f.Get("tls-dir");
    o.common_args = {"--tls-cert", dir + "/server.crt", "--tls-key", dir + "/server.key",
                     "--tls-ca", dir + "/ca.crt"};
    if (f.Has("require-client-cert")) o.common_args.push_back("--require-client-cert");
    // The services' files, checked as each service will, before any of them starts. The
    // message names the flag the user gave, not the services' flags it becomes.
    auto told = [&](const absl::Status& st) {
      if (st.ok()) return st;
      return absl::Status(st.code(), absl::StrCat("--tls-dir ", dir, ": ", st.message(),
                                                  " (scripts/make-certs.sh DIR makes the files)"));
    };
    RETURN_IF_ERROR(told(moe::common::ReadTlsFiles({dir + "/server.crt", dir + "/server.key",
                                                    dir + "/ca.crt", f.Has("require-client-cert")})
                             .status()));
    RETURN_IF_ERROR(told(moe::common::ConfigureTls(
        {dir + "/client.crt", dir + "/client.key", dir + "/ca.crt", false})));
  }
  if (f.Has("auth-token-file")) {
    // Read as the router will, so that a file it cannot use is told before anything starts.
    RETURN_IF_ERROR(moe::common::ReadTokenFile(f.Get("auth-token-file")).status());
    o.router_args.insert(o.router_args.end(), {"--auth-token-file", f.Get("auth-token-file")});
  }
  if (f.Has("pin-shards")) {
    // Shard i runs on CPU i mod cores: shards get equal CPU shares, like separate machines.
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    for (int i = 0; i < o.shards; ++i) {
      o.shard_wrappers.push_back({"/usr/bin/taskset", "-c", std::to_string(i % cores)});
    }
  }
  moe::client::CpuLimits cpu_limits;  // outlives the cluster: its cgroups go once it stopped
  if (f.Has("shard-cpus")) {
    if (f.Has("pin-shards")) {
      return moe::common::UsageError("--shard-cpus and --pin-shards exclude each other");
    }
    ASSIGN_OR_RETURN(double cpus, f.GetDouble("shard-cpus", 1));
    ASSIGN_OR_RETURN(cpu_limits, moe::common::AsUsage(moe::client::CpuLimits::Create(o.shards, cpus)));
    for (int i = 0; i < o.shards; ++i) o.shard_wrappers.push_back(cpu_limits.Wrapper(i));
  }
  for (absl::string_view a : absl::StrSplit(f.Get("router-args"), ' ', absl::SkipEmpty())) {
    o.router_args.emplace_back(a);
  }
  o.verbose = true;
  // Ctrl-C or SIGTERM while the services start stops them then, not once all are ready.
  o.stop_requested = [] { return moe::common::PendingTerminationSignal() != 0; };
  absl::StatusOr<std::unique_ptr<moe::client::LocalCluster>> started =
      moe::client::LocalCluster::Start(o, absl::Minutes(5));
  if (started.status().code() == absl::StatusCode::kCancelled) {
    std::fprintf(stderr, "moe-cluster: signal %d before the cluster was ready; stopped\n",
                 moe::common::PendingTerminationSignal());
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(auto cluster, std::move(started));
  for (int i = 0; i < o.shards; ++i) {
    std::printf("shard %d addr=%s pid=%d\n", i, cluster->shard_addresses()[i].c_str(),
                cluster->shard(i).pid());
  }
  std::printf("coordinator addr=%s pid=%d\n", cluster->coordinator_address().c_str(),
              cluster->coordinator().pid());
  std::printf("router addr=%s pid=%d\n", cluster->router_address().c_str(), cluster->router().pid());
  std::printf("READY router=%s\n", cluster->router_address().c_str());
  std::fflush(stdout);
  // Watch for a signal; report children that die on their own.
  std::atomic<bool> stop{false};
  std::thread waiter([&] {
    const int sig = moe::common::WaitForTerminationSignal();
    if (sig != 0) moe::common::Log("moe-cluster: signal %d, stopping\n", sig);
    stop = true;
  });
  // A service that exits on its own is named with how it ended, and started again on its port
  // (the router gives a shard its experts back, trained ones copied from a replica; the shards
  // register again with a coordinator started again), unless --no-restart or it has crashed 5
  // times within a minute.
  const bool restart = !f.Has("no-restart");
  // Watched: the shards, the router, and the coordinator when there is one.
  struct Watched {
    std::string name;
    std::function<moe::common::Subprocess&()> process;
    std::function<absl::Status()> start_again;
    std::function<std::vector<std::string>()> command;  // what start_again runs
    bool given_up = false;
    std::deque<absl::Time> restarts;  // within the last minute
  };
  std::vector<Watched> watched;
  auto watch = [&watched](std::string name, std::function<moe::common::Subprocess&()> process,
                          std::function<absl::Status()> start_again,
                          std::function<std::vector<std::string>()> command) {
    Watched w;
    w.name = std::move(name);
    w.process = std::move(process);
    w.start_again = std::move(start_again);
    w.command = std::move(command);
    watched.push_back(std::move(w));
  };
  for (int i = 0; i < o.shards; ++i) {
    watch(
        absl::StrCat("shard ", i),
        [&cluster, i]() -> moe::common::Subprocess& { return cluster->shard(i); },
        [&cluster, i] { return cluster->RestartShard(i); },
        // Not in a --shard-cpus cgroup, which this program removes when it stops.
        [&cluster, i, quota = f.Has("shard-cpus")] { return cluster->ShardCommand(i, !quota); });
  }
  watch(
      "the router", [&cluster]() -> moe::common::Subprocess& { return cluster->router(); },
      [&cluster] { return cluster->RestartRouter(); },
      [&cluster] { return cluster->RouterCommand(); });
  if (!cluster->coordinator_address().empty()) {
    watch(
        "the coordinator",
        [&cluster]() -> moe::common::Subprocess& { return cluster->coordinator(); },
        [&cluster] { return cluster->RestartCoordinator(); },
        [&cluster] { return cluster->CoordinatorCommand(); });
  }
  while (!stop) {
    for (Watched& w : watched) {
      if (stop) break;
      moe::common::Subprocess& p = w.process();
      if (w.given_up || !p.Exited()) continue;
      const std::string& name = w.name;
      const absl::StatusOr<int> status = p.Wait(absl::ZeroDuration());
      std::string why = status.ok() ? moe::common::DescribeWaitStatus(*status) : "exited";
      const absl::Time now = absl::Now();
      while (!w.restarts.empty() && now - w.restarts.front() > absl::Minutes(1)) {
        w.restarts.pop_front();
      }
      if (!restart || w.restarts.size() >= 5) {
        w.given_up = true;
        // Left down on purpose, it may be brought back by hand: the command is said.
        // Relative paths are moe-cluster's working directory's: the command starts there.
        std::string by_hand;
        if (!restart) {
          std::error_code ec;
          const std::filesystem::path here = std::filesystem::current_path(ec);
          by_hand = absl::StrCat(
              "not started again (--no-restart); to start it again by hand (this program then "
              "neither watches nor stops it",
              f.Has("shard-cpus") && absl::StartsWith(name, "shard ")
                  ? ", nor holds it to --shard-cpus"
                  : "",
              "): ", ec ? "" : absl::StrCat("cd ", ShellJoin({here.string()}), " && "),
              ShellJoin(w.command()));
        }
        moe::common::Log(
            "moe-cluster: %s (pid %d) %s; %s\n", name.c_str(), p.pid(), why.c_str(),
            restart ? "it failed 5 times within a minute: not started again" : by_hand.c_str());
        // Left down on purpose (--no-restart): told now, and the stop at the end leaves it out.
        // One given up for failing 5 times a minute still fails the stop.
        if (!restart) p = moe::common::Subprocess();
        continue;
      }
      w.restarts.push_back(now);
      moe::common::Log("moe-cluster: %s (pid %d) %s; starting it again\n", name.c_str(), p.pid(),
                       why.c_str());
      const absl::Status again = w.start_again();
      if (again.ok()) {
        moe::common::Log("moe-cluster: %s is back (pid %d)\n", name.c_str(), w.process().pid());
      } else {
        moe::common::Log("moe-cluster: %s could not be started again: %s\n", name.c_str(),
                         std::string(again.message()).c_str());
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const absl::Status stopped = cluster->Stop();
  waiter.join();
  if (!stopped.ok()) return stopped;
  std::fprintf(stderr, "moe-cluster: stopped\n");
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  return moe::common::RunMain(argc, argv, "moe-cluster", kUsage, Run);
}
