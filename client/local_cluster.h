#ifndef MOE_CLIENT_LOCAL_CLUSTER_H_
#define MOE_CLIENT_LOCAL_CLUSTER_H_

// A cluster of local processes on loopback: N moe-expert-server processes and a moe-router over
// them. Used by moe-cluster, the multi-process tests and the benchmarks.

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/common/subprocess.h"

namespace moe::client {

struct LocalClusterOptions {
  std::string bin_dir;  // holds moe-expert-server and moe-router
  std::string checkpoint;
  int shards = 4;
  std::string placement = "hybrid";
  int router_port = 0;
  int metrics_port = -1;  // router on it, shard i on +1+i; -1: none
  std::vector<std::string> shard_args;   // extra flags for every shard
  std::vector<std::string> router_args;  // extra flags for the router
  std::vector<std::string> common_args;  // extra flags for every service (e.g. --tls-*)
  // Shard i's command is prefixed with wrap(i) (e.g. taskset -c i); empty: none.
  std::vector<std::vector<std::string>> shard_wrappers;
  // The address shard i binds and is reached at (e.g. its network namespace's); default
  // 127.0.0.1.
  std::vector<std::string> shard_hosts;
  // Given shard i's address, the address the router is to use for it (e.g. a test's proxy in
  // front of it); unset: the shard's own.
  std::function<std::string(int, const std::string&)> route_shard;
  // Shard i keeps its trained experts in STATE_DIR/shard-i (moe-expert-server --state-dir) and
  // the router its trained gate in STATE_DIR/router (moe-router --state-dir), so that a
  // restart keeps their training; empty: none.
  std::string state_dir;
  bool coordinator = true;  // start moe-coordinator and point the router at it
  bool verbose = false;     // print progress to stderr
  // Asked while the cluster starts: true stops what has started (SIGTERM, as Stop does) and
  // fails Start with CANCELLED, instead of waiting until the cluster is ready (moe-cluster: a
  // Ctrl-C during start-up). Unset: never.
  std::function<bool()> stop_requested;
};

class LocalCluster {
 public:
  // Starts everything and returns once the router is SERVING.
  static absl::StatusOr<std::unique_ptr<LocalCluster>> Start(const LocalClusterOptions& options,
                                                             absl::Duration timeout = absl::Minutes(2));
  ~LocalCluster();  // SIGKILLs whatever still runs

  // SIGTERM to the router, then the shards, then the coordinator; waits for each. An error names
  // every process that did not exit with status 0 (also one that died earlier on its own) or was
  // still running after `grace` (it is then killed).
  absl::Status Stop(absl::Duration grace = absl::Seconds(5));

  const std::string& router_address() const { return router_address_; }
  const std::vector<std::string>& shard_addresses() const { return shard_addresses_; }
  common::Subprocess& shard(int i) { return shards_[i]; }
  common::Subprocess& router() { return router_; }
  // Not running when started without a coordinator.
  common::Subprocess& coordinator() { return coordinator_; }
  // Empty when started without a coordinator.
  const std::string& coordinator_address() const { return coordinator_address_; }

  // Starts shard i again (after it was killed) on the same port; it loads nothing until the
  // router gives it its experts back.
  absl::Status RestartShard(int i);
  // Starts the router again (after it was killed) on the same port; returns once it is SERVING.
  absl::Status RestartRouter(absl::Duration timeout = absl::Minutes(1));
  // Starts the coordinator again (after it was killed) on the same port. It knows no members
  // until the shards, told so by their next heartbeat, register again.
  absl::Status RestartCoordinator();
  // The command lines that the Restart calls above run: for a user who starts by hand a service
  // moe-cluster --no-restart left down (it is then not watched nor stopped by this program).
  // `wrapped` false leaves out the shard's wrapper (LocalClusterOptions::shard_wrappers).
  std::vector<std::string> ShardCommand(int i, bool wrapped = true) const;
  std::vector<std::string> RouterCommand() const;
  std::vector<std::string> CoordinatorCommand() const;

 private:
  // Start's work into `*out` (set first, so that what started can be stopped on CANCELLED).
  static absl::Status StartInto(const LocalClusterOptions& options, absl::Duration timeout,
                                std::unique_ptr<LocalCluster>* out);
  // The command lines that start each service on `port` (0: one the system picks).
  std::vector<std::string> ShardArgs(int i, int port, bool wrapped = true) const;
  std::vector<std::string> RouterArgs(int port) const;
  std::vector<std::string> CoordinatorArgs(int port) const;
  static int PortOf(const std::string& address);
  // Starts a process with `spawn` until it listens on `port` again (for up to 10 s).
  static absl::StatusOr<common::Subprocess> RespawnOnPort(
      const std::function<absl::StatusOr<common::Subprocess>()>& spawn, int port,
      const std::string& name);
  absl::Status WaitUntilRouterServes(absl::Time deadline);
  std::string ShardHost(int i) const;
  std::vector<std::string> RouterShardAddresses() const;
  LocalClusterOptions options_;
  std::vector<common::Subprocess> shards_;
  common::Subprocess router_;
  common::Subprocess coordinator_;
  std::string coordinator_address_;
  std::vector<std::string> shard_addresses_;
  std::string router_address_;
};

// Directory of the running executable.
std::string ExecutableDir();

}  // namespace moe::client

#endif  // MOE_CLIENT_LOCAL_CLUSTER_H_
