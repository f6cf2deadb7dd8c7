// moe-expert-server: hosts experts of a MoE checkpoint and computes them for the router.
// Run with --help for the flags.

#include <csignal>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "expert_server/shard_server.h"
#include "services/common/flags.h"
#include "services/common/log.h"
#include "services/common/security.h"
#include "services/common/signals.h"
#include "services/common/status_macros.h"

namespace {


constexpr char kUsage[] = R"(moe-expert-server: serves experts of a MoE checkpoint over gRPC.

usage: moe-expert-server --checkpoint PATH [flags]

  --port N                 gRPC port (default 50061; 0 picks a free one and prints it)
  --host H                 address to bind (default 0.0.0.0)
  --metrics-port N         Prometheus /metrics port (default: off; 0 picks one)
  --checkpoint PATH        safetensors checkpoint (required)
  --tensor-prefix P        tensor name prefix, e.g. model.layers.0.block_sparse_moe.
  --activation A           override the checkpoint's activation (relu|gelu|silu)
  --experts LIST           experts to load at start: all (default), none, or e.g. 0,1,5
  --threads N              compute threads (default 1)
  --max-coalesced-rows N   rows merged into one expert matmul (default 256)
  --batch-delay-us N       wait up to N us for more rows before computing (default 0)
  --max-queue-rows N       queued rows before batches are refused (default 65536)
  --max-batch-rows N       rows one batch may assign (default 8192)
  --max-message-mb N       gRPC message size limit (default 64)
  --coordinator HOST:PORT  register with moe-coordinator and keep a lease (membership)
  --advertise HOST:PORT    the address to register (default 127.0.0.1:<port>)
  --state-dir DIR          keep trained experts in DIR and load them from there after a restart
                           (one directory per shard; created if missing)
  --tls-cert F --tls-key F serve TLS (and present this certificate to peers)
  --tls-ca F               trust this CA; --require-client-cert refuses callers without one
)";

absl::Status Run(int argc, char** argv) {
  using moe::common::Flags;
  ASSIGN_OR_RETURN(
      Flags f, Flags::Parse(argc, argv, 1, moe::common::WithTlsFlags({{"port", true}, {"host", true}, {"metrics-port", true},
                             {"checkpoint", true}, {"tensor-prefix", true}, {"activation", true},
                             {"experts", true}, {"threads", true}, {"max-coalesced-rows", true},
                             {"batch-delay-us", true}, {"max-queue-rows", true},
                             {"max-batch-rows", true}, {"max-message-mb", true},
                             {"coordinator", true}, {"advertise", true}, {"state-dir", true}})));
  moe::expert::ShardServerOptions o;
  ASSIGN_OR_RETURN(o.checkpoint, f.Require("checkpoint"));
  RETURN_IF_ERROR(f.ListenAddresses(50061, &o.address, &o.metrics_address));
  const std::string host = f.Get("host", "0.0.0.0");
  o.load.tensor_prefix = f.Get("tensor-prefix");
  for (const char* flag : {"coordinator", "advertise"}) {
    if (f.Has(flag)) RETURN_IF_ERROR(moe::common::CheckTarget(flag, f.Get(flag)));
  }
  // Only the coordinator is told the advertised address: without one it would be ignored.
  if (f.Has("advertise") && !f.Has("coordinator")) {
    return moe::common::UsageError(
        "--advertise is the address the shard registers with its coordinator: give --coordinator "
        "too, or leave --advertise out");
  }
  o.coordinator = f.Get("coordinator");
  o.advertise_address = f.Get("advertise");
  o.state_dir = f.Get("state-dir");
  if (f.Has("activation")) {
    ASSIGN_OR_RETURN(auto act, moe::common::AsUsage(moe::common::ParseActivation(f.Get("activation"))));
    o.load.activation = act;
  }
  const std::string experts = f.Get("experts", "all");
  if (experts == "none") {
    o.initial_experts = std::vector<int>{};
  } else if (experts != "all") {
    ASSIGN_OR_RETURN(std::vector<int> list, f.GetIntList("experts"));
    o.initial_experts = list;
  }
  ASSIGN_OR_RETURN(int64_t threads, f.GetInt("threads", 1));
  ASSIGN_OR_RETURN(o.pool.max_coalesced_rows,
                   f.GetInt("max-coalesced-rows", o.pool.max_coalesced_rows));
  ASSIGN_OR_RETURN(int64_t delay_us, f.GetInt("batch-delay-us", 0));
  ASSIGN_OR_RETURN(o.pool.max_queue_rows, f.GetInt("max-queue-rows", 65536));
  ASSIGN_OR_RETURN(o.max_batch_rows, f.GetInt("max-batch-rows", 8192));
  ASSIGN_OR_RETURN(int64_t mb, f.GetInt("max-message-mb", 64));
  if (threads < 1 || threads > 256) return moe::common::UsageError("--threads must be in [1, 256]");
  if (o.pool.max_coalesced_rows < 1 || o.pool.max_queue_rows < 1 || o.max_batch_rows < 1 ||
      delay_us < 0 || mb < 1 || mb > 2000) {
    return moe::common::UsageError(
        "row limits, --batch-delay-us and --max-message-mb must be positive");
  }
  o.pool.threads = static_cast<int>(threads);
  o.pool.batch_delay = absl::Microseconds(delay_us);
  o.limits.max_message_bytes = static_cast<int>(mb << 20);

  moe::common::TuneServiceProcess();
  RETURN_IF_ERROR(moe::common::ConfigureTlsFromFlags(f));
  moe::common::BlockTerminationSignals();
  ASSIGN_OR_RETURN(auto server, moe::expert::ShardServer::Start(o));
  std::printf("moe-expert-server listening on %s:%d%s\n", host.c_str(), server->port(),
              server->metrics_port() ? absl::StrCat(", metrics on :", server->metrics_port()).c_str()
                                     : "");
  std::fflush(stdout);
  moe::common::ServeUntilSignal(
      "moe-expert-server", [&] { server->Shutdown(absl::Milliseconds(500)); },
      [&] {
        absl::Status loaded = server->WaitUntilLoaded(absl::InfiniteDuration());
        if (loaded.code() == absl::StatusCode::kAborted) {
          // The router's placement unloaded an expert of --experts before it was loaded.
          moe::common::Log("moe-expert-server: initial load cut short by the placement: %s\n",
                           std::string(loaded.message()).c_str());
        } else if (!loaded.ok()) {
          moe::common::Log(
              "moe-expert-server: loading experts failed: %s (serving the experts that "
              "loaded; fix the checkpoint or state directory and restart the shard)\n",
              std::string(loaded.message()).c_str());
        }
        server->Wait();
      });
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  return moe::common::RunMain(argc, argv, "moe-expert-server", kUsage, Run);
}
