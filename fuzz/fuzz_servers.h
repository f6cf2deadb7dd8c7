#ifndef MOE_FUZZ_FUZZ_SERVERS_H_
#define MOE_FUZZ_FUZZ_SERVERS_H_

// In-process servers for the RPC fuzzers: a small checkpoint, two expert shards and a router on
// loopback, started once per fuzzer process and kept for its life.

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "expert_server/shard_server.h"
#include "router/router_server.h"
#include "services/common/checkpoint.h"
#include "services/common/random_checkpoint.h"

namespace moe::fuzz {

inline common::ModelConfig FuzzConfig() {
  common::ModelConfig c;
  c.num_experts = 4;
  c.d_model = 8;
  c.d_ff = 16;
  c.top_k = 2;
  c.activation = common::Activation::kGelu;
  c.gated = true;
  return c;
}

inline void Die(const char* what, const absl::Status& st) {
  std::fprintf(stderr, "fuzz set-up: %s: %s\n", what, std::string(st.message()).c_str());
  std::abort();
}

inline const std::string& FuzzCheckpoint() {
  static const std::string* path = [] {
    auto* p = new std::string("/tmp/moe_fuzz_" + std::to_string(getpid()) + ".safetensors");
    absl::Status st = common::SaveCheckpoint(*p, common::MakeRandomCheckpoint({FuzzConfig(), true, 7}));
    if (!st.ok()) Die("checkpoint", st);
    // libFuzzer ends a timed run with exit(); by then `path` is set.
    std::atexit([] { std::remove(FuzzCheckpoint().c_str()); });
    return p;
  }();
  return *path;
}

inline expert::ShardServer* StartShard() {
  expert::ShardServerOptions o;
  o.checkpoint = FuzzCheckpoint();
  o.max_batch_rows = 4096;
  auto s = expert::ShardServer::Start(o);
  if (!s.ok()) Die("shard", s.status());
  absl::Status loaded = (*s)->WaitUntilLoaded(absl::Seconds(60));
  if (!loaded.ok()) Die("shard load", loaded);
  return s->release();  // lives as long as the process
}

inline router::RouterServer* StartRouter(const std::vector<std::string>& shards) {
  router::RouterServerOptions o;
  o.checkpoint = FuzzCheckpoint();
  o.shards = shards;
  o.max_batch_tokens = 2048;
  o.worker_threads = 4;
  auto r = router::RouterServer::Start(o);
  if (!r.ok()) Die("router", r.status());
  absl::Status ready = (*r)->WaitUntilReady(absl::Seconds(60));
  if (!ready.ok()) Die("router ready", ready);
  return r->release();
}

}  // namespace moe::fuzz

#endif  // MOE_FUZZ_FUZZ_SERVERS_H_
