// moe-router: the cluster's front door (moe.v1.Router). Run with --help for the flags.

#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "router/router_flags.h"
#include "router/router_server.h"
#include "services/common/flags.h"
#include "services/common/security.h"
#include "services/common/signals.h"
#include "services/common/status_macros.h"

namespace {


constexpr char kUsage[] = R"(moe-router: gates tokens and serves the MoE layer over its expert shards.

usage: moe-router --checkpoint PATH (--shards HOST:PORT[,...] [--coordinator HOST:PORT] |
                  --coordinator HOST:PORT) [flags]

Training (TrainStep) needs --coordinator, with or without --shards. With --coordinator, one
router places the shards at a time: a second one stands by (NOT_SERVING) until the first stops.

  --shards LIST              the expert shards; without it the router follows the shards that
                             registered with --coordinator (joins and leaves seen live)

  --port N                   gRPC port (default 50051; 0 picks a free one and prints it)
  --host H                   address to bind (default 0.0.0.0)
  --metrics-port N           Prometheus /metrics port (default: off; 0 picks one)
  --checkpoint PATH          safetensors checkpoint (the router reads the gate)
  --state-dir DIR            keep the trained gate in DIR/gate.safetensors after each training
                             step and serve it from there when started again (default: not
                             kept; the shards' --state-dir keeps their experts)
  --tensor-prefix P          tensor name prefix
  --activation A / --top-k K override the checkpoint's metadata
  --placement S              replicated | sharded | hybrid (default) | dynamic
  --capacity-factor C        per-expert capacity factor; 0 (default) is unlimited
  --overflow drop|spill      what happens past capacity (default drop)
  --threads N                request worker threads (default 16)
  --dynamic-slots N          experts per shard under dynamic placement (default ceil(5E/4S))
  --imbalance-threshold X    dynamic: rebalance when max/mean - 1 of shard load exceeds X
                             (default 0.2)
  --rebalance-cooldown-s N   dynamic: at least N seconds between rebalances (default 5)
  --max-batch-tokens N       tokens one request may carry (default 8192)
  --max-inflight-requests N  Infer requests answered at once; more get RESOURCE_EXHAUSTED
                             (default 1024)
  --min-split-rows N         an expert's rows in a batch go to its replicas in pieces of at
                             least N (default 64; 1: pieces of rows / (4 x replicas))
  --wire fp32|bf16           row format towards the shards (default fp32)
  --allreduce-wire fp32|bf16 gradient format on the replicas' ring all-reduce (default fp32;
                             bf16 halves the bytes and rounds the summed gradients to BF16)
  --timeout-s N              the longest deadline one request gets, and the deadline of
                             requests that come without one (default 30); not Rebalance's,
                             which ends by its client's deadline, or in 10 minutes without one
                             (placement loads can be long)
  --shutdown-grace-s N       on SIGTERM or SIGINT: NOT_SERVING at once, no new calls, and up
                             to N seconds for the calls in flight to finish; those still
                             running then end UNAVAILABLE. An open InferStream reads no more
                             requests and ends UNAVAILABLE once it has answered what it read
                             (default 0.5)
  --coordinator HOST:PORT    moe-coordinator, needed for TrainStep
  --auth-token-file F        require "authorization: Bearer <token in F>" on every Router call
  --tls-cert F --tls-key F   serve TLS (and present this certificate to shards)
  --tls-ca F                 trust this CA for peers; --require-client-cert: mutual TLS
)";

