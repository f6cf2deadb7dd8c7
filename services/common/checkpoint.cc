#include "services/common/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/common/bf16.h"
#include "services/common/status_macros.h"
#include "services/common/tensor_codec.h"

namespace moe::common {
namespace {

using Shape = std::vector<int64_t>;

// Reads an optional tensor: empty when absent, an error when present with another shape.
absl::StatusOr<std::vector<float>> ReadOptional(const SafetensorsReader& reader,
                                                const std::string& name, const Shape& shape) {
  if (reader.Find(name) == nullptr) return std::vector<float>{};
  return reader.ReadFloat(name, &shape);
}

// INVALID_ARGUMENT naming tensor `name` of `reader` when `v` holds a NaN or an infinity: a
// model's weights are finite, and one that is not answers NaN for every token that reaches it.
absl::Status CheckFinite(const SafetensorsReader& reader, const std::string& name,
                         const std::vector<float>& v) {
  const int64_t i = FirstNonFinite(v);
  if (i < 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(reader.origin(), ": tensor '", name, "' holds ",
                   std::isnan(v[i]) ? "NaN" : "an infinity", " (at flat index ", i,
                   "): the weights are corrupt, or were saved from a model that "
                   "diverged"));
}

absl::Status CheckSize(const std::vector<float>& v, size_t expected, absl::string_view what,
                       bool optional) {
  if (optional && v.empty()) return absl::OkStatus();
  if (v.size() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", v.size(), " values, expected ", expected));
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view ActivationName(Activation a) {
  switch (a) {
    case Activation::kRelu: return "relu";
    case Activation::kGelu: return "gelu";
    case Activation::kSilu: return "silu";
  }
  return "?";
}

absl::StatusOr<Activation> ParseActivation(absl::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu") return Activation::kSilu;
  return absl::InvalidArgumentError(
      absl::StrCat("activation '", name, "' is not one of relu, gelu, silu"));
}

std::string ExpertTensorName(absl::string_view prefix, int expert, absl::string_view suffix) {
  return absl::StrCat(prefix, "experts.", expert, ".", suffix);
}

absl::StatusOr<ModelConfig> ReadModelConfig(const SafetensorsReader& reader,
                                            const LoadOptions& options) {
  const std::string& p = options.tensor_prefix;
  const std::string& origin = reader.origin();
  ModelConfig c;
  const std::string gate_name = p + "gate.weight";
  const StTensor* gate = reader.Find(gate_name);
  if (gate == nullptr) {
    // Whether the file holds a gate under another prefix (then say which), or none at all (then
    // it is not an MoE checkpoint: a tokens file, another model's weights).
    std::vector<std::string> prefixes;
    for (const StTensor& t : reader.tensors()) {
      // "gate.weight" itself, or under a prefix ending in '.' ("mlp.shared_expert_gate.weight"
      // is another model's tensor, not an MoE gate).
      if (t.name == "gate.weight" || absl::EndsWith(t.name, ".gate.weight")) {
        prefixes.push_back(t.name.substr(0, t.name.size() - std::string("gate.weight").size()));
      }
    }
    std::string hint;
    if (!prefixes.empty() && prefixes[0].empty()) {
      hint = "; it has 'gate.weight': leave --tensor-prefix out";
    } else if (!prefixes.empty()) {
      hint = absl::StrCat("; it has '", prefixes[0], "gate.weight': give --tensor-prefix '",
                          prefixes[0], "'", prefixes.size() > 1 ? " (or another layer's)" : "");
    } else {
      hint = absl::StrCat("; it holds no gate under any prefix, so it is not an MoE checkpoint (",
                          reader.DescribeTensors(), ")");
    }
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ": tensor '", gate_name, "' is missing", hint));
  }
  if (gate->shape.size() != 2 || gate->shape[0] <= 0 || gate->shape[1] <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": tensor '", gate_name,
                                                   "' must be [E, d_model], got [",
                                                   absl::StrJoin(gate->shape, ", "), "]"));
  }
  const std::string w1_name = ExpertTensorName(p, 0, "w1.weight");
  const StTensor* w1 = reader.Find(w1_name);
  if (w1 == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": tensor '", w1_name, "' is missing"));
  }
  if (w1->shape.size() != 2 || w1->shape[0] <= 0 || w1->shape[1] != gate->shape[1]) {
    return absl::InvalidArgumentError(absl::StrCat(
        origin, ": tensor '", w1_name, "' must be [d_ff, d_model] with d_model ",
        gate->shape[1], " from '", gate_name, "', got [", absl::StrJoin(w1->shape, ", "), "]"));
  }
  constexpr int64_t kMaxDim = 1 << 20;
  if (gate->shape[0] > 4096 || gate->shape[1] > kMaxDim || w1->shape[0] > kMaxDim) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": dimensions too large"));
  }
  c.num_experts = static_cast<int>(gate->shape[0]);
  c.d_model = static_cast<int>(gate->shape[1]);
  c.d_ff = static_cast<int>(w1->shape[0]);
  c.gated = reader.Find(ExpertTensorName(p, 0, "w3.weight")) != nullptr;

  const auto& meta = reader.metadata();
  c.activation = Activation::kSilu;
  if (auto it = meta.find("activation"); it != meta.end()) {
    auto a = ParseActivation(it->second);
    if (!a.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(origin, ": metadata ", a.status().message()));
    }
    c.activation = *a;
  }
  c.top_k = 2;
  if (auto it = meta.find("top_k"); it != meta.end()) {
    if (!absl::SimpleAtoi(it->second, &c.top_k)) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ": metadata top_k '", it->second, "' is not an integer"));
    }
  }
  c.normalize_topk = true;
  if (auto it = meta.find("normalize_topk"); it != meta.end()) {
    if (it->second == "true") c.normalize_topk = true;
    else if (it->second == "false") c.normalize_topk = false;
    else {
      return absl::InvalidArgumentError(absl::StrCat(
          origin, ": metadata normalize_topk '", it->second, "' must be true or false"));
    }
  }
  if (options.activation) c.activation = *options.activation;
  if (options.top_k) c.top_k = *options.top_k;
  if (options.normalize_topk) c.normalize_topk = *options.normalize_topk;
  if (c.top_k < 1 || c.top_k > c.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": top_k ", c.top_k,
                                                   " must be in [1, ", c.num_experts, "]"));
  }
  return c;
}

