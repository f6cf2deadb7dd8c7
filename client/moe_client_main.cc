// moe-client: the command-line tool for moe-cluster. Run without arguments for usage.

#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/cli_util.h"
#include "client/router_client.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "router/moe_layer.h"
#include "router/placement.h"
#include "services/common/checkpoint.h"
#include "services/common/flags.h"
#include "services/common/grpc_status.h"
#include "services/common/random_checkpoint.h"
#include "services/common/safetensors.h"
#include "services/common/security.h"
#include "services/common/server_util.h"
#include "services/common/signals.h"
#include "services/common/status_macros.h"
#include "services/common/tensor_codec.h"

namespace moe::client {
namespace {

using common::Flags;

constexpr char kUsage[] = R"(moe-client: talk to a moe-cluster, or run the MoE layer in process.

usage: moe-client COMMAND [flags]    (moe-client --version: the version)

every command also takes --tls-ca F [--tls-cert F --tls-key F] (TLS, mutual with a client
certificate) and --auth-token-file F (sends "authorization: Bearer <token>").

commands:
  init-checkpoint --out PATH --experts E --d-model D --d-ff F --top-k K
                  [--activation relu|gelu|silu] [--gated] [--bias] [--seed S]
                  [--normalize-topk true|false] [--bf16]
      write a seeded random checkpoint (safetensors, Mixtral tensor names; seed 1 unless
      given)
  make-tokens --out PATH --tokens N --d-model D [--seed S] [--name tokens|grad_output]
      write a random [N, D] file for `forward` (seed 7 unless given); --name grad_output
      writes one for `train --grad-output` (give it another seed than the tokens')
  forward --input IN.safetensors --output OUT.safetensors
          (--router HOST:PORT [--bf16] | --local --checkpoint PATH [--tensor-prefix P]
           [--capacity-factor C])
      run the layer on tensor `tokens` [N, d_model] through the cluster (or in process);
      writes `output`, `expert_ids`, `weights` (`infer` is the same command)
  health --addr HOST:PORT [--timeout-ms 2000]
      grpc.health.v1 check of a router, shard or coordinator; exits 0 only when SERVING
  drain --addr SHARD_HOST:PORT [--timeout-ms 10000] [--undo]
      before stopping a shard: it turns NOT_SERVING, routers move their work away and close
      their streams; returns once none is open (exit 1 if the timeout passed first, or an
      undo came meanwhile; a router with no stream open to it then sees the drain at its
      next health check of the shard, within 250 ms);
      --undo takes a drain back (the shard was not stopped): it serves again
  info --router HOST:PORT
      the model and the shards with their health and experts
  placement --router HOST:PORT [--rebalance STRATEGY] [--dry-run]
      the placement table; --rebalance switches strategy (replicated|sharded|hybrid|dynamic),
      --dry-run only scores the proposal (alone: a rebalance of the current strategy), and
      exits 1 where the router would refuse it, saying why under the table
  train --router HOST:PORT [--steps K] [--learning-rate LR] [--aux-loss-coef A] [--z-loss-coef Z]
        (--tokens T.safetensors --grad-output G.safetensors | --synthetic [--batch-size N] [--seed S])
      K training steps; with files, the same batch every step (`tokens` and `grad_output`
      [N, d_model]); --synthetic regresses the layer onto a fixed random linear target
      (loss = mean squared error, grad_output = 2 (y - target) / N). Prints each step's
      auxiliary losses, and its loss with --synthetic (with files the target is not known: -).
      The step column counts the cluster's steps since its checkpoint; a step refused or
      aborted (no weight changed) is sent again, for up to 20 s after the first attempt;
      errors name the router's own number for a step as "step id".
      Ctrl-C stops it between steps (a step in flight finishes): the table of the steps
      taken, then exit by SIGINT (status 130).
      Defaults: K 10, LR 0.01, A and Z 0 (no auxiliary losses), N 64, S 1.
  save-checkpoint --router HOST:PORT --path PATH
      the current (trained) weights as a safetensors checkpoint, written by the router on its
      host's file system (a relative PATH from the router's working directory; the line
      printed names the file whole)
  load --router HOST:PORT [--checkpoint PATH [--tensor-prefix P] --zipf S] [--concurrency C]
       [--batch-size N] [--duration SECONDS] [--requests R] [--seed S] [--hot-order K]
       [--window W] [--stall-s T]
      a load generator: C concurrent InferStream streams of N-token requests; with a checkpoint
      and --zipf, expert popularity follows a Zipf law of exponent S (0: every expert equally
      popular): each token's top-k experts are drawn by it without replacement (expert 0 the
      most popular; with --hot-order K > 0 a shuffle of the experts seeded by K, with
      --hot-order -1 the reverse: expert E-1 the most popular). Prints tokens/s, p50/p95/p99
      latency and errors by code; exits 1 when no request succeeded, or when the router cut the
      run short or was not serving when it ended (below). --requests alone runs until R are
      answered; with --duration, whichever comes first. Ctrl-C stops it early: the table of the
      run so far, then exit by SIGINT (status 130). A stream the router ends with UNAVAILABLE
      (a restart, a shutdown) is opened again once the router serves again (up to 30 s; a run
      that ends while it waits exits 1); its unanswered requests count as errors. Once the run
      is over, answers still missing after 10 s without one are given up (CANCELLED). No
      answer at all for T seconds (--stall-s, default 35: past the router's 30 s deadline) ends
      the run early, and the answers in flight then get those 10 s. Defaults: C 4, N 64, 10
      seconds, random tokens without --zipf, seed 1; C at most 1024. --window: requests each
      stream keeps in flight (default 2, at least 1).
  demo --checkpoint PATH [--batches B] [--batch-size N] [--tensor-prefix P] [--capacity-factor C]
       [--zipf S [--hot-order K]]
      run the in-process layer on random batches (with --zipf, the tokens load --zipf sends);
      print tokens/s and per-expert load (defaults: B 20, N 256)

Exit status: 0 done; 1 the command failed (the line on stderr says why); 2 the command line
is wrong: an unknown command or flag, or a flag missing or with a bad value (the line says
which); after Ctrl-C, `load` and `train` end by SIGINT (130 in a shell).
)";

// Set by the first SIGINT during `load` or `train` (a second one ends the process as usual).
std::atomic<bool> interrupted{false};
void OnInterrupt(int) { interrupted.store(true); }

// From now on the first Ctrl-C only sets `interrupted`: the command ends its work in order and
// then EndByInterrupt.
void CatchInterrupt() {
  struct sigaction on_int = {};
  on_int.sa_handler = OnInterrupt;
  on_int.sa_flags = SA_RESETHAND;
  sigemptyset(&on_int.sa_mask);
  sigaction(SIGINT, &on_int, nullptr);
}

// Ends the process by SIGINT, as a shell expects after Ctrl-C (exit status 130), so that a loop
// around the command stops too.
void EndByInterrupt() {
  std::fflush(stdout);
  signal(SIGINT, SIG_DFL);
  raise(SIGINT);
}

// A flag the command cannot do without, as an integer.
absl::StatusOr<int64_t> RequiredInt(const Flags& f, const char* name) {
  RETURN_IF_ERROR(f.Require(name).status());
  return f.GetInt(name, 0);
}

// The lines of kUsage about `cmd` (an alias names its command's lines), or "" if none.
std::string CommandHelp(const std::string& cmd) {
  const std::string name = cmd == "infer" ? "forward" : cmd;
  std::string out;
  bool in = false;
  for (absl::string_view line : absl::StrSplit(kUsage, '\n')) {
    const bool starts_command = line.size() > 2 && line.substr(0, 2) == "  " && line[2] != ' ';
    if (starts_command) in = line.substr(2, name.size() + 1) == name + " ";
    if (line.empty()) in = false;
    if (in) absl::StrAppend(&out, line, "\n");
  }
  return out.empty() ? "" : absl::StrCat("usage: moe-client\n", out);
}

absl::Status InitCheckpoint(const Flags& f) {
  common::RandomCheckpointSpec spec;
  ASSIGN_OR_RETURN(std::string out, f.Require("out"));
  ASSIGN_OR_RETURN(int64_t experts, RequiredInt(f, "experts"));
  ASSIGN_OR_RETURN(int64_t d_model, RequiredInt(f, "d-model"));
  ASSIGN_OR_RETURN(int64_t d_ff, RequiredInt(f, "d-ff"));
  ASSIGN_OR_RETURN(int64_t top_k, RequiredInt(f, "top-k"));
  ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 1));
  if (experts < 1 || experts > 4096) return common::UsageError("--experts must be in [1, 4096]");
  if (d_model < 1 || d_model > 65536) return common::UsageError("--d-model must be in [1, 65536]");
  if (d_ff < 1 || d_ff > 262144) return common::UsageError("--d-ff must be in [1, 262144]");
  if (top_k < 1 || top_k > experts) {
    return common::UsageError(absl::StrCat("--top-k must be in [1, ", experts, "]"));
  }
  ASSIGN_OR_RETURN(spec.config.activation, common::AsUsage(common::ParseActivation(f.Get("activation", "silu"))));
  const std::string norm = f.Get("normalize-topk", "true");
  if (norm != "true" && norm != "false") {
    return common::UsageError("--normalize-topk must be true or false");
  }
  {
    // The checkpoint is built in memory before it is written, and held about three times at
    // the end (the tensors, the writer's copy, the file's bytes): refuse one that cannot fit,
    // rather than die of bad_alloc.
    const double bytes = 4.0 * static_cast<double>(experts) * static_cast<double>(d_model) *
                         (static_cast<double>(d_ff) * (f.Has("gated") ? 3 : 2) + 1);
    const double memory = static_cast<double>(sysconf(_SC_PHYS_PAGES)) *
                          static_cast<double>(sysconf(_SC_PAGE_SIZE));
    if (memory > 0 && 3 * bytes > memory) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "a checkpoint of %lld experts, d_model %lld and d_ff %lld takes %.1f GiB, and this tool "
          "builds it in memory, about 3 times over (this machine has %.1f GiB): make it smaller",
          static_cast<long long>(experts), static_cast<long long>(d_model),
          static_cast<long long>(d_ff), bytes / (1 << 30), memory / (1 << 30)));
    }
  }
  spec.config.num_experts = static_cast<int>(experts);
  spec.config.d_model = static_cast<int>(d_model);
  spec.config.d_ff = static_cast<int>(d_ff);
  spec.config.top_k = static_cast<int>(top_k);
  spec.config.gated = f.Has("gated");
  spec.config.normalize_topk = norm == "true";
  spec.bias = f.Has("bias");
  spec.seed = static_cast<uint64_t>(seed);
  common::Checkpoint ck = common::MakeRandomCheckpoint(spec);
  if (f.Has("bf16")) {
    // Same tensors, stored as BF16 (compute stays FP32).
    const common::ModelConfig& c = ck.config;
    common::SafetensorsWriter w;
    w.SetMetadata("activation", std::string(common::ActivationName(c.activation)));
    w.SetMetadata("top_k", absl::StrCat(c.top_k));
    w.SetMetadata("normalize_topk", norm);
    RETURN_IF_ERROR(w.AddBF16("gate.weight", {c.num_experts, c.d_model}, ck.gate.weight));
    if (spec.bias) RETURN_IF_ERROR(w.AddBF16("gate.bias", {c.num_experts}, ck.gate.bias));
    for (int e = 0; e < c.num_experts; ++e) {
      const auto& x = ck.experts[e];
      auto n = [&](const char* s) { return common::ExpertTensorName("", e, s); };
      RETURN_IF_ERROR(w.AddBF16(n("w1.weight"), {c.d_ff, c.d_model}, x.w1));
      RETURN_IF_ERROR(w.AddBF16(n("w2.weight"), {c.d_model, c.d_ff}, x.w2));
      if (c.gated) RETURN_IF_ERROR(w.AddBF16(n("w3.weight"), {c.d_ff, c.d_model}, x.w3));
      if (spec.bias) {
        RETURN_IF_ERROR(w.AddBF16(n("w1.bias"), {c.d_ff}, x.b1));
        RETURN_IF_ERROR(w.AddBF16(n("w2.bias"), {c.d_model}, x.b2));
        if (c.gated) RETURN_IF_ERROR(w.AddBF16(n("w3.bias"), {c.d_ff}, x.b3));
      }
    }
    RETURN_IF_ERROR(w.Write(out));
  } else {
    RETURN_IF_ERROR(common::SaveCheckpoint(out, ck));
  }
  std::printf("wrote %s: %d experts, d_model %d, d_ff %d, top-%d, %s%s%s\n", out.c_str(),
              spec.config.num_experts, spec.config.d_model, spec.config.d_ff, spec.config.top_k,
              std::string(common::ActivationName(spec.config.activation)).c_str(),
              spec.config.gated ? ", gated" : "", spec.bias ? ", with biases" : "");
  return absl::OkStatus();
}

