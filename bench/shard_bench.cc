// Rows/s through one expert-shard server on loopback against the in-process kernel on the same
// rows with the same thread count (1), at R rows per batch. The client keeps 8 batches in flight
// on one Dispatch stream.

#include <omp.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <thread>

#include <benchmark/benchmark.h>

#include "expert_server/shard_server.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "services/common/random_checkpoint.h"
#include "services/common/tensor_codec.h"

namespace {

moe::common::ModelConfig Config() {
  moe::common::ModelConfig c;
  c.num_experts = 1;
  c.d_model = 512;
  c.d_ff = 2048;
  c.top_k = 1;
  c.activation = moe::common::Activation::kSilu;
  c.gated = true;
  return c;
}

const moe::common::Checkpoint& Checkpoint() {
  static const auto* ck = new moe::common::Checkpoint(moe::common::MakeRandomCheckpoint({Config(), false, 1}));
  return *ck;
}

void BM_InProcess(benchmark::State& state) {
  omp_set_num_threads(1);
  auto ffn = moe::expert::ExpertFfn::Create(Config(), Checkpoint().experts[0]);
  const int64_t rows = state.range(0);
  const auto x = moe::common::RandomMatrix(rows, 512, 1);
  std::vector<float> y(rows * 512);
  for (auto _ : state) {
    if (!(*ffn)->Forward(x.data(), rows, y.data()).ok()) state.SkipWithError("forward");
  }
  state.counters["rows_per_s"] = benchmark::Counter(static_cast<double>(rows),
                                                    benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Shard(benchmark::State& state) {
  const std::string path = "/tmp/moe_shard_bench_" + std::to_string(getpid()) + ".safetensors";
  if (!moe::common::SaveCheckpoint(path, Checkpoint()).ok()) state.SkipWithError("checkpoint");
  moe::expert::ShardServerOptions o;
  o.checkpoint = path;
  o.pool.threads = 1;
  auto server = moe::expert::ShardServer::Start(o);
  if (!server.ok() || !(*server)->WaitUntilLoaded(absl::Seconds(60)).ok()) {
    state.SkipWithError("server");
    std::remove(path.c_str());
    return;
  }
  auto channel = grpc::CreateCustomChannel((*server)->address(), grpc::InsecureChannelCredentials(),
                                           moe::common::ClientChannelArgs());
  auto stub = moe::v1::ExpertShard::NewStub(channel);
  grpc::ClientContext ctx;
  auto stream = stub->Dispatch(&ctx);
  const int64_t rows = state.range(0);
  moe::v1::DispatchRequest req;
  moe::common::EncodeTensor(moe::common::RandomMatrix(rows, 512, 1), {rows, 512},
                            moe::common::WireType::kFloat32, req.mutable_rows());
  auto* er = req.add_experts();
  er->set_expert(0);
  for (int i = 0; i < rows; ++i) er->add_rows(i);
  constexpr int kWindow = 8;
  int64_t sent = 0, received = 0;
  moe::v1::DispatchResponse resp;
  for (auto _ : state) {
    while (sent - received < kWindow) {
      req.set_batch_id(sent++);
      stream->Write(req);
    }
    if (!stream->Read(&resp) || resp.code() != 0) state.SkipWithError("dispatch failed");
    ++received;
  }
  stream->WritesDone();
  while (received < sent && stream->Read(&resp)) ++received;
  stream->Finish();
  state.counters["rows_per_s"] = benchmark::Counter(static_cast<double>(rows),
                                                    benchmark::Counter::kIsIterationInvariantRate);
  (*server)->Shutdown();
  std::remove(path.c_str());
}

}  // namespace

BENCHMARK(BM_InProcess)->Arg(1)->Arg(16)->Arg(256)->ArgName("rows")->MinTime(1.0)->UseRealTime();
BENCHMARK(BM_Shard)->Arg(1)->Arg(16)->Arg(256)->ArgName("rows")->MinTime(1.0)->UseRealTime();

BENCHMARK_MAIN();