absl::StatusOr<ExpertWeights> ReadExpert(const SafetensorsReader& reader, absl::string_view prefix,
                                         const ModelConfig& c, int e) {
  if (e < 0 || e >= c.num_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert ", e, " is out of range [0, ", c.num_experts, ")"));
  }
  const Shape up{c.d_ff, c.d_model}, down{c.d_model, c.d_ff}, bff{c.d_ff}, bdm{c.d_model};
  ExpertWeights w;
  auto name = [&](absl::string_view s) { return ExpertTensorName(prefix, e, s); };
  ASSIGN_OR_RETURN(w.w1, reader.ReadFloat(name("w1.weight"), &up));
  ASSIGN_OR_RETURN(w.w2, reader.ReadFloat(name("w2.weight"), &down));
  ASSIGN_OR_RETURN(w.b1, ReadOptional(reader, name("w1.bias"), bff));
  ASSIGN_OR_RETURN(w.b2, ReadOptional(reader, name("w2.bias"), bdm));
  if (c.gated) {
    ASSIGN_OR_RETURN(w.w3, reader.ReadFloat(name("w3.weight"), &up));
    ASSIGN_OR_RETURN(w.b3, ReadOptional(reader, name("w3.bias"), bff));
  } else if (reader.Find(name("w3.weight")) != nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        reader.origin(), ": tensor '", name("w3.weight"),
        "' is present but expert 0 has no w3: every expert must be gated or none"));
  }
  for (const auto& [tensor, v] : w.Tensors()) {
    RETURN_IF_ERROR(CheckFinite(reader, name(tensor), *v));
  }
  return w;
}