absl::Status MakeTokens(const Flags& f) {
  ASSIGN_OR_RETURN(std::string out, f.Require("out"));
  ASSIGN_OR_RETURN(int64_t n, RequiredInt(f, "tokens"));
  ASSIGN_OR_RETURN(int64_t d, RequiredInt(f, "d-model"));
  ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 7));
  ASSIGN_OR_RETURN(std::string name, f.GetChoice("name", {"tokens", "grad_output"}, "tokens"));
  if (n < 1 || d < 1 || n * d > (int64_t{1} << 30)) {
    return common::UsageError("--tokens and --d-model must be positive (and not huge)");
  }
  common::SafetensorsWriter w;
  RETURN_IF_ERROR(w.AddF32(name, {n, d}, common::RandomMatrix(n, d, seed)));
  RETURN_IF_ERROR(w.Write(out));
  std::printf("wrote %s: %s [%lld, %lld]\n", out.c_str(), name.c_str(),
              static_cast<long long>(n), static_cast<long long>(d));
  return absl::OkStatus();
}

// A file the user named that is not there: the error says which command makes one.
template <typename T>
absl::StatusOr<T> HintIfMissing(absl::StatusOr<T> r, const char* maker) {
  if (r.status().code() != absl::StatusCode::kNotFound) return r;
  return absl::NotFoundError(absl::StrCat(r.status().message(), " (make one with ", maker, ")"));
}

absl::StatusOr<common::Checkpoint> ReadCheckpoint(const std::string& path,
                                                  const common::LoadOptions& opts) {
  return HintIfMissing(common::LoadCheckpoint(path, opts), "moe-client init-checkpoint");
}

// INVALID_ARGUMENT naming --NAME when it was given below `least`.
absl::Status AtLeast(const Flags& f, const char* name, int64_t value, int64_t least) {
  if (!f.Has(name) || value >= least) return absl::OkStatus();
  return common::UsageError(absl::StrCat("--", name, " must be >= ", least, ", got ", value));
}

// INVALID_ARGUMENT when `rows` rows of `d` floats (`what` says whose) make a request larger
// than a gRPC message may be: said here, in the user's terms, rather than as gRPC's "Sent
// message larger than max".
absl::Status CheckRequestFits(int64_t rows, int64_t d, const std::string& what) {
  const double bytes = 4.0 * static_cast<double>(rows) * static_cast<double>(d);
  const int max_message = common::RpcLimits().max_message_bytes;
  if (bytes <= max_message - (1 << 20)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s: %.0f MiB in one request, more than one may carry (%d MiB); send fewer tokens per "
      "request (the router also caps them: --max-batch-tokens, 8192 by default)",
      what, bytes / (1 << 20), max_message >> 20));
}

absl::StatusOr<std::unique_ptr<router::MoeLayer>> LoadLayer(const Flags& f) {
  ASSIGN_OR_RETURN(std::string path, f.Require("checkpoint"));
  ASSIGN_OR_RETURN(double cf, f.GetDouble("capacity-factor", 0.0));
  if (cf < 0) {
    return common::UsageError(
        absl::StrCat("--capacity-factor must be >= 0 (0: no limit), got ", cf));
  }
  common::LoadOptions opts;
  opts.tensor_prefix = f.Get("tensor-prefix");
  ASSIGN_OR_RETURN(common::Checkpoint ck, ReadCheckpoint(path, opts));
  return router::MoeLayer::Create(std::move(ck), router::MoeLayerOptions{cf});
}

absl::StatusOr<std::pair<std::vector<float>, int64_t>> ReadTokens(const std::string& path) {
  ASSIGN_OR_RETURN(auto reader,
                   HintIfMissing(common::SafetensorsReader::Open(path), "moe-client make-tokens"));
  const common::StTensor* t = reader->Find("tokens");
  if (t == nullptr) {
    // Named what it holds: another kind of file (a checkpoint, forward's output) is recognised.
    return absl::InvalidArgumentError(absl::StrCat(path, ": needs a tensor 'tokens' [N, d_model] (",
                                                   reader->DescribeTensors(), ")"));
  }
  if (t->shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": needs a tensor 'tokens' [N, d_model], got [", absl::StrJoin(t->shape, ", "), "]"));
  }
  ASSIGN_OR_RETURN(std::vector<float> x, reader->ReadFloat("tokens"));
  return std::make_pair(std::move(x), t->shape[1]);
}

absl::Status WriteForward(const std::string& out_path, int64_t n, int64_t d, int k,
                          const std::vector<float>& y, const std::vector<int32_t>& ids,
                          const std::vector<float>& weights, int64_t dropped) {
  common::SafetensorsWriter w;
  RETURN_IF_ERROR(w.AddF32("output", {n, d}, y));
  RETURN_IF_ERROR(w.AddI32("expert_ids", {n, k}, ids));
  RETURN_IF_ERROR(w.AddF32("weights", {n, k}, weights));
  RETURN_IF_ERROR(w.Write(out_path));
  std::printf("wrote %s: output [%lld, %lld], expert_ids and weights [%lld, %d]; %lld dropped\n",
              out_path.c_str(), static_cast<long long>(n), static_cast<long long>(d),
              static_cast<long long>(n), k, static_cast<long long>(dropped));
  return absl::OkStatus();
}

// Whether a call's error says that what answered is no gRPC server (an HTTP/1 server: a
// /metrics port given for a service's).
bool NotGrpc(absl::string_view message) {
  return absl::StrContains(message, "Failed parsing HTTP/2") ||
         absl::StrContains(message, "http1.x");
}
constexpr char kNotGrpc[] = "something listens there but does not speak gRPC (a /metrics port?)";

// A router call's failure as the user's error: a router that cannot be reached (after the
// attempts of CallWithReconnects) is named, with how to start one.
absl::Status RouterError(const grpc::Status& st, const std::string& addr) {
  const std::string& m = st.error_message();
  if (st.error_code() == grpc::StatusCode::UNAVAILABLE &&
      absl::StartsWith(m, "DNS resolution failed")) {
    // "DNS resolution failed for H:P: C-ares status is not ARES_SUCCESS ...: REASON"
    const size_t last = m.rfind(": ");
    return absl::UnavailableError(absl::StrCat(
        "cannot reach the router at ", addr, ": its host name does not resolve (",
        last == std::string::npos ? m : m.substr(last + 2),
        "); check it (moe-cluster prints the router's address as READY router=HOST:PORT)"));
  }
  if (st.error_code() == grpc::StatusCode::UNAVAILABLE && NotGrpc(m)) {
    return absl::UnavailableError(
        absl::StrCat("cannot reach the router at ", addr, ": ", kNotGrpc,
                     "; moe-cluster prints the router's address as READY router=HOST:PORT"));
  }
  if (st.error_code() == grpc::StatusCode::UNAVAILABLE &&
      absl::StartsWith(st.error_message(), "failed to connect")) {
    // Something listens there but closed the connection at once: a TLS server meeting a
    // plaintext client, or one that wants a client certificate.
    const bool closed = absl::StrContains(st.error_message(), "Socket closed") ||
                        absl::StrContains(st.error_message(), "andshake") ||
                        absl::StrContains(st.error_message(), "SSL");
    if (closed && common::TlsEnabled()) {
      return absl::UnavailableError(absl::StrCat(
          "cannot reach the router at ", addr, ": ", st.error_message(),
          " (the TLS handshake failed: does the router use TLS, with a certificate signed by "
          "--tls-ca? does it want a client certificate, --tls-cert and --tls-key?)"));
    }
    return absl::UnavailableError(absl::StrCat(
        "cannot reach the router at ", addr, ": ", st.error_message(),
        closed ? " (something listens there and closed the connection: does the router use "
                 "TLS? give --tls-ca CA, and --tls-cert and --tls-key when it wants a client "
                 "certificate)"
               : " (is it running there? `make run` or `moe-cluster --checkpoint PATH` starts a "
                 "local one and prints its address)"));
  }
  return common::FromGrpcStatus(st);
}

// `s` with its code's name leading its message ("INVALID_ARGUMENT: ..."), as forward tells the
// model's refusals.
absl::Status WithCodeName(const absl::Status& s) {
  return absl::Status(s.code(),
                      absl::StrCat(absl::StatusCodeToString(s.code()), ": ", s.message()));
}

