#ifndef MOE_EXPERT_SERVER_SHARD_SERVER_H_
#define MOE_EXPERT_SERVER_SHARD_SERVER_H_

// moe.v1.ExpertShard served over gRPC: the Dispatch stream, loading and unloading experts,
// copying them from peers, status, health, reflection and metrics.

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <prometheus/registry.h>

#include "absl/status/statusor.h"
#include "expert_server/compute_pool.h"
#include "expert_server/expert_store.h"
#include "services/common/checkpoint.h"
#include "services/common/server_util.h"

namespace moe::expert {

struct ShardServerOptions {
  // host:port to listen on; port 0 picks a free one (see port()).
  std::string address = "127.0.0.1:0";
  // host:port for /metrics; empty disables it, port 0 picks one.
  std::string metrics_address;
  std::string checkpoint;
  common::LoadOptions load;  // tensor prefix and metadata overrides; `experts` is ignored
  // Experts loaded at start; nullopt loads every expert, empty loads none (the router will).
  std::optional<std::vector<int>> initial_experts;
  ComputePoolOptions pool;
  // Most rows one dispatched batch may assign (summed over its experts).
  int64_t max_batch_rows = 8192;
  common::RpcLimits limits;
  std::shared_ptr<prometheus::Registry> registry;  // created when null
  // moe-coordinator to register with and heartbeat to; empty: none.
  std::string coordinator;
  // The address peers and the router reach this shard at; empty: 127.0.0.1:<port>.
  std::string advertise_address;
  // A training step's kept activations and gradients are dropped this long after the step's
  // first forward arrived, when no FinishStep came (a router that died, or whose abort did not
  // get through). Swept whenever a new step starts. Far longer than any step's deadline.
  absl::Duration step_ttl = absl::Minutes(10);
  // Directory to keep this shard's trained experts in, so a restart keeps their training
  // (state_dir.h); empty: none.
  std::string state_dir;
};

class ShardServer {
 public:
  // Opens the checkpoint, binds, starts serving (health NOT_SERVING until the initial experts
  // are loaded) and starts loading them in the background.
  static absl::StatusOr<std::unique_ptr<ShardServer>> Start(ShardServerOptions options);
  ~ShardServer();

  int port() const;
  int metrics_port() const;
  std::string address() const;
  // Health NOT_SERVING, open Dispatch streams ended with UNAVAILABLE, then the server stops.
  // Returns within about `grace`. Idempotent.
  void Shutdown(absl::Duration grace = absl::Seconds(1));
  void Wait();
  // Blocks until the initial experts are loaded (or failed); returns the load status.
  absl::Status WaitUntilLoaded(absl::Duration timeout);

  ExpertStore& store();
  ComputePool& pool();
  const std::shared_ptr<prometheus::Registry>& registry() const;

  class Impl;

 private:
  explicit ShardServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVER_SHARD_SERVER_H_
