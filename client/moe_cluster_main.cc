// moe-cluster: starts a local cluster (expert shards and the router) on loopback, waits until
// every service is SERVING, prints `READY router=HOST:PORT`, and stops everything on SIGINT or
// SIGTERM. Run with --help for the flags.

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/common/flags.h"
#include "services/common/server_util.h"
#include "services/common/signals.h"
#include "services/common/status_macros.h"
#include "services/common/subprocess.h"

namespace {

constexpr char kUsage[] = R"(moe-cluster: runs a local moe-cluster (expert shards + router) on loopback.

usage: moe-cluster --checkpoint PATH [flags]

  --shards N               expert-shard servers to start (default 4)
  --placement S            replicated | sharded | hybrid (default) | dynamic
  --router-port N          router port (default 50051; 0 picks a free one)
  --shard-threads N        compute threads per shard (default 1)
  --metrics-port N         router /metrics on N, shard i on N+1+i (default: off)
  --capacity-factor C      passed to the router
  --overflow drop|spill    passed to the router
  --wire fp32|bf16         passed to the router
  --bin-dir DIR            where moe-router and moe-expert-server are (default: beside this)
)";

std::string SelfDir() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string path(buf, static_cast<size_t>(n));
  return path.substr(0, path.rfind('/'));
}

absl::Status Run(int argc, char** argv) {
  using moe::common::Flags;
  ASSIGN_OR_RETURN(
      Flags f, Flags::Parse(argc, argv, 1,
                            {{"checkpoint", true}, {"shards", true}, {"placement", true},
                             {"router-port", true}, {"shard-threads", true},
                             {"metrics-port", true}, {"capacity-factor", true},
                             {"overflow", true}, {"wire", true}, {"bin-dir", true}}));
  ASSIGN_OR_RETURN(std::string checkpoint, f.Require("checkpoint"));
  ASSIGN_OR_RETURN(int64_t num_shards, f.GetInt("shards", 4));
  ASSIGN_OR_RETURN(int64_t router_port, f.GetInt("router-port", 50051));
  ASSIGN_OR_RETURN(int64_t shard_threads, f.GetInt("shard-threads", 1));
  ASSIGN_OR_RETURN(int64_t metrics_port, f.GetInt("metrics-port", -1));
  if (num_shards < 1 || num_shards > 64) return absl::InvalidArgumentError("--shards must be in [1, 64]");
  const std::string bin = f.Get("bin-dir", SelfDir());
  if (access(checkpoint.c_str(), R_OK) != 0) {
    return absl::NotFoundError(absl::StrCat("checkpoint ", checkpoint,
                                            " not found (make one with moe-client init-checkpoint)"));
  }
  moe::common::BlockTerminationSignals();
  std::vector<moe::common::Subprocess> procs;
  std::vector<std::string> shard_addrs;
  std::fprintf(stderr, "moe-cluster: starting %lld shards\n", static_cast<long long>(num_shards));
  for (int i = 0; i < num_shards; ++i) {
    std::vector<std::string> args = {bin + "/moe-expert-server", "--checkpoint", checkpoint,
                                      "--host", "127.0.0.1", "--port", "0", "--experts", "none",
                                      "--threads", std::to_string(shard_threads)};
    if (metrics_port >= 0) {
      args.insert(args.end(), {"--metrics-port", std::to_string(metrics_port + 1 + i)});
    }
    ASSIGN_OR_RETURN(moe::common::Subprocess p, moe::common::Subprocess::Spawn(args));
    ASSIGN_OR_RETURN(int port, p.ReadListeningPort(absl::Seconds(60)));
    shard_addrs.push_back(absl::StrCat("127.0.0.1:", port));
    std::printf("shard %d addr=%s pid=%d\n", i, shard_addrs.back().c_str(), p.pid());
    procs.push_back(std::move(p));
  }
  std::vector<std::string> args = {bin + "/moe-router", "--checkpoint", checkpoint,
                                    "--host", "127.0.0.1", "--port", std::to_string(router_port),
                                    "--shards", absl::StrJoin(shard_addrs, ","),
                                    "--placement", f.Get("placement", "hybrid")};
  for (const char* pass : {"capacity-factor", "overflow", "wire"}) {
    if (f.Has(pass)) args.insert(args.end(), {absl::StrCat("--", pass), f.Get(pass)});
  }
  if (metrics_port >= 0) args.insert(args.end(), {"--metrics-port", std::to_string(metrics_port)});
  std::fprintf(stderr, "moe-cluster: starting the router\n");
  ASSIGN_OR_RETURN(moe::common::Subprocess router, moe::common::Subprocess::Spawn(args));
  ASSIGN_OR_RETURN(int port, router.ReadListeningPort(absl::Seconds(60)));
  const std::string router_addr = absl::StrCat("127.0.0.1:", port);
  std::printf("router addr=%s pid=%d\n", router_addr.c_str(), router.pid());
  std::fflush(stdout);
  auto channel = grpc::CreateChannel(router_addr, grpc::InsecureChannelCredentials());
  const absl::Time deadline = absl::Now() + absl::Minutes(5);
  while (true) {
    auto h = moe::common::CheckHealth(channel.get(), absl::Seconds(1));
    if (h.ok() && *h == moe::common::HealthState::kServing) break;
    if (router.Exited()) return absl::InternalError("the router exited during start-up");
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError("the router did not become SERVING within 5 minutes");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::printf("READY router=%s\n", router_addr.c_str());
  std::fflush(stdout);
  procs.push_back(std::move(router));
  // Watch for a signal; report children that die on their own.
  std::atomic<bool> stop{false};
  std::thread waiter([&] {
    const int sig = moe::common::WaitForTerminationSignal();
    if (sig != 0) std::fprintf(stderr, "moe-cluster: signal %d, stopping\n", sig);
    stop = true;
  });
  std::vector<bool> reported(procs.size(), false);
  while (!stop) {
    for (size_t i = 0; i < procs.size(); ++i) {
      if (!reported[i] && procs[i].Exited()) {
        reported[i] = true;
        std::fprintf(stderr, "moe-cluster: %s (pid %d) exited\n",
                     i + 1 == procs.size() ? "the router" : absl::StrCat("shard ", i).c_str(),
                     procs[i].pid());
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  // Router first (no new work), then the shards.
  for (auto it = procs.rbegin(); it != procs.rend(); ++it) it->Signal(SIGTERM);
  for (auto it = procs.rbegin(); it != procs.rend(); ++it) it->Wait(absl::Seconds(5)).IgnoreError();
  waiter.join();
  std::fprintf(stderr, "moe-cluster: stopped\n");
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  absl::Status st = Run(argc, argv);
  if (!st.ok()) {
    std::fprintf(stderr, "moe-cluster: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}