absl::Status Forward(const Flags& f) {
  if (f.Has("local") == f.Has("router")) {
    return common::UsageError("forward needs exactly one of --local or --router HOST:PORT");
  }
  // A flag of the other mode would be ignored without a word (the router's capacity factor is
  // its own --capacity-factor, its model its own --checkpoint).
  const char* mode = f.Has("local") ? "--router" : "--local";
  for (const char* flag : f.Has("local") ? std::vector<const char*>{"bf16"}
                                         : std::vector<const char*>{"checkpoint", "tensor-prefix",
                                                                    "capacity-factor"}) {
    if (f.Has(flag)) {
      return common::UsageError(absl::StrCat(
          "--", flag, " applies to forward ", mode, " only",
          f.Has("local") ? "" : " (the router serves its own checkpoint, with its own flags)"));
    }
  }
  ASSIGN_OR_RETURN(std::string in_path, f.Require("input"));
  ASSIGN_OR_RETURN(std::string out_path, f.Require("output"));
  {
    std::error_code ec;
    if (in_path == out_path || std::filesystem::equivalent(in_path, out_path, ec)) {
      return common::UsageError(absl::StrCat(
          "--output ", out_path, " is the --input file: give another path (the tokens would be "
          "overwritten by the outputs)"));
    }
  }
  ASSIGN_OR_RETURN(auto tokens, ReadTokens(in_path));
  const std::vector<float>& x = tokens.first;
  const int64_t d = tokens.second;
  const int64_t n = d > 0 ? static_cast<int64_t>(x.size()) / d : 0;
  if (f.Has("router")) {
    RETURN_IF_ERROR(
        CheckRequestFits(n, d, absl::StrCat(in_path, ": ", n, " tokens of d_model ", d)));
    auto stub = MakeRouterStub(f.Get("router"));
    v1::InferRequest req;
    req.set_request_id("forward");
    req.set_return_routing(true);
    common::EncodeTensor(x, {n, d},
                         f.Has("bf16") ? common::WireType::kBFloat16 : common::WireType::kFloat32,
                         req.mutable_tokens());
    v1::InferResponse resp;
    const grpc::Status st = CallWithReconnects(
        absl::Seconds(60), [&](grpc::ClientContext* ctx) { return stub->Infer(ctx, req, &resp); });
    if (!st.ok()) {
      // The router's answer with its code (INVALID_ARGUMENT: ...); a router not reached as
      // the other commands say it.
      absl::Status s = RouterError(st, f.Get("router"));
      if (absl::StartsWith(s.message(), "cannot reach")) return s;
      return WithCodeName(s);
    }
    ASSIGN_OR_RETURN(common::TensorView v, common::DecodeMatrix(resp.output(), "output", d));
    const int k = static_cast<int>(resp.routing().top_k());
    return WriteForward(out_path, n, d, k, common::ViewToFloat(v),
                        {resp.routing().expert_ids().begin(), resp.routing().expert_ids().end()},
                        {resp.routing().weights().begin(), resp.routing().weights().end()},
                        resp.stats().dropped_assignments());
  }
  ASSIGN_OR_RETURN(auto layer, LoadLayer(f));
  const common::ModelConfig& c = layer->config();
  if (d != c.d_model) {
    return absl::InvalidArgumentError(absl::StrCat(in_path, ": 'tokens' must be [N, ", c.d_model,
                                                   "] for this checkpoint"));
  }
  // What the router refuses, --local refuses too.
  RETURN_IF_ERROR(common::CheckTokens(x, n, d, absl::StrCat(in_path, ": tokens")));
  ASSIGN_OR_RETURN(router::LayerOutput out, layer->Forward(x.data(), n));
  // As the router's refusal reads through --router.
  if (absl::Status finite = common::CheckOutputFinite(out.y, d); !finite.ok()) {
    return WithCodeName(finite);
  }
  return WriteForward(out_path, n, d, c.top_k, out.y, out.gating.expert_ids, out.gating.weights,
                      out.gating.dropped);
}

absl::StatusOr<v1::ClusterInfo> GetInfo(v1::Router::Stub* stub, const std::string& addr) {
  v1::ClusterInfo info;
  const grpc::Status st = CallWithReconnects(absl::Seconds(10), [&](grpc::ClientContext* ctx) {
    return stub->GetClusterInfo(ctx, v1::GetClusterInfoRequest(), &info);
  });
  if (!st.ok()) return RouterError(st, addr);
  return info;
}

// grpc.health.v1 of any moe service (router, shard or coordinator): exit 0 only when SERVING.
// Used by container health checks; health checks need no token.
absl::Status Health(const Flags& f) {
  ASSIGN_OR_RETURN(std::string addr, f.Require("addr"));
  ASSIGN_OR_RETURN(int64_t timeout_ms, f.GetInt("timeout-ms", 2000));
  RETURN_IF_ERROR(AtLeast(f, "timeout-ms", timeout_ms, 1));
  auto channel = common::CreateAuthorizedChannel(addr, common::UserChannelArgs(), "");
  absl::StatusOr<common::HealthState> state =
      common::CheckHealth(channel.get(), absl::Milliseconds(timeout_ms));
  if (!state.ok()) {
    return absl::UnavailableError(absl::StrCat(
        "no health answer from ", addr, ": ",
        NotGrpc(state.status().message()) ? absl::StrCat(kNotGrpc, "; give the service's gRPC port")
                                          : std::string(state.status().message())));
  }
  if (*state != common::HealthState::kServing) {
    return absl::UnavailableError(absl::StrCat(addr, " is up but NOT_SERVING"));
  }
  std::printf("%s SERVING\n", addr.c_str());
  return absl::OkStatus();
}