absl::Status Run(int argc, char** argv) {
  using moe::common::Flags;
  ASSIGN_OR_RETURN(
      Flags f, Flags::Parse(argc, argv, 1, moe::common::WithTlsFlags({{"port", true}, {"host", true}, {"metrics-port", true},
                             {"checkpoint", true}, {"tensor-prefix", true}, {"activation", true},
                             {"top-k", true}, {"shards", true}, {"placement", true},
                             {"capacity-factor", true}, {"overflow", true}, {"threads", true},
                             {"dynamic-slots", true}, {"imbalance-threshold", true},
                             {"rebalance-cooldown-s", true}, {"max-batch-tokens", true},
                             {"max-inflight-requests", true},
                             {"min-split-rows", true},
                             {"wire", true}, {"allreduce-wire", true}, {"timeout-s", true},
                             {"shutdown-grace-s", true},
                             {"coordinator", true}, {"auth-token-file", true}, {"state-dir", true}})));
  moe::router::RouterServerOptions o;
  ASSIGN_OR_RETURN(o.checkpoint, f.Require("checkpoint"));
  const std::string shards = f.Get("shards");
  for (absl::string_view s : absl::StrSplit(shards, ',', absl::SkipEmpty())) {
    RETURN_IF_ERROR(
        moe::common::CheckTarget("shards", s, "(each entry of the comma-separated list)"));
    o.shards.emplace_back(s);
  }
  if (f.Has("coordinator")) {
    RETURN_IF_ERROR(moe::common::CheckTarget("coordinator", f.Get("coordinator")));
  }
  RETURN_IF_ERROR(f.ListenAddresses(50051, &o.address, &o.metrics_address));
  const std::string host = f.Get("host", "0.0.0.0");
  o.load.tensor_prefix = f.Get("tensor-prefix");
  o.coordinator = f.Get("coordinator");
  o.state_dir = f.Get("state-dir");
  if (f.Has("auth-token-file")) {
    ASSIGN_OR_RETURN(o.auth_token, moe::common::ReadTokenFile(f.Get("auth-token-file")));
  }
  if (f.Has("activation")) {
    ASSIGN_OR_RETURN(auto act, moe::common::AsUsage(moe::common::ParseActivation(f.Get("activation"))));
    o.load.activation = act;
  }
  if (f.Has("top-k")) {
    ASSIGN_OR_RETURN(int64_t k, f.GetInt("top-k", 2));
    o.load.top_k = static_cast<int>(k);
  }
  ASSIGN_OR_RETURN(const moe::router::RouterChoices choices, moe::router::ParseRouterChoices(f));
  o.strategy = choices.strategy;
  o.overflow = choices.spill ? moe::router::Overflow::kSpill : moe::router::Overflow::kDrop;
  o.bf16_allreduce = choices.bf16_allreduce;
  ASSIGN_OR_RETURN(o.capacity_factor, f.GetDouble("capacity-factor", 0.0));
  ASSIGN_OR_RETURN(int64_t threads, f.GetInt("threads", 16));
  ASSIGN_OR_RETURN(int64_t slots, f.GetInt("dynamic-slots", 0));
  ASSIGN_OR_RETURN(o.imbalance_threshold, f.GetDouble("imbalance-threshold", 0.2));
  ASSIGN_OR_RETURN(double cooldown, f.GetDouble("rebalance-cooldown-s", 5));
  ASSIGN_OR_RETURN(o.max_batch_tokens, f.GetInt("max-batch-tokens", 8192));
  ASSIGN_OR_RETURN(o.max_inflight_requests,
                   f.GetInt("max-inflight-requests", o.max_inflight_requests));
  ASSIGN_OR_RETURN(o.min_split_rows, f.GetInt("min-split-rows", o.min_split_rows));
  ASSIGN_OR_RETURN(double timeout, f.GetDouble("timeout-s", 30));
  ASSIGN_OR_RETURN(double grace, f.GetDouble("shutdown-grace-s", 0.5));
  if (threads < 1 || slots < 0 || o.max_batch_tokens < 1 || o.min_split_rows < 1 || timeout <= 0 ||
      cooldown < 0 || o.max_inflight_requests < 1 || grace < 0) {
    return moe::common::UsageError(
        "--threads, --max-batch-tokens, --max-inflight-requests, --min-split-rows and "
        "--timeout-s must be positive, --dynamic-slots, --rebalance-cooldown-s and "
        "--shutdown-grace-s not negative");
  }
  o.worker_threads = static_cast<int>(threads);
  o.dynamic_slots_per_shard = static_cast<int>(slots);
  o.rebalance_cooldown = absl::Seconds(cooldown);
  o.default_timeout = absl::Seconds(timeout);
  o.wire = choices.bf16_rows ? moe::common::WireType::kBFloat16 : moe::common::WireType::kFloat32;

  moe::common::TuneServiceProcess();
  RETURN_IF_ERROR(moe::common::ConfigureTlsFromFlags(f));
  moe::common::BlockTerminationSignals();
  ASSIGN_OR_RETURN(auto server, moe::router::RouterServer::Start(o));
  std::printf("moe-router listening on %s:%d%s\n", host.c_str(), server->port(),
              server->metrics_port() ? absl::StrCat(", metrics on :", server->metrics_port()).c_str()
                                     : "");
  std::fflush(stdout);
  absl::Status lost;
  moe::common::ServeUntilSignal(
      "moe-router", [&] { server->Shutdown(absl::Seconds(grace)); },
      [&] { lost = server->WaitOrLeaseLost(absl::Seconds(grace)); });
  return lost;
}

}  // namespace

int main(int argc, char** argv) {
  return moe::common::RunMain(argc, argv, "moe-router", kUsage, Run);
}
