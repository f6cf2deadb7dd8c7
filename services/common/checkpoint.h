#ifndef MOE_SERVICES_COMMON_CHECKPOINT_H_
#define MOE_SERVICES_COMMON_CHECKPOINT_H_

// The MoE layer's checkpoint (DESIGN.md "The model and its math"): Mixtral tensor names under an
// optional prefix, metadata for activation, top_k and normalize_topk.

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "services/common/safetensors.h"

namespace moe::common {

enum class Activation { kRelu, kGelu, kSilu };

absl::string_view ActivationName(Activation a);
absl::StatusOr<Activation> ParseActivation(absl::string_view name);

struct ModelConfig {
  int num_experts = 0;
  int d_model = 0;
  int d_ff = 0;
  int top_k = 0;
  Activation activation = Activation::kSilu;
  bool normalize_topk = true;
  bool gated = false;
};

// One expert's parameters, FP32 row-major in checkpoint layout. An empty bias is absent.
struct ExpertWeights {
  std::vector<float> w1;  // [d_ff, d_model]
  std::vector<float> w2;  // [d_model, d_ff]
  std::vector<float> w3;  // [d_ff, d_model], empty unless gated
  std::vector<float> b1;  // [d_ff]
  std::vector<float> b2;  // [d_model]
  std::vector<float> b3;  // [d_ff]

 private:
  template <typename Self>
  static auto TensorsOf(Self& w) {
    using V = std::remove_reference_t<decltype((w.w1))>;  // const for a const ExpertWeights
    return std::array<std::pair<const char*, V*>, 6>{{{"w1.weight", &w.w1},
                                                      {"w2.weight", &w.w2},
                                                      {"w3.weight", &w.w3},
                                                      {"w1.bias", &w.b1},
                                                      {"w2.bias", &w.b2},
                                                      {"w3.bias", &w.b3}}};
  }

 public:
  // The six tensors with their checkpoint names ("w1.weight" ... "w3.bias"), always in the order
  // w1, w2, w3, b1, b2, b3 (the gradient reduction fuses them in it): for code that treats each
  // tensor alike.
  auto Tensors() { return TensorsOf(*this); }
  auto Tensors() const { return TensorsOf(*this); }
};

struct GateWeights {
  std::vector<float> weight;  // [E, d_model]
  std::vector<float> bias;    // [E] or empty
};

struct Checkpoint {
  ModelConfig config;
  GateWeights gate;
  std::vector<ExpertWeights> experts;  // indexed by expert id; see LoadOptions::experts
};

// Overrides for metadata a checkpoint lacks (a real Mixtral file carries none).
struct LoadOptions {
  std::string tensor_prefix;
  // Which experts to read; nullopt reads all. Experts not read stay empty.
  std::optional<std::vector<int>> experts;
  std::optional<Activation> activation;
  std::optional<int> top_k;
  std::optional<bool> normalize_topk;
};

// The tensor name of `suffix` (e.g. "w1.weight") for expert `e`.
std::string ExpertTensorName(absl::string_view prefix, int expert, absl::string_view suffix);

// Reads the config: E from gate.weight, d_model, d_ff from experts.0.w1.weight, gated from
// experts.0.w3.weight, metadata (defaults: silu, top_k 2, normalize_topk true).
absl::StatusOr<ModelConfig> ReadModelConfig(const SafetensorsReader& reader,
                                            const LoadOptions& options);

// Reads one expert, checking every tensor's shape against `config`. Errors name the tensor.
absl::StatusOr<ExpertWeights> ReadExpert(const SafetensorsReader& reader, absl::string_view prefix,
                                         const ModelConfig& config, int expert);

absl::StatusOr<Checkpoint> LoadCheckpoint(const std::string& path, const LoadOptions& options);
absl::StatusOr<Checkpoint> LoadCheckpoint(const SafetensorsReader& reader,
                                          const LoadOptions& options);

// Writes `checkpoint` (all experts must be present) as F32 safetensors with metadata.
absl::Status SaveCheckpoint(const std::string& path, const Checkpoint& checkpoint,
                            absl::string_view tensor_prefix = "");

// One expert's weights as an in-memory safetensors file (checkpoint tensor names, F32), and
// back; ParseExpert checks every shape against `config`.
absl::StatusOr<std::string> SerializeExpert(const ModelConfig& config, int expert,
                                            const ExpertWeights& weights);
// The same written to `path` (SafetensorsWriter::Write: whole or not at all), with `metadata`.
absl::Status SaveExpert(const std::string& path, const ModelConfig& config, int expert,
                        const ExpertWeights& weights,
                        const std::map<std::string, std::string>& metadata);
absl::StatusOr<ExpertWeights> ParseExpert(absl::string_view bytes, const ModelConfig& config,
                                          int expert);

// A short fingerprint of some weights' bytes, "SIZE:HASH", kept beside state trained from a
// checkpoint so that state trained from another one is recognised (not cryptographic: it tells
// checkpoints apart, it does not defend against forgery). Stable across runs of one build.
std::string Fingerprint(std::string_view bytes);
// Fingerprint of the gate's weight then bias bytes.
std::string GateFingerprint(const GateWeights& gate);

// A fingerprint of the model the experts of a checkpoint compute: the config (E, d_model, d_ff,
// gated, activation) and, for every expert tensor, 16 values at each of its start, middle and
// end, read as FP32 (no full read of the weights: a shard serving a few experts of a large
// model does not read the others). The router compares its checkpoint's with each shard's
// (ShardStatus.model_fingerprint): a shard started from another model of the same shape (another
// seed, a saved training) computes other numbers, and is left out as incompatible.
// "mf1:" then 16 hex digits (FNV-1a of the samples): fingerprints of another version (prefix)
// are not compared.
inline constexpr absl::string_view kModelFingerprintVersion = "mf1:";
absl::StatusOr<std::string> ModelFingerprint(const SafetensorsReader& reader,
                                             const ModelConfig& config, absl::string_view prefix);
// Whether two fingerprints tell of other weights: both of this version, and different. An empty
// one (an older build) or one of another version tells nothing.
inline bool OtherWeights(absl::string_view a, absl::string_view b) {
  return a.substr(0, kModelFingerprintVersion.size()) == kModelFingerprintVersion &&
         b.substr(0, kModelFingerprintVersion.size()) == kModelFingerprintVersion && a != b;
}
// The Dispatch stream's metadata key that carries the router's ModelFingerprint: a shard of
// other weights refuses the stream's batches (FAILED_PRECONDITION), before any status read.
inline constexpr char kModelFingerprintKey[] = "moe-model-fingerprint";

// Checks internal consistency of sizes (used before building kernels from weights that did not
// come from a file, e.g. copied from a peer).
absl::Status ValidateExpert(const ModelConfig& config, const ExpertWeights& w);

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_CHECKPOINT_H_