// Drains an expert shard before a planned stop (Kubernetes preStop): see ExpertShard.Drain.
absl::Status DrainCmd(const Flags& f) {
  ASSIGN_OR_RETURN(std::string addr, f.Require("addr"));
  ASSIGN_OR_RETURN(int64_t timeout_ms, f.GetInt("timeout-ms", 10000));
  if (timeout_ms < 0 || timeout_ms > 60000) {
    return common::UsageError("--timeout-ms must be in [0, 60000] (0: the shard's 10 s)");
  }
  const int64_t waits_ms = timeout_ms == 0 ? 10000 : timeout_ms;
  auto channel = common::CreateAuthorizedChannel(addr, common::UserChannelArgs(), "");
  auto stub = v1::ExpertShard::NewStub(channel);
  v1::DrainRequest req;
  req.set_timeout_ms(timeout_ms);
  req.set_undo(f.Has("undo"));
  v1::DrainResponse resp;
  const absl::Time start = absl::Now();
  // Draining is idempotent: a shard already draining answers when its streams have closed.
  const grpc::Status st =
      CallWithReconnects(absl::Milliseconds(waits_ms + 5000), [&](grpc::ClientContext* ctx) {
        return stub->Drain(ctx, req, &resp);
      });
  if (!st.ok()) {
    return absl::Status(
        common::FromGrpcStatus(st).code(),
        absl::StrCat("drain of ", addr, ": ",
                     NotGrpc(st.error_message())
                         ? absl::StrCat(kNotGrpc,
                                        "; give the shard's gRPC port (moe-cluster prints it "
                                        "as shard N addr=HOST:PORT)")
                         : st.error_message()));
  }
  if (req.undo() && !resp.undone()) {
    return absl::FailedPreconditionError(absl::StrCat(
        addr, " did not take the undo: its moe-expert-server is older than this client and read "
              "the call as a drain, so it is draining now; restart it to serve again"));
  }
  if (req.undo()) {
    const char* what = resp.not_draining() ? "not draining, nothing to undo" : "drain undone";
    if (resp.serving()) {
      std::printf("%s: %s: SERVING, routers send it work again\n", addr.c_str(), what);
      return absl::OkStatus();
    }
    if (resp.not_draining()) {
      std::printf("%s: %s: NOT_SERVING until it holds experts (a router places them)\n",
                  addr.c_str(), what);
      return absl::OkStatus();
    }
    // Its experts were moved off: it serves once a router places some there again (at its next
    // tick), which `undo && health` would otherwise race. Waited for up to the timeout.
    const absl::Time until = start + absl::Milliseconds(waits_ms);
    for (;;) {
      absl::StatusOr<common::HealthState> h = common::CheckHealth(
          channel.get(), std::max(absl::Milliseconds(100), until - absl::Now()));
      if (h.ok() && *h == common::HealthState::kServing) {
        std::printf("%s: %s: SERVING after %.0f ms (a router placed experts on it)\n", addr.c_str(),
                    what, absl::ToDoubleMilliseconds(absl::Now() - start));
        return absl::OkStatus();
      }
      if (absl::Now() >= until) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return absl::UnavailableError(absl::StrCat(
        addr, ": drain undone, but still NOT_SERVING after ", waits_ms,
        " ms: it serves once a router places experts on it, which a router holds back while "
        "another shard drains, while its members settle, or where its strategy's layout gives "
        "this shard nothing or cannot be applied (the router's log says why)"));
  }
  if (resp.undone()) {
    return absl::AbortedError(absl::StrCat(
        addr, ": the drain was undone (drain --undo) while it waited; drain it again before "
              "stopping it"));
  }
  if (!resp.drained() && resp.open_streams() == 0) {
    return absl::DeadlineExceededError(absl::StrCat(
        addr, ": not known to be drained after ", waits_ms,
        " ms: routers notice a drain at their next health check (every 250 ms), and one that "
        "still places experts on the shard opens a stream to it then; give --timeout-ms 1000 "
        "or more"));
  }
  if (!resp.drained()) {
    return absl::DeadlineExceededError(absl::StrCat(
        addr, ": ", resp.open_streams(),
        resp.open_streams() == 1 ? " Dispatch stream still open" : " Dispatch streams still open",
        " after ", waits_ms,
        " ms: a router still places experts on the shard (its log says why) or has requests "
        "routed there running; if it is stopped now, what is sent to it goes to another "
        "replica where its expert has one, and fails where it has none"));
  }
  std::printf("%s drained in %.0f ms: NOT_SERVING, no Dispatch stream open\n", addr.c_str(),
              absl::ToDoubleMilliseconds(absl::Now() - start));
  return absl::OkStatus();
}

absl::Status Info(const Flags& f) {
  ASSIGN_OR_RETURN(std::string addr, f.Require("router"));
  auto stub = MakeRouterStub(addr);
  ASSIGN_OR_RETURN(v1::ClusterInfo info, GetInfo(stub.get(), addr));
  std::printf("model: %d experts, d_model %d, d_ff %d, top-%d, %s%s, normalize_topk %s\n",
              info.num_experts(), info.d_model(), info.d_ff(), info.top_k(),
              info.activation().c_str(), info.gated() ? " gated" : "",
              info.normalize_topk() ? "true" : "false");
  std::printf("placement: %s, version %llu, capacity factor %s\n",
              info.placement_strategy().c_str(),
              static_cast<unsigned long long>(info.placement_version()),
              info.capacity_factor() > 0 ? absl::StrCat(info.capacity_factor()).c_str()
                                         : "off (no assignment dropped)");
  // No shards listed and version 0 said nothing of why (a router started before its
  // coordinator: a helper's walk-through, 2026-12-06).
  if (!info.not_ready().empty()) {
    std::printf("NOT SERVING: %s\n", info.not_ready().c_str());
  }
  for (const std::string& w : info.warnings()) std::printf("WARNING: %s\n", w.c_str());
  if (info.coordinator().empty()) {
    std::printf("training: off (the router has no --coordinator)\n");
  } else if (info.coordinator_state() == "unreachable") {
    std::printf(
        "training: coordinator %s is UNREACHABLE from the router: train steps are "
        "refused until it answers; check that it runs\n",
        info.coordinator().c_str());
  } else {
    std::printf("training: coordinator %s, %s\n", info.coordinator().c_str(),
                info.coordinator_state().c_str());
  }
  // One router places the shards of a coordinator at a time: this one, or the one it names.
  if (!info.placement_lease().empty()) {
    std::printf("placement lease: %s\n", info.placement_lease().c_str());
  }
  // A draining shard's experts that no shard in rotation holds: the router still sends them
  // there, their last resort, and the drain waits until another shard can take them.
  std::vector<std::vector<int>> last_resort(info.shards_size());
  for (int s = 0; s < info.shards_size(); ++s) {
    // Answering (a shard stopped after its drain reads DOWN until the next status read).
    if (!info.shards(s).draining() || info.shards(s).state() != "not_serving") continue;
    for (int e : info.shards(s).experts()) {
      bool elsewhere = false;
      for (const v1::ShardInfo& other : info.shards()) {
        elsewhere = elsewhere ||
                    (other.healthy() && std::find(other.experts().begin(), other.experts().end(),
                                                  e) != other.experts().end());
      }
      if (!elsewhere) last_resort[s].push_back(e);
    }
  }
  std::vector<std::vector<std::string>> rows;
  for (int s = 0; s < info.shards_size(); ++s) {
    const v1::ShardInfo& si = info.shards(s);
    // A shard that answers NOT_SERVING is out of rotation on purpose, not down.
    const std::string health = si.healthy() ? "up"
                               : si.state() == "not_serving"
                                   ? (!last_resort[s].empty() ? "drains, still serving"
                                      : si.draining()         ? "not serving (drains)"
                                      : si.experts().empty()  ? "idle (no experts)"
                                                              : "not serving")
                               : si.state() == "incompatible" ? "INCOMPATIBLE"
                                                              : "DOWN";
    // A shard of another model, or one not placed because it does not answer, is no shard of
    // the placement (the router says why): no index, and why instead of experts.
    const bool placed = si.detail().empty();
    rows.push_back({placed ? absl::StrCat(s) : "-", si.address(), health,
                    placed ? absl::StrJoin(si.experts(), ",") : si.detail()});
  }
  PrintTable({"shard", "address", "health", "experts"}, rows);
  for (int s = 0; s < info.shards_size(); ++s) {
    const v1::ShardInfo& si = info.shards(s);
    if (si.out_of_rotation_reason().empty()) continue;
    std::printf("shard %d (%s) out of rotation for %.1f s: %s\n", s, si.address().c_str(),
                static_cast<double>(si.out_of_rotation_ms()) / 1000.0,
                si.out_of_rotation_reason().c_str());
  }
  for (int s = 0; s < info.shards_size(); ++s) {
    if (last_resort[s].empty()) continue;
    // What lets the drain end: a drained shard that still answers serving again, or this
    // drain undone.
    std::vector<std::string> ways;
    for (int d = 0; d < info.shards_size(); ++d) {
      const v1::ShardInfo& other = info.shards(d);
      if (d != s && other.draining() && other.state() == "not_serving" && last_resort[d].empty()) {
        ways.push_back(absl::StrCat("undo the drain of ", other.address(),
                                    ": moe-client drain --addr ", other.address(), " --undo"));
      }
    }
    ways.push_back(absl::StrCat(ways.empty() ? "" : "or ",
                                "undo this drain: moe-client drain --addr ",
                                info.shards(s).address(), " --undo"));
    std::printf(
        "shard %d (%s) drains but still serves expert(s) %s: no shard in rotation holds them, so "
        "its drain waits for one that can take them (%s)\n",
        s, info.shards(s).address().c_str(), absl::StrJoin(last_resort[s], ",").c_str(),
        absl::StrJoin(ways, "; ").c_str());
  }
  return absl::OkStatus();
}

void PrintPlacement(const v1::Placement& p) {
  // A dry run's proposal has no version of its own (it read "version 0").
  std::printf(
      "placement %s, %s, imbalance %.3f\n", p.strategy().c_str(),
      p.applied() ? absl::StrCat("version ", p.version()).c_str() : "a proposal, not applied",
      p.imbalance());
  std::vector<std::vector<std::string>> rows;
  for (const v1::ExpertPlacement& e : p.experts()) {
    std::vector<std::string> where;
    for (int s : e.shards()) where.push_back(absl::StrCat(s));
    rows.push_back({absl::StrCat(e.expert()), absl::StrJoin(where, ","),
                    absl::StrFormat("%.1f", e.load())});
  }
  PrintTable({"expert", "shards", "load (tokens/batch)"}, rows, {1});
  std::printf("\n");
  rows.clear();
  for (int s = 0; s < p.shard_addresses_size(); ++s) {
    // A shard down, draining or drained takes no load: not an idle shard's 0.0.
    const bool out = s < p.shard_takes_load_size() && !p.shard_takes_load(s);
    const bool drains = s < p.shard_draining_size() && p.shard_draining(s);
    // A draining shard that holds an expert no shard taking load holds: the router still sends
    // that expert there, its last resort (`info` names them).
    bool last_resort = false;
    for (const v1::ExpertPlacement& e : p.experts()) {
      if (std::find(e.shards().begin(), e.shards().end(), s) == e.shards().end()) continue;
      last_resort = last_resort || std::none_of(e.shards().begin(), e.shards().end(), [&](int r) {
                      return r < p.shard_takes_load_size() && p.shard_takes_load(r);
                    });
    }
    rows.push_back({absl::StrCat(s), p.shard_addresses(s),
                    out && drains && last_resort ? "- (drains, still serving)"
                    : out && drains              ? "- (drains)"
                    : out                        ? "- (out of rotation)"
                    : s < p.shard_load_size()    ? absl::StrFormat("%.1f", p.shard_load(s))
                                                 : "-"});
  }
  PrintTable({"shard", "address", "expected load"}, rows);
  if (!p.refusal().empty()) {
    std::printf("\nthis proposal would be refused now: %s\n", p.refusal().c_str());
  }
}

absl::Status PlacementCmd(const Flags& f) {
  ASSIGN_OR_RETURN(std::string addr, f.Require("router"));
  if (f.Has("rebalance")) {
    // The router says the same; said here, it is a command-line mistake (exit 2).
    if (absl::Status known = router::ParseStrategy(f.Get("rebalance")).status(); !known.ok()) {
      return common::UsageError(absl::StrCat("--rebalance: ", known.message()));
    }
  }
  auto stub = MakeRouterStub(addr);
  v1::Placement p;
  // A rebalance to a strategy is idempotent: sent again, it finds the placement applied.
  const grpc::Status st = CallWithReconnects(absl::Seconds(300), [&](grpc::ClientContext* ctx) {
    if (f.Has("rebalance") || f.Has("dry-run")) {
      v1::RebalanceRequest req;
      req.set_strategy(f.Get("rebalance"));
      req.set_dry_run(f.Has("dry-run"));
      return stub->Rebalance(ctx, req, &p);
    }
    return stub->GetPlacement(ctx, v1::GetPlacementRequest(), &p);
  });
  if (!st.ok()) return RouterError(st, addr);
  PrintPlacement(p);
  // A dry run asks whether the switch would go through: a script's `--dry-run && --rebalance`
  // must not go on where it would not (why is printed under the table).
  if (!p.refusal().empty()) {
    return absl::FailedPreconditionError(
        "the router would refuse this rebalance (why is said above); nothing was applied");
  }
  return absl::OkStatus();
}

// A loss in the train table: fixed-point with `decimals` while that reads well, else
// scientific ("2.18694e+35", where a diverging model's loss was printed with 36 digits).
std::string LossText(double v, int decimals) {
  if (std::isfinite(v) && std::fabs(v) < 1e6) return absl::StrFormat("%.*f", decimals, v);
  return absl::StrFormat("%.*g", decimals, v);
}

absl::Status Train(const Flags& f) {
  ASSIGN_OR_RETURN(std::string addr, f.Require("router"));
  ASSIGN_OR_RETURN(int64_t steps, f.GetInt("steps", 10));
  ASSIGN_OR_RETURN(double lr, f.GetDouble("learning-rate", 0.01));
  ASSIGN_OR_RETURN(double aux, f.GetDouble("aux-loss-coef", 0.0));
  ASSIGN_OR_RETURN(double z, f.GetDouble("z-loss-coef", 0.0));
  ASSIGN_OR_RETURN(int64_t batch, f.GetInt("batch-size", 64));
  ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 1));
  RETURN_IF_ERROR(AtLeast(f, "steps", steps, 1));
  RETURN_IF_ERROR(AtLeast(f, "batch-size", batch, 1));
  if (lr < 0) return common::UsageError("--learning-rate must be >= 0");
  if (aux < 0) return common::UsageError("--aux-loss-coef must be >= 0");
  if (z < 0) return common::UsageError("--z-loss-coef must be >= 0");
  auto stub = MakeRouterStub(addr);
  ASSIGN_OR_RETURN(v1::ClusterInfo info, GetInfo(stub.get(), addr));
  // Training on from a gate that is not the one trained with the experts: said before any step.
  for (const std::string& w : info.warnings()) {
    std::fprintf(stderr, "moe-client train: WARNING: %s\n", w.c_str());
  }
  const int64_t d = info.d_model();
  std::vector<float> x, dy_fixed, target;
  const bool synthetic = f.Has("synthetic");
  if (synthetic && (f.Has("tokens") || f.Has("grad-output"))) {
    return common::UsageError("--synthetic makes its own batches: give it without --tokens and "
                              "--grad-output");
  }
  if (!synthetic && !(f.Has("tokens") && f.Has("grad-output"))) {
    return common::UsageError("train needs --synthetic, or --tokens and --grad-output");
  }
  // The router would refuse every step: said at once, where trying again would take a while.
  if (info.coordinator_state() == "unreachable") {
    return absl::UnavailableError(
        absl::StrCat("router ", addr, " cannot reach coordinator ", info.coordinator(),
                     ": no step was sent; check that the coordinator runs, and that the router's "
                     "--coordinator names it (moe-client info --router ",
                     addr, " shows when it answers)"));
  }
  // A step's request carries the tokens and their grad_output.
  // `remedy` ends the message when the router's cap is the limit.
  auto step_fits = [&](int64_t n, const std::string& remedy) {
    if (info.max_request_tokens() > 0 && n > info.max_request_tokens()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a training step of ", n, " tokens is more than router ", addr, " takes in one (",
          info.max_request_tokens(), ", its --max-batch-tokens): ", remedy));
    }
    return CheckRequestFits(2 * n, d,
                            absl::StrCat("a training step of ", n, " tokens of d_model ", d,
                                         " (sent with their grad_output)"));
  };
  if (synthetic) {
    // From --batch-size: a flag to change.
    if (absl::Status fits = step_fits(batch, "lower --batch-size"); !fits.ok()) {
      return common::UsageError(fits.message());
    }
    x = common::RandomMatrix(batch, d, seed);
    // A fixed random linear target T x, the layer regresses onto it.
    const std::vector<float> t = common::RandomMatrix(d, d, seed + 1);
    target.assign(batch * d, 0.f);
    for (int64_t i = 0; i < batch; ++i) {
      for (int64_t o = 0; o < d; ++o) {
        float acc = 0.f;
        for (int64_t j = 0; j < d; ++j) acc += t[o * d + j] * x[i * d + j];
        target[i * d + o] = acc / static_cast<float>(d);
      }
    }
  } else {
    ASSIGN_OR_RETURN(auto tok, ReadTokens(f.Get("tokens")));
    constexpr char kMaker[] = "moe-client make-tokens --name grad_output";
    ASSIGN_OR_RETURN(auto reader, HintIfMissing(common::SafetensorsReader::Open(f.Get("grad-output")),
                                                kMaker));
    if (reader->Find("grad_output") == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          f.Get("grad-output"), ": needs a tensor 'grad_output' [N, d_model] (make one with ",
          kMaker, ")"));
    }
    ASSIGN_OR_RETURN(dy_fixed, reader->ReadFloat("grad_output"));
    x = std::move(tok.first);
    const std::vector<int64_t> dy_shape = reader->Find("grad_output")->shape;
    if (tok.second == d && dy_shape.size() == 2 && dy_shape[1] == d &&
        dy_fixed.size() != x.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokens has ", static_cast<int64_t>(x.size()) / d, " rows and grad_output ", dy_shape[0],
          ": they need as many (one gradient row for each token's output)"));
    }
    if (tok.second != d || dy_fixed.size() != x.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokens and grad_output must both be [N, ", d, "] (the cluster's d_model), got tokens [",
          tok.second > 0 ? static_cast<int64_t>(x.size()) / tok.second : 0, ", ", tok.second,
          "] and grad_output [", absl::StrJoin(dy_shape, ", "), "]"));
    }
    batch = static_cast<int64_t>(x.size()) / d;
    RETURN_IF_ERROR(step_fits(batch, "split the files"));  // from files: files to split
  }
  // Ctrl-C ends the run between steps (a step in flight is finished: it changes the weights
  // all at once or not at all) and the table tells what was done.
  CatchInterrupt();
  Progress progress("train", steps);
  std::vector<std::vector<std::string>> rows;
  std::set<int> lost;  // experts the router said lost their training during the run
  auto lost_text = [](const std::string& experts) {
    return absl::StrCat("expert(s) ", experts,
                        " lost their training (every replica that held it went away or "
                        "restarted without it; the router's log says which): they train on "
                        "from the weights they hold now");
  };
  auto print_steps = [&](const std::string& preface) {
    progress.Finish();
    if (!preface.empty()) std::printf("%s\n", preface.c_str());
    PrintTable({"step", "loss", "load_balance_loss", "router_z_loss"}, rows);
    if (!lost.empty()) std::printf("%s\n", lost_text(absl::StrJoin(lost, ",")).c_str());
  };
  // A step refused (UNAVAILABLE: a shard out of rotation or not readable) or aborted (ABORTED:
  // a replica's reduction failed) changed no weight.
  auto not_taken = [](const grpc::Status& st) {
    return st.error_code() == grpc::StatusCode::UNAVAILABLE ||
           st.error_code() == grpc::StatusCode::ABORTED;
  };
  // A call refused while the cluster settles (a shard restarting, a step aborted, a router
  // catching up after it was granted its lease again, which takes up to 10 s) is sent again,
  // with a growing pause of up to 1 s, until 20 s have passed since the first attempt; saying so
  // at the first retry and then every 5 s at most (the reason's ids change every attempt).
  // Ctrl-C during a pause sends no further one.
  constexpr auto kRetryFor = std::chrono::seconds(20);
  constexpr auto kRetrySaidEvery = std::chrono::seconds(5);
  auto with_retries = [&](const std::string& what, auto retryable, auto call) {
    const auto give_up = std::chrono::steady_clock::now() + kRetryFor;
    auto said_at = std::chrono::steady_clock::now() - kRetrySaidEvery;  // the first is said
    grpc::Status st;
    for (int attempt = 1;; ++attempt) {
      st = call();
      const auto now = std::chrono::steady_clock::now();
      const auto resume = now + std::chrono::milliseconds(std::min(250 * attempt, 1000));
      if (!retryable(st) || resume >= give_up || interrupted.load()) return st;
      if (now - said_at >= kRetrySaidEvery) {
        said_at = now;
        progress.Note(absl::StrCat(what, " (", st.error_message(), "); trying again, attempt ",
                                   attempt + 1, " (retries stop ", kRetryFor.count(),
                                   " s after the first attempt)"));
      }
      while (!interrupted.load() && std::chrono::steady_clock::now() < resume) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (interrupted.load()) return st;
    }
  };
  for (int64_t s = 0; s < steps && !interrupted.load(); ++s) {
    std::vector<float> dy = dy_fixed;
    double loss = 0;
    if (synthetic) {
      v1::InferRequest req;
      common::EncodeTensor(x, {batch, d}, common::WireType::kFloat32, req.mutable_tokens());
      v1::InferResponse resp;
      // UNAVAILABLE: an expert has no replica in rotation now (its shard restarting).
      const grpc::Status st = with_retries(
          absl::StrCat("step ", s + 1, " of ", steps, ": the forward for the loss failed"),
          [](const grpc::Status& r) { return r.error_code() == grpc::StatusCode::UNAVAILABLE; },
          [&] {
            return CallWithReconnects(absl::Seconds(60), [&](grpc::ClientContext* ctx) {
              return stub->Infer(ctx, req, &resp);
            });
          });
      if (!st.ok() && interrupted.load()) break;  // the step was not begun
      if (!st.ok()) {
        if (!rows.empty()) print_steps("");
        absl::Status e = RouterError(st, addr);
        return absl::Status(e.code(), absl::StrCat("step ", s + 1, " of ", steps,
                                                   ": forward for the loss: ", e.message()));
      }
      ASSIGN_OR_RETURN(common::TensorView v, common::DecodeMatrix(resp.output(), "output", d));
      const absl::StatusOr<double> l = RegressionLoss(common::ViewToFloat(v), target, batch, &dy);
      if (interrupted.load()) break;  // Ctrl-C during the forward: no step begun
      if (!l.ok()) {
        // The cluster would refuse the step, and the run is over.
        if (!rows.empty()) print_steps("");
        return absl::Status(l.status().code(),
                            absl::StrCat("step ", s + 1, " of ", steps, ": ", l.status().message(),
                                         ": the model has diverged; no step was sent. Lower "
                                         "--learning-rate, and start again from a checkpoint "
                                         "saved before (moe-client save-checkpoint)"));
      }
      loss = *l;
    }
    v1::TrainStepRequest req;
    common::EncodeTensor(x, {batch, d}, common::WireType::kFloat32, req.mutable_tokens());
    common::EncodeTensor(dy, {batch, d}, common::WireType::kFloat32, req.mutable_grad_output());
    req.set_learning_rate(static_cast<float>(lr));
    req.set_aux_loss_coef(static_cast<float>(aux));
    req.set_z_loss_coef(static_cast<float>(z));
    v1::TrainStepResponse resp;
    const grpc::Status st =
        with_retries(absl::StrCat("step ", s + 1, " of ", steps, " not taken"), not_taken, [&] {
          grpc::ClientContext ctx;
          ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
          return stub->TrainStep(&ctx, req, &resp);
        });
    if (interrupted.load() && not_taken(st)) break;  // not tried again after Ctrl-C
    if (!st.ok()) {
      // The steps taken stay taken: their table first, then what stopped the run.
      if (!rows.empty()) print_steps("");
      absl::Status e = RouterError(st, addr);
      return absl::Status(e.code(),
                          absl::StrCat("step ", s + 1, " of ", steps, ": ",
                                       absl::StatusCodeToString(e.code()), ": ", e.message()));
    }
    if (resp.lost_training_experts_size() > 0) {
      lost.insert(resp.lost_training_experts().begin(), resp.lost_training_experts().end());
      progress.Note(absl::StrCat("before step ", s + 1, " of ", steps, ": ",
                                 lost_text(absl::StrJoin(resp.lost_training_experts(), ","))));
    }
    rows.push_back({absl::StrCat(resp.step()), synthetic ? LossText(loss, 6) : "-",
                    LossText(resp.stats().load_balance_loss(), 5),
                    LossText(resp.stats().router_z_loss(), 4)});
    progress.Update(s + 1, synthetic ? absl::StrCat("loss ", LossText(loss, 5)) : "");
  }
  const int64_t taken = static_cast<int64_t>(rows.size());
  if (interrupted.load() && taken < steps) {
    print_steps(absl::StrCat("interrupted after ", taken, " of ", steps,
                             " steps: the table covers the steps taken"));
    EndByInterrupt();
  }
  print_steps("");
  return absl::OkStatus();
}

