#ifndef MOE_ROUTER_ROUTER_SERVER_H_
#define MOE_ROUTER_ROUTER_SERVER_H_

// The public moe.v1.Router service: gating, placement, fan-out to the shards and reassembly,
// failover, live rebalancing, health, reflection and metrics.

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <prometheus/registry.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "router/dispatcher.h"
#include "router/placement.h"
#include "router/shard_client.h"
#include "services/common/checkpoint.h"
#include "services/common/server_util.h"
#include "services/common/tensor_codec.h"

namespace moe::router {

enum class Overflow { kDrop, kSpill };

struct RouterServerOptions {
  std::string address = "127.0.0.1:0";
  std::string metrics_address;  // empty: no /metrics
  std::string checkpoint;
  common::LoadOptions load;
  // host:port of each expert shard; empty follows the coordinator's membership instead.
  std::vector<std::string> shards;
  std::string coordinator;  // host:port of moe-coordinator; needed by TrainStep
  // Non-empty: the trained gate is kept in STATE_DIR/gate.safetensors (written after each
  // training step) and read back at start, so a restarted router serves the gate that the
  // shards' trained experts were trained with.
  std::string state_dir;
  // Non-empty: every Router call must carry "authorization: Bearer <auth_token>" (health and
  // reflection are exempt).
  std::string auth_token;
  Strategy strategy = Strategy::kHybrid;
  double capacity_factor = 0.0;
  Overflow overflow = Overflow::kDrop;
  int worker_threads = 16;
  int dynamic_slots_per_shard = 0;  // 0: ceil(5E/4S)
  double imbalance_threshold = 0.2;
  absl::Duration rebalance_cooldown = absl::Seconds(5);
  absl::Duration reconcile_interval = absl::Seconds(1);
  // The first placement leaves out a shard that has not answered for this long (a slow one is
  // waited for until then); not when the router's kept gate says the model was trained.
  absl::Duration leave_out_after = absl::Seconds(10);
  int64_t max_batch_tokens = 8192;
  // Infer requests (InferStream's included) being answered at once; past it, RESOURCE_EXHAUSTED.
  int64_t max_inflight_requests = 1024;
  common::WireType wire = common::WireType::kFloat32;
  // Replicas reduce their gradients with BF16 on the wire (CommitStepRequest.bf16_wire).
  bool bf16_allreduce = false;
  int64_t min_split_rows = DispatcherOptions().min_split_rows;
  // The longest deadline one request gets: a client's longer deadline (or none) is cut to it.
  absl::Duration default_timeout = absl::Seconds(30);
  common::RpcLimits limits;
  std::shared_ptr<prometheus::Registry> registry;
  // Builds the client for one shard (tests inject fakes); null uses gRPC.
  std::function<std::shared_ptr<ShardClient>(const std::string& address,
                                              std::function<void(bool)> on_health_change)>
      shard_factory;
};

class RouterServer {
 public:
  // Loads the gate, binds and serves; health is NOT_SERVING until the initial placement is
  // loaded on the shards (retried in the background until it is).
  static absl::StatusOr<std::unique_ptr<RouterServer>> Start(RouterServerOptions options);
  ~RouterServer();

  int port() const;
  int metrics_port() const;
  std::string address() const;
  // Blocks until the initial placement is live or `timeout` passes.
  absl::Status WaitUntilReady(absl::Duration timeout);
  void Shutdown(absl::Duration grace = absl::Seconds(1));
  void Wait();
  // Blocks until the router shuts down (Shutdown), and returns OK; or, with a coordinator, until
  // it loses its placement lease to another router: then shuts it down with `grace` and returns
  // why (moe-router exits 1 with it).
  absl::Status WaitOrLeaseLost(absl::Duration grace);
  const std::shared_ptr<prometheus::Registry>& registry() const;

  class Impl;

 private:
  explicit RouterServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_ROUTER_SERVER_H_
