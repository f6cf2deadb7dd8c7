#include "services/common/server_util.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/health_check_service_interface.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "services/common/security.h"

namespace moe::common {
namespace {

// How keepalive pings go, the same on both ends of a connection: a server's for its Clients and
// the channels of ClientChannelArgs / UserChannelArgs.
struct Keepalive {
  int time_ms;
  int timeout_ms;
};
constexpr Keepalive kClusterKeepalive{500, 1000};
constexpr Keepalive kUserKeepalive{10000, 10000};

}  // namespace

void ConfigureServerBuilder(grpc::ServerBuilder* builder, const RpcLimits& limits,
                            Clients clients) {
  const Keepalive keepalive = clients == Clients::kUsers ? kUserKeepalive : kClusterKeepalive;
  builder->SetMaxReceiveMessageSize(limits.max_message_bytes);
  builder->SetMaxSendMessageSize(limits.max_message_bytes);
  builder->AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, keepalive.time_ms);
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, keepalive.timeout_ms);
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // Accept internal clients' 500 ms pings (users' come every 10 s) instead of answering them with
  // GOAWAY.
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 200);
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  // Fixed 8 MiB flow-control windows per stream, for bulk streams (expert copies, the ring): no
  // BDP probe, which would size the windows from its estimate of the link instead. With it, a
  // 4-rank ring on loopback ran at 0.6 of the speed, and a new connection's first collectives
  // slower still (DECISIONS.md). A stream may have 8 MiB in flight, no more.
  builder->AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8 << 20);
  builder->AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
}

namespace {

// The channel arguments of ClientChannelArgs and UserChannelArgs, which differ in how long a
// connection attempt may take and how keepalive pings go. Each key is set once: with a key set
// twice, gRPC uses the first.
grpc::ChannelArguments ChannelArgs(const RpcLimits& limits, Keepalive keepalive,
                                   int min_connect_ms) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(limits.max_message_bytes);
  args.SetMaxSendMessageSize(limits.max_message_bytes);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, keepalive.time_ms);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, keepalive.timeout_ms);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // Reconnect quickly once a server is back. The minimum backoff is also the least time a
  // connection attempt gets (gRPC's MIN_CONNECT_TIMEOUT, doc/connection-backoff.md).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, min_connect_ms);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  // Each client gets its own connection rather than sharing a subchannel with other channels.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8 << 20);
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);  // as in ConfigureServerBuilder
  // No transparent retries: the callers fail over themselves, and the retry layer would hold on
  // to every message of a stream's first 256 KiB (the ring's borrowed buffers among them).
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  return args;
}

}  // namespace

grpc::ChannelArguments ClientChannelArgs(const RpcLimits& limits) {
  // Pings every 500 ms with 1 s to answer (a stalled peer leaves rotation within 2 s); 100 ms
  // for a connection attempt, so a shard back after a cut link is found fast.
  return ChannelArgs(limits, kClusterKeepalive, 100);
}

grpc::ChannelArguments UserChannelArgs(const RpcLimits& limits) {
  return ChannelArgs(limits, kUserKeepalive, 2000);
}

namespace {

// Turns on the default grpc.health.v1 service and v1alpha server reflection for servers built
// afterwards.
void EnableHealthAndReflection() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
}

// HOST and PORT of a listen address HOST:PORT, without the brackets of an IPv6 host ([::]:PORT);
// false for an address in another form (unix:PATH, a URI).
bool SplitListenAddress(const std::string& address, std::string* host, std::string* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || absl::StrContains(address, "//") ||
      absl::StartsWith(address, "unix:")) {
    return false;
  }
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  return true;
}

}  // namespace

absl::Status ProbeListenAddress(const std::string& address, const char* flag) {
  std::string host, port;
  int port_number = 0;
  if (!SplitListenAddress(address, &host, &port) || !absl::SimpleAtoi(port, &port_number) ||
      port_number == 0) {
    return absl::OkStatus();
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found) != 0) {
    return absl::OkStatus();
  }
  // gRPC listens if any of the addresses binds, so the port counts as taken only when every one
  // of them is (for the services' own 0.0.0.0 or 127.0.0.1 there is one).
  int error = 0;
  bool any_free = false;
  for (addrinfo* a = found; a != nullptr && !any_free; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));  // as gRPC binds
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0) {
      any_free = true;
    } else if (errno == EADDRINUSE || errno == EACCES) {
      error = errno;
    } else {
      any_free = true;  // not ours to judge: gRPC will say
    }
    close(fd);
  }
  freeaddrinfo(found);
  if (any_free) return absl::OkStatus();
  if (error == EADDRINUSE) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", address, " (", flag, "): port ", port,
        " is in use by another process (stop it, or choose another port; 0 picks a free one)"));
  }
  if (error == EACCES) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address, " (", flag,
                                               "): port ", port,
                                               " needs privileges (choose a port above 1023)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<StartedServer> StartServer(const std::string& address,
                                          const std::vector<grpc::Service*>& services,
                                          const RpcLimits& limits, Clients clients) {
  if (absl::Status probe = ProbeListenAddress(address, "--port"); !probe.ok()) return probe;
  EnableHealthAndReflection();
  grpc::ServerBuilder builder;
  ConfigureServerBuilder(&builder, limits, clients);
  StartedServer started;
  builder.AddListeningPort(address, ServerCredentials(), &started.port);
  for (grpc::Service* s : services) builder.RegisterService(s);
  started.server = builder.BuildAndStart();
  if (started.server == nullptr || started.port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address, " (port in use or bad address)"));
  }
  started.server->GetHealthCheckService()->SetServingStatus(false);
  return started;
}