absl::StatusOr<Checkpoint> LoadCheckpoint(const SafetensorsReader& reader,
                                          const LoadOptions& options) {
  Checkpoint ck;
  ASSIGN_OR_RETURN(ck.config, ReadModelConfig(reader, options));
  const ModelConfig& c = ck.config;
  const std::string& p = options.tensor_prefix;
  const Shape gshape{c.num_experts, c.d_model}, gbias{c.num_experts};
  ASSIGN_OR_RETURN(ck.gate.weight, reader.ReadFloat(p + "gate.weight", &gshape));
  ASSIGN_OR_RETURN(ck.gate.bias, ReadOptional(reader, p + "gate.bias", gbias));
  RETURN_IF_ERROR(CheckFinite(reader, p + "gate.weight", ck.gate.weight));
  RETURN_IF_ERROR(CheckFinite(reader, p + "gate.bias", ck.gate.bias));
  ck.experts.resize(c.num_experts);
  std::vector<int> which;
  if (options.experts) {
    which = *options.experts;
  } else {
    for (int e = 0; e < c.num_experts; ++e) which.push_back(e);
  }
  for (int e : which) {
    ASSIGN_OR_RETURN(ck.experts[e], ReadExpert(reader, p, c, e));
  }
  return ck;
}

absl::StatusOr<Checkpoint> LoadCheckpoint(const std::string& path, const LoadOptions& options) {
  ASSIGN_OR_RETURN(auto reader, SafetensorsReader::Open(path));
  return LoadCheckpoint(*reader, options);
}

absl::Status ValidateExpert(const ModelConfig& c, const ExpertWeights& w) {
  const size_t up = static_cast<size_t>(c.d_ff) * c.d_model;
  RETURN_IF_ERROR(CheckSize(w.w1, up, "w1.weight", false));
  RETURN_IF_ERROR(CheckSize(w.w2, up, "w2.weight", false));
  RETURN_IF_ERROR(CheckSize(w.b1, c.d_ff, "w1.bias", true));
  RETURN_IF_ERROR(CheckSize(w.b2, c.d_model, "w2.bias", true));
  if (c.gated) {
    RETURN_IF_ERROR(CheckSize(w.w3, up, "w3.weight", false));
    RETURN_IF_ERROR(CheckSize(w.b3, c.d_ff, "w3.bias", true));
  } else if (!w.w3.empty() || !w.b3.empty()) {
    return absl::InvalidArgumentError("w3 given for a non-gated expert");
  }
  return absl::OkStatus();
}

namespace {

absl::Status AddExpert(SafetensorsWriter* w, const std::string& p, const ModelConfig& c, int e,
                       const ExpertWeights& x) {
  RETURN_IF_ERROR(ValidateExpert(c, x));
  auto n = [&](absl::string_view s) { return ExpertTensorName(p, e, s); };
  RETURN_IF_ERROR(w->AddF32(n("w1.weight"), {c.d_ff, c.d_model}, x.w1));
  RETURN_IF_ERROR(w->AddF32(n("w2.weight"), {c.d_model, c.d_ff}, x.w2));
  if (c.gated) RETURN_IF_ERROR(w->AddF32(n("w3.weight"), {c.d_ff, c.d_model}, x.w3));
  if (!x.b1.empty()) RETURN_IF_ERROR(w->AddF32(n("w1.bias"), {c.d_ff}, x.b1));
  if (!x.b2.empty()) RETURN_IF_ERROR(w->AddF32(n("w2.bias"), {c.d_model}, x.b2));
  if (!x.b3.empty()) RETURN_IF_ERROR(w->AddF32(n("w3.bias"), {c.d_ff}, x.b3));
  return absl::OkStatus();
}

}  // namespace

std::string Fingerprint(std::string_view bytes) {
  return absl::StrCat(bytes.size(), ":", std::hash<std::string_view>{}(bytes));
}

std::string GateFingerprint(const GateWeights& gate) {
  std::string bytes(reinterpret_cast<const char*>(gate.weight.data()),
                    gate.weight.size() * sizeof(float));
  bytes.append(reinterpret_cast<const char*>(gate.bias.data()), gate.bias.size() * sizeof(float));
  return Fingerprint(bytes);
}