absl::Status SaveCheckpointCmd(const Flags& f) {
  ASSIGN_OR_RETURN(std::string addr, f.Require("router"));
  ASSIGN_OR_RETURN(std::string path, f.Require("path"));
  auto stub = MakeRouterStub(addr);
  v1::SaveCheckpointRequest req;
  req.set_path(path);
  v1::SaveCheckpointResponse resp;
  const grpc::Status st = CallWithReconnects(absl::Seconds(300), [&](grpc::ClientContext* ctx) {
    return stub->SaveCheckpoint(ctx, req, &resp);
  });
  if (!st.ok()) return RouterError(st, addr);
  // The router writes the file, and takes a relative path from its own working directory (in
  // the container image, the /data volume): its answer names the file whole.
  std::printf(
      "wrote %s (on the router's host%s) after step %llu; replicas identical: %s%s\n",
      resp.path().c_str(), !path.empty() && path[0] != '/' ? ", in its working directory" : "",
      static_cast<unsigned long long>(resp.step()),
      resp.replicas_identical() ? "yes" : "NO, divergent experts ",
      resp.replicas_identical() ? "" : absl::StrJoin(resp.divergent_experts(), ",").c_str());
  if (resp.lost_training_experts_size() > 0) {
    std::printf(
        "expert(s) %s lost their training (every replica that held it went away, or the "
        "cluster was started again on shards that do not hold it; the router's log "
        "says which): the checkpoint has them as they serve now, from the checkpoint's "
        "weights or an earlier step's\n",
        absl::StrJoin(resp.lost_training_experts(), ",").c_str());
  }
  if (resp.unread_replicas_size() > 0) {
    std::printf("%d replica(s) could not be read, and were not compared (the checkpoint has "
                "each of their experts from a replica that was):\n  %s\n",
                resp.unread_replicas_size(), absl::StrJoin(resp.unread_replicas(), "\n  ").c_str());
  }
  return absl::OkStatus();
}

