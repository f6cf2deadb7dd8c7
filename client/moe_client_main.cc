// moe-client: the command-line tool for moe-cluster. Run without arguments for usage.

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli_util.h"
#include "router/moe_layer.h"
#include "services/common/checkpoint.h"
#include "services/common/flags.h"
#include "services/common/random_checkpoint.h"
#include "services/common/safetensors.h"
#include "services/common/status_macros.h"

namespace moe::client {
namespace {

using common::Flags;

constexpr char kUsage[] = R"(moe-client: talk to a moe-cluster, or run the MoE layer in process.

usage: moe-client COMMAND [flags]

commands:
  init-checkpoint --out PATH --experts E --d-model D --d-ff F --top-k K
                  [--activation relu|gelu|silu] [--gated] [--bias] [--seed S]
                  [--normalize-topk true|false] [--bf16]
      write a seeded random checkpoint (safetensors, Mixtral tensor names)
  make-tokens --out PATH --tokens N --d-model D [--seed S]
      write a random tokens [N, D] file for `forward`
  forward --checkpoint PATH --input IN.safetensors --output OUT.safetensors --local
          [--tensor-prefix P] [--capacity-factor C]
      run the layer on tensor `tokens` [N, d_model]; writes `output`, `expert_ids`, `weights`
  demo --checkpoint PATH [--batches B] [--batch-size N] [--tensor-prefix P]
      run the in-process layer on random batches; print tokens/s and per-expert load
)";

absl::Status InitCheckpoint(const Flags& f) {
  common::RandomCheckpointSpec spec;
  ASSIGN_OR_RETURN(std::string out, f.Require("out"));
  ASSIGN_OR_RETURN(int64_t experts, f.GetInt("experts", 0));
  ASSIGN_OR_RETURN(int64_t d_model, f.GetInt("d-model", 0));
  ASSIGN_OR_RETURN(int64_t d_ff, f.GetInt("d-ff", 0));
  ASSIGN_OR_RETURN(int64_t top_k, f.GetInt("top-k", 0));
  ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 1));
  if (experts < 1 || experts > 4096) return absl::InvalidArgumentError("--experts must be in [1, 4096]");
  if (d_model < 1 || d_model > 65536) return absl::InvalidArgumentError("--d-model must be in [1, 65536]");
  if (d_ff < 1 || d_ff > 262144) return absl::InvalidArgumentError("--d-ff must be in [1, 262144]");
  if (top_k < 1 || top_k > experts) {
    return absl::InvalidArgumentError(absl::StrCat("--top-k must be in [1, ", experts, "]"));
  }
  ASSIGN_OR_RETURN(spec.config.activation, common::ParseActivation(f.Get("activation", "silu")));
  const std::string norm = f.Get("normalize-topk", "true");
  if (norm != "true" && norm != "false") {
    return absl::InvalidArgumentError("--normalize-topk must be true or false");
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
  ASSIGN_OR_RETURN(int64_t n, f.GetInt("tokens", 0));
  ASSIGN_OR_RETURN(int64_t d, f.GetInt("d-model", 0));
  ASSIGN_OR_RETURN(int64_t seed, f.GetInt("seed", 7));
  if (n < 1 || d < 1 || n * d > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("--tokens and --d-model must be positive (and not huge)");
  }
  common::SafetensorsWriter w;
  RETURN_IF_ERROR(w.AddF32("tokens", {n, d}, common::RandomMatrix(n, d, seed)));
  RETURN_IF_ERROR(w.Write(out));
  std::printf("wrote %s: tokens [%lld, %lld]\n", out.c_str(), static_cast<long long>(n),
              static_cast<long long>(d));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<router::MoeLayer>> LoadLayer(const Flags& f) {
  ASSIGN_OR_RETURN(std::string path, f.Require("checkpoint"));
  ASSIGN_OR_RETURN(double cf, f.GetDouble("capacity-factor", 0.0));
  common::LoadOptions opts;
  opts.tensor_prefix = f.Get("tensor-prefix");
  ASSIGN_OR_RETURN(common::Checkpoint ck, common::LoadCheckpoint(path, opts));
  return router::MoeLayer::Create(std::move(ck), router::MoeLayerOptions{cf});
}

absl::Status Forward(const Flags& f) {
  if (!f.Has("local")) {
    return absl::InvalidArgumentError(
        "forward needs --local (the in-process layer); --router comes with the router");
  }
  ASSIGN_OR_RETURN(std::string in_path, f.Require("input"));
  ASSIGN_OR_RETURN(std::string out_path, f.Require("output"));
  ASSIGN_OR_RETURN(auto layer, LoadLayer(f));
  const common::ModelConfig& c = layer->config();
  ASSIGN_OR_RETURN(auto reader, common::SafetensorsReader::Open(in_path));
  const common::StTensor* t = reader->Find("tokens");
  if (t == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(in_path, ": no tensor named 'tokens'"));
  }
  if (t->shape.size() != 2 || t->shape[1] != c.d_model) {
    return absl::InvalidArgumentError(absl::StrCat(in_path, ": 'tokens' must be [N, ", c.d_model,
                                                   "] for this checkpoint"));
  }
  ASSIGN_OR_RETURN(std::vector<float> x, reader->ReadFloat("tokens"));
  const int64_t n = t->shape[0];
  ASSIGN_OR_RETURN(router::LayerOutput out, layer->Forward(x.data(), n));
  common::SafetensorsWriter w;
  RETURN_IF_ERROR(w.AddF32("output", {n, c.d_model}, out.y));
  RETURN_IF_ERROR(w.AddI32("expert_ids", {n, c.top_k}, out.gating.expert_ids));
  RETURN_IF_ERROR(w.AddF32("weights", {n, c.top_k}, out.gating.weights));
  RETURN_IF_ERROR(w.Write(out_path));
  std::printf("wrote %s: output [%lld, %d], expert_ids and weights [%lld, %d]; %lld dropped\n",
              out_path.c_str(), static_cast<long long>(n), c.d_model, static_cast<long long>(n),
              c.top_k, static_cast<long long>(out.gating.dropped));
  return absl::OkStatus();
}

