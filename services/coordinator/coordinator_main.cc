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


constexpr char kUsage[] =
    "moe-coordinator [--port 50041] [--host 0.0.0.0] [--metrics-port N] [--lease-ms 3000]\n"
    "  shard membership (register/heartbeat with leases) and training-step commit/abort\n";

absl::Status Run(int argc, char** argv) {
  ASSIGN_OR_RETURN(moe::common::Flags f,
                   moe::common::Flags::Parse(argc, argv, 1, moe::common::WithTlsFlags({{"port", true}, {"host", true},
                                              {"metrics-port", true}, {"lease-ms", true}})));
  moe::coordinator::CoordinatorOptions o;
  RETURN_IF_ERROR(f.ListenAddresses(50041, &o.address, &o.metrics_address));
  const std::string host = f.Get("host", "0.0.0.0");
  ASSIGN_OR_RETURN(int64_t lease, f.GetInt("lease-ms", 3000));
  if (lease < 100) return absl::InvalidArgumentError("--lease-ms must be at least 100");
  o.lease = absl::Milliseconds(lease);
  RETURN_IF_ERROR(moe::common::ConfigureTlsFromFlags(f));
  moe::common::BlockTerminationSignals();
  ASSIGN_OR_RETURN(auto server, moe::coordinator::CoordinatorServer::Start(o));
  std::printf("moe-coordinator listening on %s:%d\n", host.c_str(), server->port());
  std::fflush(stdout);
  moe::common::ServeUntilSignal(
      "moe-coordinator", [&] { server->Shutdown(); }, [&] { server->Wait(); });
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  return moe::common::RunMain(argc, argv, "moe-coordinator", kUsage, Run);
}
