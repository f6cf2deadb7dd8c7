#include "services/common/checkpoint.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <limits>
#include <optional>

#include "services/common/random_checkpoint.h"
#include "tests/reference/test_util.h"

namespace moe::common {
namespace {

ModelConfig SmallConfig(bool gated) {
  ModelConfig c;
  c.num_experts = 4;
  c.d_model = 6;
  c.d_ff = 10;
  c.top_k = 2;
  c.activation = Activation::kGelu;
  c.normalize_topk = false;
  c.gated = gated;
  return c;
}

using ::moe::testing::TempPath;

TEST(Checkpoint, SaveLoadRoundTripGatedWithBias) {
  RandomCheckpointSpec spec{SmallConfig(true), /*bias=*/true, /*seed=*/3};
  const Checkpoint ck = MakeRandomCheckpoint(spec);
  const std::string path = TempPath("ck_gated.safetensors");
  ASSERT_TRUE(SaveCheckpoint(path, ck).ok());
  auto loaded = LoadCheckpoint(path, {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->config.num_experts, 4);
  EXPECT_EQ(loaded->config.d_model, 6);
  EXPECT_EQ(loaded->config.d_ff, 10);
  EXPECT_EQ(loaded->config.top_k, 2);
  EXPECT_EQ(loaded->config.activation, Activation::kGelu);
  EXPECT_FALSE(loaded->config.normalize_topk);
  EXPECT_TRUE(loaded->config.gated);
  EXPECT_EQ(loaded->gate.weight, ck.gate.weight);
  EXPECT_EQ(loaded->gate.bias, ck.gate.bias);
  for (int e = 0; e < 4; ++e) {
    EXPECT_EQ(loaded->experts[e].w1, ck.experts[e].w1);
    EXPECT_EQ(loaded->experts[e].w2, ck.experts[e].w2);
    EXPECT_EQ(loaded->experts[e].w3, ck.experts[e].w3);
    EXPECT_EQ(loaded->experts[e].b1, ck.experts[e].b1);
    EXPECT_EQ(loaded->experts[e].b2, ck.experts[e].b2);
    EXPECT_EQ(loaded->experts[e].b3, ck.experts[e].b3);
  }
  std::remove(path.c_str());
}

// The fingerprint of the experts' model: the same for the same experts (whatever the gate or
// tensor prefix), another for other weights, another d_ff, another activation.
TEST(Checkpoint, ModelFingerprintTellsTheExpertsApart) {
  auto print = [](const Checkpoint& ck, const std::string& prefix = "",
                  std::optional<Activation> activation = std::nullopt) -> std::string {
    const std::string path = TempPath("ck_print.safetensors");
    EXPECT_TRUE(SaveCheckpoint(path, ck, prefix).ok());
    auto reader = SafetensorsReader::Open(path);
    EXPECT_TRUE(reader.ok()) << reader.status();
    if (!reader.ok()) return "";
    LoadOptions lo;
    lo.tensor_prefix = prefix;
    lo.activation = activation;
    auto config = ReadModelConfig(**reader, lo);
    EXPECT_TRUE(config.ok()) << config.status();
    if (!config.ok()) return "";
    auto p = ModelFingerprint(**reader, *config, prefix);
    EXPECT_TRUE(p.ok()) << p.status();
    std::remove(path.c_str());
    return p.ok() ? *p : "";
  };
  const Checkpoint ck = MakeRandomCheckpoint({SmallConfig(true), true, 3});
  const std::string base = print(ck);
  ASSERT_FALSE(base.empty());
  EXPECT_EQ(print(ck), base);
  EXPECT_EQ(print(ck, "model.layers.0.block_sparse_moe."), base);
  Checkpoint other_gate = ck;
  other_gate.gate.weight[0] += 1;
  EXPECT_EQ(print(other_gate), base) << "the gate is the router's, not the experts'";
  EXPECT_NE(print(MakeRandomCheckpoint({SmallConfig(true), true, 4})), base);
  for (auto pick : {&ExpertWeights::w1, &ExpertWeights::w2, &ExpertWeights::w3, &ExpertWeights::b1,
                    &ExpertWeights::b2, &ExpertWeights::b3}) {
    Checkpoint trained = ck;
    std::vector<float>& w = trained.experts[3].*pick;
    w[w.size() / 2] += 0.5f;  // one value in the middle of one tensor of the last expert
    EXPECT_NE(print(trained), base);
  }
  EXPECT_NE(print(ck, "", Activation::kRelu), base);
  ModelConfig wider = SmallConfig(true);
  wider.d_ff = 12;
  EXPECT_NE(print(MakeRandomCheckpoint({wider, true, 3})), base);
  // Compared across builds and hosts: its value is fixed by its definition (FNV-1a of the
  // samples), not by the library's std::hash. Pinned on weights written out by hand.
  Checkpoint tiny;
  tiny.config.num_experts = 1;
  tiny.config.d_model = 2;
  tiny.config.d_ff = 2;
  tiny.config.top_k = 1;
  tiny.config.activation = Activation::kRelu;
  tiny.gate.weight = {0.5f, -0.5f};
  tiny.experts.resize(1);
  tiny.experts[0].w1 = {1, 2, 3, 4};
  tiny.experts[0].w2 = {5, 6, 7, 8};
  // The value from an independent computation (Python: struct.pack of the samples, FNV-1a).
  EXPECT_EQ(print(tiny), "mf1:541c17296fba8f73");
}

TEST(Checkpoint, NonGatedWithoutBiasAndPrefix) {
  RandomCheckpointSpec spec{SmallConfig(false), false, 5};
  const Checkpoint ck = MakeRandomCheckpoint(spec);
  const std::string path = TempPath("ck_prefix.safetensors");
  const std::string prefix = "model.layers.0.block_sparse_moe.";
  ASSERT_TRUE(SaveCheckpoint(path, ck, prefix).ok());
  auto no_prefix = LoadCheckpoint(path, {});
  EXPECT_EQ(no_prefix.status().code(), absl::StatusCode::kInvalidArgument);
  // The error gives the prefix the file's gate is under.
  EXPECT_NE(no_prefix.status().message().find(
                "'gate.weight' is missing; it has 'model.layers.0.block_sparse_moe.gate.weight': "
                "give --tensor-prefix 'model.layers.0.block_sparse_moe.'"),
            std::string::npos)
      << no_prefix.status();
  // One whose gate is at the root, read with a prefix, is told to leave the prefix out.
  const std::string root = TempPath("ck_root.safetensors");
  ASSERT_TRUE(SaveCheckpoint(root, ck).ok());
  LoadOptions wrong;
  wrong.tensor_prefix = "model.";
  auto rooted = LoadCheckpoint(root, wrong);
  EXPECT_NE(rooted.status().message().find(
                "'model.gate.weight' is missing; it has 'gate.weight': leave --tensor-prefix out"),
            std::string::npos)
      << rooted.status();
  // A file with no gate under any prefix (a tokens file given as the checkpoint) is told so.
  const std::string tokens = TempPath("ck_tokens.safetensors");
  SafetensorsWriter w;
  ASSERT_TRUE(w.AddF32("tokens", {2, 3}, std::vector<float>(6)).ok());
  ASSERT_TRUE(w.Write(tokens).ok());
  auto not_moe = LoadCheckpoint(tokens, {});
  EXPECT_EQ(not_moe.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(not_moe.status().message().find("'gate.weight' is missing; it holds no gate under "
                                            "any prefix, so it is not an MoE checkpoint (1 "
                                            "tensor: tokens)"),
            std::string::npos)
      << not_moe.status();
  LoadOptions opts;
  opts.tensor_prefix = prefix;
  auto loaded = LoadCheckpoint(path, opts);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_FALSE(loaded->config.gated);
  EXPECT_TRUE(loaded->gate.bias.empty());
  EXPECT_TRUE(loaded->experts[2].b1.empty());
  EXPECT_TRUE(loaded->experts[2].w3.empty());
  EXPECT_EQ(loaded->experts[2].w2, ck.experts[2].w2);
  std::remove(path.c_str());
}

TEST(Checkpoint, LoadsSubsetOfExperts) {
  const Checkpoint ck = MakeRandomCheckpoint({SmallConfig(false), false, 9});
  const std::string path = TempPath("ck_subset.safetensors");
  ASSERT_TRUE(SaveCheckpoint(path, ck).ok());
  LoadOptions opts;
  opts.experts = std::vector<int>{1, 3};
  auto loaded = LoadCheckpoint(path, opts);
  ASSERT_TRUE(loaded.ok());
  EXPECT_TRUE(loaded->experts[0].w1.empty());
  EXPECT_EQ(loaded->experts[1].w1, ck.experts[1].w1);
  EXPECT_EQ(loaded->experts[3].w2, ck.experts[3].w2);
  std::remove(path.c_str());
}

TEST(Checkpoint, Bf16TensorsLoadAsFloat) {
  const ModelConfig c = SmallConfig(false);
  const Checkpoint ck = MakeRandomCheckpoint({c, false, 2});
  SafetensorsWriter w;
  ASSERT_TRUE(w.AddBF16("gate.weight", {4, 6}, ck.gate.weight).ok());
  for (int e = 0; e < 4; ++e) {
    ASSERT_TRUE(w.AddBF16(ExpertTensorName("", e, "w1.weight"), {10, 6}, ck.experts[e].w1).ok());
    ASSERT_TRUE(w.AddF32(ExpertTensorName("", e, "w2.weight"), {6, 10}, ck.experts[e].w2).ok());
  }
  const std::string bytes = w.Serialize();  // the reader views these bytes
  auto r = SafetensorsReader::Parse(bytes, "bf16");
  ASSERT_TRUE(r.ok());
  auto loaded = LoadCheckpoint(**r, {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_NEAR(loaded->experts[1].w1[3], ck.experts[1].w1[3], 1e-2);
  EXPECT_EQ(loaded->config.activation, Activation::kSilu);  // default without metadata
  EXPECT_EQ(loaded->config.top_k, 2);
  EXPECT_TRUE(loaded->config.normalize_topk);
}

// Builds a file from `ck`'s tensors, letting `edit` change one before writing.
std::string Serialized(const Checkpoint& ck,
                       const std::function<void(SafetensorsWriter&)>& extra,
                       const std::string& skip = "", const std::string& activation = "relu",
                       const std::string& top_k = "2") {
  const ModelConfig& c = ck.config;
  SafetensorsWriter w;
  w.SetMetadata("activation", activation);
  w.SetMetadata("top_k", top_k);
  auto add = [&](const std::string& name, std::vector<int64_t> shape,
                 const std::vector<float>& v) {
    if (name != skip) {
      EXPECT_TRUE(w.AddF32(name, shape, v).ok()) << name;
    }
  };
  add("gate.weight", {c.num_experts, c.d_model}, ck.gate.weight);
  for (int e = 0; e < c.num_experts; ++e) {
    add(ExpertTensorName("", e, "w1.weight"), {c.d_ff, c.d_model}, ck.experts[e].w1);
    add(ExpertTensorName("", e, "w2.weight"), {c.d_model, c.d_ff}, ck.experts[e].w2);
  }
  if (extra) extra(w);
  return w.Serialize();
}

absl::Status LoadBytes(const std::string& bytes) {
  auto r = SafetensorsReader::Parse(bytes, "ck.safetensors");
  if (!r.ok()) return r.status();
  return LoadCheckpoint(**r, {}).status();
}

void ExpectError(const absl::Status& st, const std::string& needle) {
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find(needle), std::string::npos) << st;
}

TEST(Checkpoint, ErrorsNameTheTensor) {
  const Checkpoint ck = MakeRandomCheckpoint({SmallConfig(false), false, 1});
  EXPECT_TRUE(LoadBytes(Serialized(ck, nullptr)).ok());
  // A wrong shape for one expert's w2.
  const std::string w2 = ExpertTensorName("", 3, "w2.weight");
  auto edit = [&](SafetensorsWriter& w) {
    EXPECT_TRUE(w.AddF32("experts.3.w2.bias", {7}, std::vector<float>(7)).ok());
  };
  ExpectError(LoadBytes(Serialized(ck, edit)), "'experts.3.w2.bias' has shape [7], expected [6]");
  // A missing tensor.
  auto missing = LoadBytes(Serialized(ck, nullptr, w2));
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.message().find("'experts.3.w2.weight' is missing"), std::string::npos);
  // Gate and expert disagree on d_model.
  auto wide = [&](SafetensorsWriter& w) {
    EXPECT_TRUE(w.AddF32("gate.weight", {4, 7}, std::vector<float>(28)).ok());
  };
  ExpectError(LoadBytes(Serialized(ck, wide, "gate.weight")), "'experts.0.w1.weight' must be");
  // Gated experts must all be gated.
  auto w3 = [&](SafetensorsWriter& w) {
    EXPECT_TRUE(w.AddF32("experts.2.w3.weight", {10, 6}, std::vector<float>(60)).ok());
  };
  ExpectError(LoadBytes(Serialized(ck, w3)), "'experts.2.w3.weight' is present");
}

// Weights that are not finite are refused, naming the tensor and the first such value: served,
// every token reaching them would answer NaN. The same reader checks expert copies and a
// shard's --state-dir.
TEST(Checkpoint, WeightsThatAreNotFiniteAreRefused) {
  Checkpoint ck = MakeRandomCheckpoint({SmallConfig(false), false, 1});
  ck.experts[2].w2[5] = std::numeric_limits<float>::quiet_NaN();
  ExpectError(LoadBytes(Serialized(ck, nullptr)),
              ": tensor 'experts.2.w2.weight' holds NaN (at flat index 5): the weights are "
              "corrupt, or were saved from a model that diverged");
  ck = MakeRandomCheckpoint({SmallConfig(false), false, 1});
  ck.gate.weight[7] = -std::numeric_limits<float>::infinity();
  ExpectError(LoadBytes(Serialized(ck, nullptr)),
              ": tensor 'gate.weight' holds an infinity (at flat index 7)");
}

TEST(Checkpoint, BadMetadata) {
  const Checkpoint ck = MakeRandomCheckpoint({SmallConfig(false), false, 1});
  ExpectError(LoadBytes(Serialized(ck, nullptr, "", "tanh")), "activation 'tanh'");
  ExpectError(LoadBytes(Serialized(ck, nullptr, "", "relu", "x")), "top_k 'x'");
  ExpectError(LoadBytes(Serialized(ck, nullptr, "", "relu", "5")), "top_k 5 must be in [1, 4]");
}

TEST(Checkpoint, OptionsOverrideMetadata) {
  const Checkpoint ck = MakeRandomCheckpoint({SmallConfig(false), false, 1});
  const std::string bytes = Serialized(ck, nullptr);
  auto r = SafetensorsReader::Parse(bytes, "x");
  ASSERT_TRUE(r.ok());
  LoadOptions opts;
  opts.activation = Activation::kSilu;
  opts.top_k = 3;
  opts.normalize_topk = false;
  auto c = ReadModelConfig(**r, opts);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->activation, Activation::kSilu);
  EXPECT_EQ(c->top_k, 3);
  EXPECT_FALSE(c->normalize_topk);
}

TEST(Checkpoint, ValidateExpertChecksSizes) {
  const ModelConfig c = SmallConfig(true);
  ExpertWeights w = MakeRandomCheckpoint({c, true, 1}).experts[0];
  EXPECT_TRUE(ValidateExpert(c, w).ok());
  w.b3.pop_back();
  EXPECT_EQ(ValidateExpert(c, w).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moe::common