absl::StatusOr<std::string> ModelFingerprint(const SafetensorsReader& reader,
                                             const ModelConfig& config, absl::string_view prefix) {
  std::string bytes = absl::StrCat(config.num_experts, ",", config.d_model, ",", config.d_ff, ",",
                                   config.gated, ",", ActivationName(config.activation), ";");
  auto append = [&](float v) { bytes.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  constexpr int64_t kRun = 16;
  for (int e = 0; e < config.num_experts; ++e) {
    for (const char* suffix :
         {"w1.weight", "w2.weight", "w3.weight", "w1.bias", "w2.bias", "w3.bias"}) {
      const StTensor* t = reader.Find(ExpertTensorName(prefix, e, suffix));
      if (t == nullptr) continue;
      if (t->dtype == StDType::kI32) {
        return absl::InvalidArgumentError(
            absl::StrCat(reader.origin(), ": tensor '", t->name, "' is I32, expected F32 or BF16"));
      }
      bytes.append(suffix);
      const int64_t n = t->num_elements;
      for (int64_t start : {int64_t{0}, n / 2, n - kRun}) {
        for (int64_t i = std::max<int64_t>(start, 0); i < std::min(n, start + kRun); ++i) {
          if (t->dtype == StDType::kF32) {
            float v;
            std::memcpy(&v, t->data + 4 * i, 4);
            append(v);
          } else {
            uint16_t h;
            std::memcpy(&h, t->data + 2 * i, 2);
            append(Bf16ToFloat(h));
          }
        }
      }
    }
  }
  // FNV-1a over the bytes: a hash of its own definition, as routers and shards of other builds
  // compare it (std::hash is the library's own). "mf1:" names this way of sampling and hashing:
  // another one is not compared (ServesModel).
  uint64_t h = 14695981039346656037ull;
  for (const char c : bytes) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ull;
  }
  return absl::StrCat(kModelFingerprintVersion, absl::Hex(h, absl::kZeroPad16));
}

absl::StatusOr<std::string> SerializeExpert(const ModelConfig& config, int expert,
                                            const ExpertWeights& weights) {
  SafetensorsWriter w;
  RETURN_IF_ERROR(AddExpert(&w, "", config, expert, weights));
  return w.Serialize();
}

absl::Status SaveExpert(const std::string& path, const ModelConfig& config, int expert,
                        const ExpertWeights& weights,
                        const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter w;
  for (const auto& [k, v] : metadata) w.SetMetadata(k, v);
  RETURN_IF_ERROR(AddExpert(&w, "", config, expert, weights));
  return w.Write(path);
}

absl::StatusOr<ExpertWeights> ParseExpert(absl::string_view bytes, const ModelConfig& config,
                                          int expert) {
  ASSIGN_OR_RETURN(auto reader, SafetensorsReader::Parse(bytes, "expert copy"));
  return ReadExpert(*reader, "", config, expert);
}

absl::Status SaveCheckpoint(const std::string& path, const Checkpoint& ck,
                            absl::string_view prefix) {
  const ModelConfig& c = ck.config;
  SafetensorsWriter w;
  w.SetMetadata("activation", std::string(ActivationName(c.activation)));
  w.SetMetadata("top_k", absl::StrCat(c.top_k));
  w.SetMetadata("normalize_topk", c.normalize_topk ? "true" : "false");
  w.SetMetadata("format", "pt");
  const std::string p(prefix);
  RETURN_IF_ERROR(w.AddF32(p + "gate.weight", {c.num_experts, c.d_model}, ck.gate.weight));
  if (!ck.gate.bias.empty()) RETURN_IF_ERROR(w.AddF32(p + "gate.bias", {c.num_experts}, ck.gate.bias));
  if (static_cast<int>(ck.experts.size()) != c.num_experts) {
    return absl::InvalidArgumentError("checkpoint must hold every expert to be saved");
  }
  for (int e = 0; e < c.num_experts; ++e) {
    RETURN_IF_ERROR(AddExpert(&w, p, c, e, ck.experts[e]));
  }
  return w.Write(path);
}

}  // namespace moe::common