namespace {

// `inner`'s series, each with `labels` added.
class LabelledCollectable : public prometheus::Collectable {
 public:
  LabelledCollectable(std::shared_ptr<prometheus::Collectable> inner,
                      const std::map<std::string, std::string>& labels)
      : inner_(std::move(inner)) {
    for (const auto& [name, value] : labels) labels_.push_back({name, value});
  }
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> families = inner_->Collect();
    for (prometheus::MetricFamily& f : families) {
      for (prometheus::ClientMetric& m : f.metric) {
        m.label.insert(m.label.end(), labels_.begin(), labels_.end());
      }
    }
    return families;
  }

 private:
  std::shared_ptr<prometheus::Collectable> inner_;
  std::vector<prometheus::ClientMetric::Label> labels_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(
    const std::string& address, std::shared_ptr<prometheus::Registry> registry,
    std::map<std::string, std::string> labels) {
  if (absl::Status probe = ProbeListenAddress(address, "--metrics-port"); !probe.ok()) {
    return probe;
  }
  auto ep = std::unique_ptr<MetricsEndpoint>(new MetricsEndpoint());
  try {
    ep->exposer_ = std::make_unique<prometheus::Exposer>(address, 1);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": ", e.what(), " (port in use?)"));
  }
  if (labels.empty()) {
    ep->exposer_->RegisterCollectable(registry);
  } else {
    ep->labelled_ = std::make_shared<LabelledCollectable>(std::move(registry), labels);
    ep->exposer_->RegisterCollectable(ep->labelled_);
  }
  const std::vector<int> ports = ep->exposer_->GetListeningPorts();
  ep->port_ = ports.empty() ? 0 : ports.front();
  std::string port;
  SplitListenAddress(address, &ep->host_, &port);
  return ep;
}

MetricsEndpoint::~MetricsEndpoint() {
  if (exposer_ == nullptr) return;
  // civetweb stops by setting a flag that its listening thread reads between polls of the
  // listening socket, each of which waits up to 2 s for a connection: every service took 1-2 s to
  // exit, and moe-cluster, stopping them in turn, 4-6 s. Connecting to the port ends the poll, so
  // a thread connects (and hangs up) every 10 ms until the stop is done.
  std::string host = host_;
  if (host.empty() || host == "0.0.0.0" || host == "*") host = "127.0.0.1";
  if (host == "::") host = "::1";
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* to = nullptr;
  const std::string port = std::to_string(port_);
  if (port_ <= 0 || getaddrinfo(host.c_str(), port.c_str(), &hints, &to) != 0) to = nullptr;
  std::atomic<bool> stopped{false};
  std::thread waker([&] {
    while (to != nullptr && !stopped.load()) {
      // Each of the host's addresses (localhost has two; civetweb listens on one of them), and
      // never waiting more than 50 ms on one: a connection that is dropped rather than refused
      // would otherwise hold the stop for the kernel's two minutes.
      for (addrinfo* a = to; a != nullptr; a = a->ai_next) {
        const int fd =
            socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno == EINPROGRESS) {
          pollfd p{fd, POLLOUT, 0};
          poll(&p, 1, 50);
        }
        close(fd);  // refused once civetweb's socket is closed: fine
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  exposer_.reset();
  stopped.store(true);
  waker.join();
  if (to != nullptr) freeaddrinfo(to);
}

absl::StatusOr<HealthState> CheckHealth(grpc::Channel* channel, absl::Duration timeout) {
  grpc::GenericStub stub(channel->shared_from_this());
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  grpc::CompletionQueue cq;
  grpc::Slice empty("", 0);
  grpc::ByteBuffer request(&empty, 1);  // HealthCheckRequest{service: ""} is zero bytes
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
      stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (!status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                        absl::StrCat("health check: ", status.error_message()));
  }
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return absl::InternalError("health check: bad response");
  std::string bytes;
  for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // HealthCheckResponse{ServingStatus status = 1}: 0x08 then the enum value; absent means 0.
  int value = 0;
  if (bytes.size() >= 2 && bytes[0] == 0x08) value = static_cast<unsigned char>(bytes[1]);
  switch (value) {
    case 1: return HealthState::kServing;
    case 2: return HealthState::kNotServing;
    default: return HealthState::kUnknown;
  }
}


}  // namespace moe::common
