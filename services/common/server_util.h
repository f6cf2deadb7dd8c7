#ifndef MOE_SERVICES_COMMON_SERVER_UTIL_H_
#define MOE_SERVICES_COMMON_SERVER_UTIL_H_

// Server bootstrap shared by every service: keepalive, message sizes, health and reflection,
// client channel settings, and the Prometheus /metrics endpoint.

#include <grpcpp/grpcpp.h>
#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/registry.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace moe::common {

// Placement lease epochs (PlacementLeaseResponse.epoch) are below this: they start from the
// clock (milliseconds since 1970 times 2^20, below this until the year 2109). A shard refuses
// one at or above it; a coordinator raises an epoch past a router's min_epoch only where that
// leaves 2^32 grants below it: one bad value would otherwise fence every later holder out.
inline constexpr uint64_t kMaxLeaseEpoch = uint64_t{1} << 62;

struct RpcLimits {
  // Largest message sent or received; batches are bounded well below this by row limits.
  int max_message_bytes = 64 << 20;
};

// Who a server's clients are, which sets how it pings them.
enum class Clients {
  // The cluster's own services (ClientChannelArgs below): the server pings every 500 ms with 1 s
  // to answer, as they ping it, so a peer that stops answering is detected within 2 s.
  kCluster,
  // Users (the router's public port; UserChannelArgs): pings every 10 s with 10 s to answer. A
  // user's client may sit idle between calls with no thread reading its connection (a
  // synchronous gRPC client reads it only during a call, and otherwise every 5 s), and 1 s to
  // answer then closed the connection under it: its next call, 2 s later, failed UNAVAILABLE
  // ("Socket closed", "Broken pipe").
  kUsers,
};

// Keepalive as `clients` says, message size limits, and SO_REUSEPORT off so a stale server
// cannot take a share of connections.
void ConfigureServerBuilder(grpc::ServerBuilder* builder, const RpcLimits& limits = {},
                            Clients clients = Clients::kCluster);

// Channel arguments for internal clients (router -> shard, shard -> peer), matching
// Clients::kCluster.
grpc::ChannelArguments ClientChannelArgs(const RpcLimits& limits = {});
// Channel arguments for a user's client of the cluster (moe-client, load generators, probes): the
// limits of ClientChannelArgs, but a connection attempt gets 2 s instead of 100 ms and keepalive
// pings go every 10 s with 10 s to answer. A loaded machine can take over 100 ms for a handshake
// or a ping, which inside the cluster must not hold up failover (a stalled shard leaves rotation
// within 2 s) but from a user's client is a slow answer, not a dead router: the call's deadline
// bounds the wait instead.
grpc::ChannelArguments UserChannelArgs(const RpcLimits& limits = {});

struct StartedServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

// Binds (and at once closes) a socket on each of `address`'s local addresses, so that a port
// another process listens on is reported in one line before gRPC (or civetweb) tries, and logs a
// long error of its own. Only a port in use or a privileged one is reported here (UNAVAILABLE);
// anything else (an address this probe cannot read, a host with no IPv6) is left to gRPC. `flag`
// names the flag that set the port, for the message.
absl::Status ProbeListenAddress(const std::string& address, const char* flag);

// Builds and starts a server on `address` (port 0 picks one) serving `services`, with the settings
// above, the process's TLS credentials, reflection, and grpc.health.v1 NOT_SERVING until the caller says
// otherwise. UNAVAILABLE naming the address when it cannot listen.
absl::StatusOr<StartedServer> StartServer(const std::string& address,
                                          const std::vector<grpc::Service*>& services,
                                          const RpcLimits& limits,
                                          Clients clients = Clients::kCluster);

// Serves `registry` on http://ADDRESS/metrics. `address` is host:port; port 0 picks one.
class MetricsEndpoint {
 public:
  // `labels` are added to every series served (the shard's address, say, known only once its
  // server has a port), after the registry's own.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& address, std::shared_ptr<prometheus::Registry> registry,
      std::map<std::string, std::string> labels = {});
  // Stops serving within milliseconds (civetweb alone takes up to 2 s: see the definition).
  ~MetricsEndpoint();
  int port() const { return port_; }

 private:
  MetricsEndpoint() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::shared_ptr<prometheus::Collectable> labelled_;  // the registry with `labels`, if any
  std::string host_;  // the host Start was given, without IPv6 brackets
  int port_ = 0;
};

enum class HealthState { kUnknown, kServing, kNotServing };

// One grpc.health.v1.Health/Check of the whole server (service ""). UNAVAILABLE and friends come
// back as errors; the two messages involved are encoded by hand (no generated health stubs).
absl::StatusOr<HealthState> CheckHealth(grpc::Channel* channel, absl::Duration timeout);


}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_SERVER_UTIL_H_
