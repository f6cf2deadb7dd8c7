#ifndef MOE_SERVICES_COORDINATOR_COORDINATOR_SERVER_H_
#define MOE_SERVICES_COORDINATOR_COORDINATOR_SERVER_H_

// moe.v1.Coordinator: shard membership with leases, and the training-step commit protocol
// (ring all-reduce per replica group on the shards, then commit everywhere or abort everywhere).

#include <memory>
#include <string>

#include <prometheus/registry.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/common/server_util.h"

namespace moe::coordinator {

struct CoordinatorOptions {
  std::string address = "127.0.0.1:0";
  std::string metrics_address;
  absl::Duration lease = absl::Seconds(3);  // a member not heard from for this long leaves
  common::RpcLimits limits;
  std::shared_ptr<prometheus::Registry> registry;
};

class CoordinatorServer {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(CoordinatorOptions options);
  ~CoordinatorServer();
  int port() const;
  int metrics_port() const;
  std::string address() const;
  void Shutdown(absl::Duration grace = absl::Milliseconds(500));
  void Wait();
  const std::shared_ptr<prometheus::Registry>& registry() const;

  class Impl;

 private:
  explicit CoordinatorServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe::coordinator

#endif  // MOE_SERVICES_COORDINATOR_COORDINATOR_SERVER_H_