// How long a `load` worker whose stream the router ended waits for the router to serve again.
constexpr auto kReconnectWait = std::chrono::seconds(30);
// How long `load` waits without an answer, once its run is over, for the answers still in
// flight: a router that stalls (stopped, or its host hung) answers none, and a stream has no
// deadline of its own. A slow router that still answers is waited for.
constexpr auto kDrainWait = std::chrono::seconds(10);
// No answer for this long ends a run early (`--requests N` would otherwise wait for a stalled
// router for good), unless --stall-s says otherwise: longer than the router's default deadline
// (--timeout-s 30), within which a router that serves answers every request, if only with an
// error.
constexpr int64_t kStallSeconds = 35;

// --zipf and --hot-order, as load and demo take them: the Zipf exponent, and which experts are
// popular (by rank: empty for by id, expert 0 the most; a shuffle seeded by K > 0; -1 the ids
// reversed). Checked as the command line's (exit 2).
absl::StatusOr<std::pair<double, std::vector<int>>> ZipfFlags(const Flags& f, int num_experts) {
  ASSIGN_OR_RETURN(double zipf, f.GetDouble("zipf", 0));
  ASSIGN_OR_RETURN(int64_t hot_order, f.GetInt("hot-order", 0));
  if (zipf < 0) {
    return common::UsageError(
        "--zipf must be >= 0 (0: uniform; --hot-order changes which experts are popular)");
  }
  if (f.Has("hot-order") && zipf == 0) {
    return common::UsageError(
        "--hot-order orders the Zipf law's popularity: give --zipf S (and --checkpoint) with it");
  }
  if (hot_order < -1) {
    return common::UsageError(absl::StrCat("--hot-order ", hot_order,
                                           ": use 0 (by id), K > 0 (a shuffle seeded by K) or -1 "
                                           "(reversed)"));
  }
  std::vector<int> order;
  if (hot_order != 0) {
    order.resize(num_experts);
    std::iota(order.begin(), order.end(), 0);
    if (hot_order == -1) {
      std::reverse(order.begin(), order.end());
    } else {
      std::shuffle(order.begin(), order.end(), std::mt19937_64(static_cast<uint64_t>(hot_order)));
    }
  }
  return std::make_pair(zipf, std::move(order));
}

