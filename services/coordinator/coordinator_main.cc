// moe-coordinator: shard membership and the commit-or-abort of training steps.

#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "services/common/flags.h"
#include "services/common/security.h"
#include "services/common/signals.h"
#include "services/common/status_macros.h"
#include "services/coordinator/coordinator_server.h"

namespace {


constexpr char kUsage[] = R"(moe-coordinator: shard membership and the commit or abort of training steps.

usage: moe-coordinator [flags]

  Shards register with it (moe-expert-server --coordinator) and heartbeat; a router with
  --coordinator follows the membership and asks it to commit or abort each training step.

  --port N                   gRPC port (default 50041; 0 picks a free one and prints it)
  --host H                   address to bind (default 0.0.0.0)
  --metrics-port N           Prometheus /metrics port (default: off; 0 picks one)
  --lease-ms N               a shard not heard from for N ms leaves the membership (default
                             3000, at least 100; shards heartbeat every quarter lease)
  --tls-cert F --tls-key F   serve TLS (and present this certificate to shards)
  --tls-ca F                 trust this CA for peers; --require-client-cert: mutual TLS
)";

absl::Status Run(int argc, char** argv) {
  ASSIGN_OR_RETURN(moe::common::Flags f,
                   moe::common::Flags::Parse(argc, argv, 1, moe::common::WithTlsFlags({{"port", true}, {"host", true},
                                              {"metrics-port", true}, {"lease-ms", true}})));
  moe::coordinator::CoordinatorOptions o;
  RETURN_IF_ERROR(f.ListenAddresses(50041, &o.address, &o.metrics_address));
  const std::string host = f.Get("host", "0.0.0.0");
  ASSIGN_OR_RETURN(int64_t lease, f.GetInt("lease-ms", 3000));
  if (lease < 100) return moe::common::UsageError("--lease-ms must be at least 100");
  o.lease = absl::Milliseconds(lease);
  RETURN_IF_ERROR(moe::common::ConfigureTlsFromFlags(f));
  moe::common::TuneServiceProcess();
  moe::common::BlockTerminationSignals();
  ASSIGN_OR_RETURN(auto server, moe::coordinator::CoordinatorServer::Start(o));
  std::printf("moe-coordinator listening on %s:%d%s\n", host.c_str(), server->port(),
              server->metrics_port()
                  ? absl::StrCat(", metrics on :", server->metrics_port()).c_str()
                  : "");
  std::fflush(stdout);
  moe::common::ServeUntilSignal(
      "moe-coordinator", [&] { server->Shutdown(); }, [&] { server->Wait(); });
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  return moe::common::RunMain(argc, argv, "moe-coordinator", kUsage, Run);
}