absl::Status Demo(const Flags& f) {
  ASSIGN_OR_RETURN(int64_t batches, f.GetInt("batches", 20));
  ASSIGN_OR_RETURN(int64_t n, f.GetInt("batch-size", 256));
  if (batches < 1 || n < 1) return absl::InvalidArgumentError("--batches and --batch-size must be >= 1");
  ASSIGN_OR_RETURN(auto layer, LoadLayer(f));
  const common::ModelConfig& c = layer->config();
  std::printf("in-process MoE layer: %d experts, d_model %d, d_ff %d, top-%d, %s%s\n",
              c.num_experts, c.d_model, c.d_ff, c.top_k,
              std::string(common::ActivationName(c.activation)).c_str(), c.gated ? ", gated" : "");
  std::vector<int64_t> load(c.num_experts, 0);
  Progress progress("forward", batches);
  double seconds = 0;
  for (int64_t b = 0; b < batches; ++b) {
    std::vector<float> x = common::RandomMatrix(n, c.d_model, 1000 + b);
    const auto start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(router::LayerOutput out, layer->Forward(x.data(), n));
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (int e = 0; e < c.num_experts; ++e) load[e] += out.gating.expert_load[e];
    progress.Update(b + 1, absl::StrFormat("%.0f tokens/s", (b + 1) * n / seconds));
  }
  progress.Finish();
  const double total = static_cast<double>(batches * n * c.top_k);
  std::vector<std::vector<std::string>> rows;
  for (int e = 0; e < c.num_experts; ++e) {
    rows.push_back({absl::StrCat(e), absl::StrCat(load[e]),
                    absl::StrFormat("%.1f%%", 100.0 * load[e] / total)});
  }
  PrintTable({"expert", "assignments", "share"}, rows);
  std::printf("%lld batches of %lld tokens: %.0f tokens/s (%.3f ms per batch)\n",
              static_cast<long long>(batches), static_cast<long long>(n),
              batches * n / seconds, 1e3 * seconds / batches);
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "help") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
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
      {"make-tokens", {{{"out", true}, {"tokens", true}, {"d-model", true}, {"seed", true}}, MakeTokens}},
      {"forward",
       {{{"checkpoint", true}, {"input", true}, {"output", true}, {"local", false},
         {"tensor-prefix", true}, {"capacity-factor", true}},
        Forward}},
      {"demo",
       {{{"checkpoint", true}, {"batches", true}, {"batch-size", true}, {"tensor-prefix", true},
         {"capacity-factor", true}},
        Demo}},
  };
  auto it = commands.find(cmd);
  if (it == commands.end()) {
    std::fprintf(stderr, "moe-client: unknown command '%s' (run `moe-client help`)\n", cmd.c_str());
    return 2;
  }
  absl::StatusOr<Flags> flags = Flags::Parse(argc, argv, 2, it->second.flags);
  if (!flags.ok()) {
    std::fprintf(stderr, "moe-client %s: %s (run `moe-client help`)\n", cmd.c_str(),
                 std::string(flags.status().message()).c_str());
    return 2;
  }
  absl::Status st = it->second.run(*flags);
  if (!st.ok()) {
    std::fprintf(stderr, "moe-client %s: %s\n", cmd.c_str(), std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace moe::client

int main(int argc, char** argv) { return moe::client::Main(argc, argv); }