absl::Status Load(const Flags& f) {
  ASSIGN_OR_RETURN(std::string addr, f.Require("router"));
  ASSIGN_OR_RETURN(int64_t concurrency, f.GetInt("concurrency", 4));
  ASSIGN_OR_RETURN(int64_t batch, f.GetInt("batch-size", 64));
  ASSIGN_OR_RETURN(double duration, f.GetDouble("duration", 10));
  ASSIGN_OR_RETURN(int64_t max_requests, f.GetInt("requests", 0));
  // Checked before the router is asked; the order again below with the cluster's expert count.
  RETURN_IF_ERROR(ZipfFlags(f, 0).status());
  ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 1));
  ASSIGN_OR_RETURN(int64_t window, f.GetInt("window", 2));
  ASSIGN_OR_RETURN(int64_t stall_s, f.GetInt("stall-s", kStallSeconds));
  if (stall_s < 1 || stall_s > 86400) {
    return common::UsageError(absl::StrCat("--stall-s ", stall_s, ": give 1 to 86400 seconds"));
  }
  const auto stall_wait = std::chrono::seconds(stall_s);
  RETURN_IF_ERROR(AtLeast(f, "concurrency", concurrency, 1));
  if (concurrency > 1024) {
    // A thread and a stream each.
    return common::UsageError(absl::StrCat(
        "--concurrency must be at most 1024 (a thread and a stream each), got ", concurrency));
  }
  RETURN_IF_ERROR(AtLeast(f, "batch-size", batch, 1));
  RETURN_IF_ERROR(AtLeast(f, "window", window, 1));
  RETURN_IF_ERROR(AtLeast(f, "requests", max_requests, 1));
  if (duration <= 0) return common::UsageError("--duration must be > 0 seconds");
  // --requests alone runs until they are answered; with --duration, whichever comes first.
  if (f.Has("requests") && !f.Has("duration")) duration = 1e7;
  const std::shared_ptr<grpc::Channel> channel = MakeRouterChannel(addr);
  auto stub = v1::Router::NewStub(channel);
  ASSIGN_OR_RETURN(v1::ClusterInfo info, GetInfo(stub.get(), addr));
  ASSIGN_OR_RETURN(const auto zipf_order, ZipfFlags(f, info.num_experts()));
  const double zipf = zipf_order.first;
  const std::vector<int>& order = zipf_order.second;
  const int d = info.d_model();
  if (absl::Status fits =
          CheckRequestFits(batch, d, absl::StrCat("--batch-size ", batch, " of d_model ", d));
      !fits.ok()) {
    return common::UsageError(fits.message());
  }
  if (info.max_request_tokens() > 0 && batch > info.max_request_tokens()) {
    // Every request would be refused RESOURCE_EXHAUSTED, for the whole run.
    return common::UsageError(
        absl::StrCat("--batch-size ", batch, " is over the router's limit of ",
                     info.max_request_tokens(), " tokens a request (its --max-batch-tokens)"));
  }
  common::GateWeights gate;
  if (f.Has("checkpoint")) {
    common::LoadOptions lo;
    lo.experts = std::vector<int>{};
    lo.tensor_prefix = f.Get("tensor-prefix");
    ASSIGN_OR_RETURN(common::Checkpoint ck, ReadCheckpoint(f.Get("checkpoint"), lo));
    if (ck.config.num_experts != info.num_experts() || ck.config.d_model != d) {
      return absl::InvalidArgumentError(absl::StrCat(
          f.Get("checkpoint"), " has ", ck.config.num_experts, " experts of d_model ",
          ck.config.d_model, ", the cluster at ", addr, " ", info.num_experts(),
          " of d_model ", d, ": give the checkpoint the cluster was started with"));
    }
    gate = std::move(ck.gate);
  } else if (zipf > 0) {
    return common::UsageError("--zipf needs --checkpoint (the gate decides the routing)");
  }
  if (f.Has("checkpoint") && !f.Has("zipf")) {
    return common::UsageError(
        "--checkpoint is read for --zipf S only (its gate routes the Zipf-drawn tokens): give "
        "--zipf S (0: every expert equally popular), or leave --checkpoint out for random "
        "tokens");
  }
  // Ctrl-C stops sending; what is in flight is answered and the table covers the run so far.
  CatchInterrupt();
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + std::chrono::milliseconds(static_cast<int64_t>(duration * 1000));
  std::mutex mu;
  std::vector<double> latencies;
  std::map<std::string, int64_t> codes;
  std::map<std::string, std::string> first_error;  // by code
  std::atomic<int64_t> issued{0}, tokens_ok{0}, completed{0}, reopened{0}, failed{0},
      dropped{0};
  std::atomic<int> workers_done{0}, reconnecting{0};
  std::atomic<bool> gave_up{false};  // a worker's router did not serve again within the wait
  // The run ended while a worker still waited for the router to serve again: from when (since
  // start) the first such worker's stream ended; -1 when none did.
  std::atomic<int64_t> unserved_since_ms{-1};
  std::atomic<bool> ended{false};    // no answer for stall_wait: workers send no more
  // Each worker's open stream, so that answers still missing kDrainWait after the run can be
  // given up (TryCancel); `cancelled` tells a stream opened after that to end at once.
  std::mutex streams_mu;
  std::vector<grpc::ClientContext*> streams(static_cast<size_t>(concurrency), nullptr);
  bool cancelled = false;
  std::atomic<int64_t> last_answer_ms{0};  // since start: the progress line tells a stall
  auto last_answer = [&] { return start + std::chrono::milliseconds(last_answer_ms.load()); };
  auto worker = [&](int w) {
    std::unique_ptr<ZipfTokens> gen;
    if (!gate.weight.empty()) {
      gen = std::make_unique<ZipfTokens>(gate, info.num_experts(), d, zipf, seed * 1000 + w,
                                         order, info.top_k());
    }
    std::mt19937_64 rng(seed * 7919 + w);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    auto more = [&] {
      return !interrupted.load() && !ended.load() && std::chrono::steady_clock::now() < end &&
             (max_requests == 0 || issued.load() < max_requests);
    };
    // A stream that the router ends with UNAVAILABLE while the run has time left (the router
    // restarted, or shut down with another behind its address) is opened again once the
    // router can be reached, so that the load keeps its concurrency through the outage. What
    // was in flight on it counts as failed, with the router's message. Any other ending (a
    // wrong token, ...) would end every new stream alike: the worker stops.
    std::chrono::milliseconds backoff(0);
    // The worker's channel: the shared one until its first outage, then the one that found the
    // router serving again. Each probe is a new channel: after a router restart a channel
    // whose connection attempt was refused hung about 2 s in the TCP handshake of its next
    // ones, where a new channel connected at once.
    std::unique_ptr<v1::Router::Stub> own_stub;
    while (true) {
      grpc::ClientContext ctx;
      {
        std::lock_guard<std::mutex> lock(streams_mu);
        if (cancelled) break;
        streams[static_cast<size_t>(w)] = &ctx;
      }
      auto stream = (own_stub ? own_stub : stub)->InferStream(&ctx);
      std::deque<std::chrono::steady_clock::time_point> sent;
      int64_t answered = 0;
      bool open = true;
      while (open) {
        while (static_cast<int64_t>(sent.size()) < window && more()) {
          if (max_requests > 0 && issued.fetch_add(1) >= max_requests) break;
          if (max_requests == 0) issued.fetch_add(1);
          v1::InferRequest req;
          std::vector<float> x;
          if (gen) {
            x = gen->Next(batch);
          } else {
            x.resize(static_cast<size_t>(batch * d));
            for (float& v : x) v = u(rng);
          }
          common::EncodeTensor(x, {batch, d}, common::WireType::kFloat32, req.mutable_tokens());
          sent.push_back(std::chrono::steady_clock::now());
          if (!stream->Write(req)) {
            open = false;
            break;
          }
        }
        if (sent.empty()) break;
        v1::InferResponse resp;
        if (!stream->Read(&resp)) break;
        ++answered;
        last_answer_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::steady_clock::now() - start)
                             .count();
        const double lat = std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                         sent.front()).count();
        sent.pop_front();
        std::lock_guard<std::mutex> lock(mu);
        const std::string code =
            absl::StatusCodeToString(static_cast<absl::StatusCode>(resp.code()));
        ++codes[code];
        if (resp.code() != 0) {
          first_error.emplace(code, resp.message());
          ++failed;
        }
        if (resp.code() == 0) {
          latencies.push_back(lat);
          tokens_ok += batch;
          dropped += resp.stats().dropped_assignments();
        }
        ++completed;
      }
      stream->WritesDone();
      grpc::Status st = stream->Finish();
      bool given_up = false;
      {
        std::lock_guard<std::mutex> lock(streams_mu);
        streams[static_cast<size_t>(w)] = nullptr;
        given_up = cancelled;
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        const std::string lost = absl::StatusCodeToString(
            static_cast<absl::StatusCode>(st.ok() ? 14 : st.error_code()));
        for (size_t i = 0; i < sent.size(); ++i) ++codes[lost];
        completed += static_cast<int64_t>(sent.size());
        failed += static_cast<int64_t>(sent.size());
        if (!sent.empty()) {
          first_error.emplace(
              lost, given_up ? absl::StrFormat("no answer for %lld s once the run was over: given up",
                                               static_cast<long long>(kDrainWait.count()))
                    : st.ok() ? "the stream ended before the answer"
                              : st.error_message());
        }
      }
      if (st.error_code() != grpc::StatusCode::UNAVAILABLE || !more()) break;
      // A stream that answered nothing waits longer each time (100 ms, doubled up to 1 s), so
      // that a router that takes streams and ends them at once is not hammered.
      backoff = answered > 0 ? std::chrono::milliseconds(0)
                             : std::min(std::chrono::milliseconds(1000),
                                        std::max(std::chrono::milliseconds(100), 2 * backoff));
      ++reconnecting;
      const auto stream_ended = std::chrono::steady_clock::now();
      const auto resume = stream_ended + backoff;
      while (more() && std::chrono::steady_clock::now() < resume) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      // Until the router serves again (its health check says SERVING: a restarted router
      // listens before its placement is live, and would answer every request UNAVAILABLE
      // until then), asked every 100 ms or so that the end of the run and Ctrl-C are not kept
      // waiting. A router not serving within kReconnectWait ends the worker: with --requests
      // alone the run would otherwise wait for it for good.
      const auto give_up = std::chrono::steady_clock::now() + kReconnectWait;
      // Whether the router serves, on a new channel (kept for the next stream when it does).
      auto probe_serving = [&] {
        std::shared_ptr<grpc::Channel> probe = MakeRouterChannel(addr);
        absl::StatusOr<common::HealthState> h =
            common::CheckHealth(probe.get(), absl::Milliseconds(250));
        const bool yes = h.ok() && *h == common::HealthState::kServing;
        if (yes) own_stub = v1::Router::NewStub(std::move(probe));
        return yes;
      };
      bool serving = false;
      while (more() && !serving && std::chrono::steady_clock::now() < give_up) {
        serving = probe_serving();
        if (!serving) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      --reconnecting;
      if (!serving) {
        if (more()) {
          gave_up = true;
        } else if (!interrupted.load() && !probe_serving()) {
          // The run ended while this worker waited for the router, which one last look (the run
          // may have ended within the backoff, before any probe) finds still not serving.
          const int64_t ms =
              std::chrono::duration_cast<std::chrono::milliseconds>(stream_ended - start).count();
          int64_t was = unserved_since_ms.load();
          while ((was < 0 || ms < was) && !unserved_since_ms.compare_exchange_weak(was, ms)) {
          }
        }
        break;
      }
      if (!more()) break;
      ++reopened;
    }
    ++workers_done;
  };
  std::vector<std::thread> workers;
  for (int w = 0; w < concurrency; ++w) workers.emplace_back(worker, w);
  Progress progress("load", max_requests > 0 ? max_requests : static_cast<int64_t>(duration * 10));
  // Until the run is over (its duration, its requests sent, Ctrl-C, or every worker ended),
  // then until the answers in flight are in, unless none comes for kDrainWait.
  std::optional<std::chrono::steady_clock::time_point> over;
  std::chrono::steady_clock::time_point last_word;  // over, or the last answer after it
  bool drain_noted = false;
  bool stalled = false;  // no answer for stall_wait ended the run
  while (workers_done.load() < concurrency) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto now = std::chrono::steady_clock::now();
    const double el = std::chrono::duration<double>(now - start).count();
    const int64_t done = max_requests > 0 ? completed.load() : static_cast<int64_t>(el * 10);
    const double silent = std::chrono::duration<double>(now - last_answer()).count();
    progress.Update(done, absl::StrFormat("%.0f tokens/s%s%s", tokens_ok.load() / std::max(el, 1e-9),
                                          failed.load() > 0
                                              ? absl::StrCat(", ", failed.load(), " errors")
                                              : "",
                                          reconnecting.load() > 0
                                              ? ", stream ended: waiting for the router"
                                          : silent >= 5
                                              ? absl::StrFormat(", no answer for %.0f s", silent)
                                              : ""));
    // With --requests, over once all are answered (a slow router is waited for: a stalled one
    // is caught by stall_wait below).
    if (!over && (interrupted.load() || now >= end ||
                  (max_requests > 0 && completed.load() >= max_requests))) {
      over = now;
    }
    if (!over && reconnecting.load() == 0 &&
        now - last_answer() >= stall_wait) {
      over = now;
      stalled = true;
      ended = true;
      progress.Note(absl::StrFormat("no answer for %lld s: the run ends here",
                                    static_cast<long long>(stall_s)));
    }
    if (!over) continue;
    last_word = std::max(*over, last_answer());
    if (!drain_noted && now >= *over + std::chrono::seconds(1)) {
      drain_noted = true;
      progress.Note(absl::StrFormat(
          "the run is over; waiting for the answers in flight (given up after %lld s without one)",
          static_cast<long long>(kDrainWait.count())));
    }
    if (now >= last_word + kDrainWait) {
      std::lock_guard<std::mutex> lock(streams_mu);
      cancelled = true;
      for (grpc::ClientContext* c : streams) {
        if (c != nullptr) c->TryCancel();
      }
      break;
    }
  }
  for (auto& w : workers) w.join();
  progress.Finish();
  // Answers given up, or a run ended by silence or an outage: tokens/s without the silent wait.
  const bool unserved = unserved_since_ms.load() >= 0;
  const double elapsed =
      std::chrono::duration<double>((stalled || gave_up.load() || unserved ? last_answer()
                                     : cancelled                           ? last_word
                                                 : std::chrono::steady_clock::now()) -
                                    start)
          .count() +
      1e-9;  // no answer at all: a rate of 0, not 0/0
  signal(SIGINT, SIG_DFL);
  if (interrupted.load()) {
    std::printf("interrupted after %.1f s: the figures cover the requests sent until then\n",
                elapsed);
  }
  if (stalled) {
    std::printf("the router answered nothing for %lld s, so the run ended early: the figures "
                "cover the requests sent until then\n",
                static_cast<long long>(stall_s));
  }
  if (cancelled) {
    std::printf("answers still missing after %lld s without one, once the run was over, were "
                "given up (counted as CANCELLED): is the router stalled?\n",
                static_cast<long long>(kDrainWait.count()));
  }
  if (gave_up.load()) {
    std::printf("the router ended a stream and did not serve again within %lld s: the figures "
                "cover the requests sent until then\n",
                static_cast<long long>(kReconnectWait.count()));
  }
  // The run's time ran out while the router was away (a router stopped for good, or restarting
  // slowly): tokens/s above would otherwise count the outage as a quiet part of the run.
  // (Reaching its duration, the run is not "cut short"; its figures are short of it all the same.)
  const double ended_s =
      std::chrono::duration<double>(over.value_or(std::chrono::steady_clock::now()) - start)
          .count();
  const std::string unserved_for =
      unserved ? absl::StrFormat(
                     "stopped serving %.1f s into the run and was not serving when "
                     "the run ended, %.1f s in",
                     static_cast<double>(unserved_since_ms.load()) / 1000.0, ended_s)
               : "";
  if (unserved) {
    std::printf("the router %s: the figures cover the requests sent until then\n",
                unserved_for.c_str());
  }
  std::sort(latencies.begin(), latencies.end());
  auto pct = [&](double q) -> std::string {
    if (latencies.empty()) return "-";  // no request answered
    return absl::StrFormat(
        "%.2f", 1e3 * latencies[std::min(latencies.size() - 1,
                                         static_cast<size_t>(q * static_cast<double>(
                                                                     latencies.size())))]);
  };
  int64_t total = 0, errors = 0;
  for (const auto& [code, n] : codes) {
    total += n;
    if (code != "OK") errors += n;
  }
  std::vector<std::vector<std::string>> summary = {
      {"requests", absl::StrCat(total)},
      {"tokens/s", absl::StrFormat("%.0f", tokens_ok.load() / elapsed)},
      {"p50 latency (ms)", pct(0.50)},
      {"p95 latency (ms)", pct(0.95)},
      {"p99 latency (ms)", pct(0.99)},
      {"errors", absl::StrCat(errors)}};
  // Only when they happened: assignments past the router's capacity factor (tokens that went
  // to fewer experts), and streams the router ended (UNAVAILABLE) that load opened again.
  if (dropped.load() > 0) {
    summary.push_back({"dropped assignments", absl::StrCat(dropped.load())});
  }
  if (reopened.load() > 0) summary.push_back({"streams reopened", absl::StrCat(reopened.load())});
  PrintTable({"metric", "value"}, summary);
  std::printf("\n");
  // With errors, the first message of each code: enough to tell what went wrong.
  std::vector<std::vector<std::string>> rows;
  for (const auto& [code, n] : codes) {
    rows.push_back({code, absl::StrCat(n)});
    if (!first_error.empty()) rows.back().push_back(first_error[code]);
  }
  if (first_error.empty()) {
    PrintTable({"code", "requests"}, rows);
  } else {
    PrintTable({"code", "requests", "first error"}, rows);
  }
  if (interrupted.load()) EndByInterrupt();
  // Some errors are what a load test is run to see (a shard killed under load); none answered
  // is a broken setup, and a run the router cut short is no result: a script should not take
  // either for one.
  if (stalled || gave_up.load()) {
    return absl::UnavailableError(absl::StrCat(
        "the run was cut short: the router ",
        stalled ? absl::StrCat("answered nothing for ", stall_s, " s")
                : absl::StrCat("did not serve again within ", kReconnectWait.count(), " s"),
        " (the table covers the requests until then)"));
  }
  if (unserved) {
    return absl::UnavailableError(
        absl::StrCat("the router ", unserved_for, " (the table covers the requests until then)"));
  }
  if (errors == total) {
    return absl::UnavailableError(
        total == 0 ? std::string("no request completed")
                   : absl::StrCat("all ", total, " requests failed (the table above gives the "
                                  "first error of each code)"));
  }
  return absl::OkStatus();
}

absl::Status Demo(const Flags& f) {
  ASSIGN_OR_RETURN(int64_t batches, f.GetInt("batches", 20));
  ASSIGN_OR_RETURN(int64_t n, f.GetInt("batch-size", 256));
  if (batches < 1 || n < 1) return common::UsageError("--batches and --batch-size must be >= 1");
  RETURN_IF_ERROR(ZipfFlags(f, 0).status());
  ASSIGN_OR_RETURN(auto layer, LoadLayer(f));
  const common::ModelConfig& c = layer->config();
  ASSIGN_OR_RETURN(const auto zipf_order, ZipfFlags(f, c.num_experts));
  std::printf("in-process MoE layer: %d experts, d_model %d, d_ff %d, top-%d, %s%s\n",
              c.num_experts, c.d_model, c.d_ff, c.top_k,
              std::string(common::ActivationName(c.activation)).c_str(), c.gated ? ", gated" : "");
  // With --zipf, the tokens `load --zipf` sends (its first worker's, at load's default --seed
  // 1): the in-process layer on the cluster's load, as bench/placement_bench.py compares them.
  std::unique_ptr<ZipfTokens> gen;
  if (f.Has("zipf")) {
    const router::GateParams g = layer->gate_params();
    common::GateWeights gate;
    gate.weight.assign(g.weight, g.weight + static_cast<int64_t>(c.num_experts) * c.d_model);
    gen = std::make_unique<ZipfTokens>(gate, c.num_experts, c.d_model, zipf_order.first, 1000,
                                       zipf_order.second, c.top_k);
  }
  std::vector<int64_t> load(c.num_experts, 0);
  Progress progress("forward", batches);
  std::vector<double> seconds;  // each batch's
  for (int64_t b = 0; b < batches; ++b) {
    std::vector<float> x = gen ? gen->Next(n) : common::RandomMatrix(n, c.d_model, 1000 + b);
    const auto start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(router::LayerOutput out, layer->Forward(x.data(), n));
    seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    for (int e = 0; e < c.num_experts; ++e) load[e] += out.gating.expert_load[e];
    progress.Update(b + 1, absl::StrFormat("%.0f tokens/s (this batch)", n / seconds.back()));
  }
  progress.Finish();
  const double total = static_cast<double>(batches * n * c.top_k);
  std::vector<std::vector<std::string>> rows;
  for (int e = 0; e < c.num_experts; ++e) {
    rows.push_back({absl::StrCat(e), absl::StrCat(load[e]),
                    absl::StrFormat("%.1f%%", 100.0 * load[e] / total)});
  }
  PrintTable({"expert", "assignments", "share"}, rows);
  // The median batch: the first ones pay for warming up (weights into cache, oneDNN's kernels
  // generated), which an average would spread over the run.
  const double first = seconds.front();
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];
  std::printf(
      "%lld batches of %lld tokens: %.0f tokens/s at the median batch's %.3f ms (the "
      "first, warming up, %.3f ms)\n",
      static_cast<long long>(batches), static_cast<long long>(n), n / median, 1e3 * median,
      1e3 * first);
  return absl::OkStatus();
}

// --router and --addr as gRPC targets (common::CheckTarget).
absl::Status CheckAddresses(const Flags& f) {
  for (const char* flag : {"router", "addr"}) {
    if (!f.Has(flag)) continue;
    RETURN_IF_ERROR(common::CheckTarget(
        flag, f.Get(flag),
        std::string(flag) == "router"
            ? "(moe-cluster prints the router's as READY router=HOST:PORT)"
            : "(moe-cluster prints each shard's as shard I addr=HOST:PORT)"));
  }
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  common::SetGrpcProcessDefaults();
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "help") {
    // `moe-client help COMMAND`: that command's lines.
    const std::string one = argc > 2 ? CommandHelp(argv[2]) : "";
    const bool version =
        argc > 2 && (std::string(argv[2]) == "version" || std::string(argv[2]) == "--version");
    if (argc > 2 && one.empty() && !version) {
      std::fprintf(stderr, "moe-client help: unknown command '%s' (run `moe-client help`)\n",
                   argv[2]);
      return 2;
    }
    std::fputs(one.empty() ? kUsage : one.c_str(), argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  if (cmd == "--version" || cmd == "version") {
    std::printf("moe-client %s\n", common::kVersion);
    return 0;
  }
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      const std::string one = CommandHelp(cmd);
      std::fputs(one.empty() ? kUsage : one.c_str(), stdout);
      return 0;
    }
  }
  struct Command {
    std::map<std::string, bool> flags;
    absl::Status (*run)(const Flags&);
  };
  const std::map<std::string, Command> commands = {
      {"init-checkpoint",
       {{{"out", true}, {"experts", true}, {"d-model", true}, {"d-ff", true}, {"top-k", true},
         {"activation", true}, {"gated", false}, {"bias", false}, {"seed", true},
         {"normalize-topk", true}, {"bf16", false}},
        InitCheckpoint}},
      {"make-tokens",
       {{{"out", true}, {"tokens", true}, {"d-model", true}, {"seed", true}, {"name", true}},
        MakeTokens}},
      {"forward",
       {{{"checkpoint", true}, {"input", true}, {"output", true}, {"local", false},
         {"router", true}, {"bf16", false}, {"tensor-prefix", true}, {"capacity-factor", true}},
        Forward}},
      {"infer",
       {{{"checkpoint", true}, {"input", true}, {"output", true}, {"local", false},
         {"router", true}, {"bf16", false}, {"tensor-prefix", true}, {"capacity-factor", true}},
        Forward}},
      {"info", {{{"router", true}}, Info}},
      {"health", {{{"addr", true}, {"timeout-ms", true}}, Health}},
      {"drain", {{{"addr", true}, {"timeout-ms", true}, {"undo", false}}, DrainCmd}},
      {"train",
       {{{"router", true}, {"steps", true}, {"learning-rate", true}, {"aux-loss-coef", true},
         {"z-loss-coef", true}, {"tokens", true}, {"grad-output", true}, {"synthetic", false},
         {"batch-size", true}, {"seed", true}},
        Train}},
      {"save-checkpoint", {{{"router", true}, {"path", true}}, SaveCheckpointCmd}},
      {"placement", {{{"router", true}, {"rebalance", true}, {"dry-run", false}}, PlacementCmd}},
      {"load",
       {{{"router", true}, {"checkpoint", true}, {"tensor-prefix", true}, {"zipf", true},
         {"hot-order", true}, {"concurrency", true}, {"batch-size", true}, {"duration", true},
         {"requests", true}, {"seed", true}, {"window", true}, {"stall-s", true}},
        Load}},
      {"demo",
       {{{"checkpoint", true}, {"batches", true}, {"batch-size", true}, {"tensor-prefix", true},
         {"capacity-factor", true}, {"zipf", true}, {"hot-order", true}},
        Demo}},
  };
  auto it = commands.find(cmd);
  if (it == commands.end()) {
    std::fprintf(stderr, "moe-client: unknown command '%s' (run `moe-client help`)\n", cmd.c_str());
    return 2;
  }
  std::map<std::string, bool> known = common::WithTlsFlags(it->second.flags);
  known["auth-token-file"] = true;
  absl::StatusOr<Flags> flags = Flags::Parse(argc, argv, 2, known);
  if (!flags.ok()) {
    std::fprintf(stderr, "moe-client %s: %s (run `moe-client help %s`)\n", cmd.c_str(),
                 std::string(flags.status().message()).c_str(), cmd.c_str());
    return 2;
  }
  absl::Status st = CheckAddresses(*flags);
  if (st.ok()) st = common::ConfigureTlsFromFlags(*flags);
  if (st.ok() && flags->Has("auth-token-file")) {
    absl::StatusOr<std::string> token = common::ReadTokenFile(flags->Get("auth-token-file"));
    st = token.status();
    if (token.ok()) SetAuthToken(*token);
  }
  if (st.ok()) st = it->second.run(*flags);
  if (!st.ok()) {
    // A bad command line (as from Flags::Parse above) exits 2 and points to the command's help.
    const bool usage_error = common::IsUsageError(st);
    std::fprintf(stderr, "moe-client %s: %s%s\n", cmd.c_str(), std::string(st.message()).c_str(),
                 usage_error ? absl::StrCat(" (run `moe-client help ", cmd, "`)").c_str() : "");
    return usage_error ? 2 : 1;
  }
  return 0;
}

}  // namespace
}  // namespace moe::client

int main(int argc, char** argv) { return moe::client::Main(argc, argv); }
