// The cluster (router + 4 shards on loopback, 1 compute thread each) against the in-process
// MoeLayer (OpenMP threads = this machine's cores) on the same checkpoint: tokens/s at N tokens
// per request, and the latency the cluster adds at N = 1 in units of a bare gRPC unary round
// trip to the same router (GetClusterInfo), all measured in this run. Prints one JSON object.

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "client/local_cluster.h"
#include "client/router_client.h"
#include "expert_server/expert_ffn.h"
#include "router/moe_layer.h"
#include "services/common/random_checkpoint.h"
#include "services/common/tensor_codec.h"

namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 2.0;
  moe::common::ModelConfig c;
  c.num_experts = 16;
  c.d_model = 512;
  c.d_ff = 2048;
  c.top_k = 2;
  c.activation = moe::common::Activation::kSilu;
  c.gated = true;
  const auto ck = moe::common::MakeRandomCheckpoint({c, false, 1});
  const std::string path = "/tmp/moe_cluster_bench_" + std::to_string(getpid()) + ".safetensors";
  if (!moe::common::SaveCheckpoint(path, ck).ok()) return 1;
  const std::vector<int64_t> sizes = {1, 16, 256, 1024};
  const int cores = static_cast<int>(std::thread::hardware_concurrency());

  // In process.
  omp_set_num_threads(cores);
  auto layer = moe::router::MoeLayer::Create(ck).value();
  std::vector<double> local_tps;
  double local_p50_n1 = 0;
  for (int64_t n : sizes) {
    const auto x = moe::common::RandomMatrix(n, c.d_model, n);
    (void)layer->Forward(x.data(), n);
    std::vector<double> lat;
    const auto start = Clock::now();
    while (Since(start) < seconds) {
      const auto t = Clock::now();
      (void)layer->Forward(x.data(), n);
      lat.push_back(Since(t));
    }
    local_tps.push_back(static_cast<double>(n * lat.size()) / Since(start));
    if (n == 1) local_p50_n1 = Median(lat);
    std::fprintf(stderr, "in-process N=%lld: %.0f tokens/s\n", static_cast<long long>(n),
                 local_tps.back());
  }

  // One expert's forward of 1 row on 1 thread, back to back and a while after the previous one:
  // how much slower it gets once its 12 MiB of weights have had time to leave the cache (a
  // shard computes its expert once per request at N = 1).
  omp_set_num_threads(1);
  std::vector<std::pair<int, double>> by_gap;
  {
    auto ffn = moe::expert::ExpertFfn::Create(c, ck.experts[0]).value();
    std::vector<float> x(c.d_model, 0.1f), y(c.d_model);
    for (int gap_us : {0, 1000, 5000}) {
      std::vector<double> lat;
      for (int i = 0; i < 200; ++i) {
        if (gap_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(gap_us));
        const auto t = Clock::now();
        (void)ffn->Forward(x.data(), 1, y.data());
        lat.push_back(Since(t));
      }
      by_gap.emplace_back(gap_us, Median(lat));
      std::fprintf(stderr, "one expert, 1 row, %d us after the previous: %.0f us\n", gap_us,
                   Median(lat) * 1e6);
    }
  }
  omp_set_num_threads(cores);

  // The cluster.
  moe::client::LocalClusterOptions o;
  o.checkpoint = path;
  o.shards = 4;
  o.placement = "hybrid";
  auto cluster = moe::client::LocalCluster::Start(o);
  if (!cluster.ok()) {
    std::fprintf(stderr, "cluster_bench: %s\n", std::string(cluster.status().message()).c_str());
    return 1;
  }
  auto stub = moe::client::MakeRouterStub((*cluster)->router_address());
  // Bare unary round trip to the router.
  std::vector<double> bare;
  for (int i = 0; i < 400; ++i) {
    grpc::ClientContext ctx;
    moe::v1::ClusterInfo info;
    const auto t = Clock::now();
    stub->GetClusterInfo(&ctx, moe::v1::GetClusterInfoRequest(), &info);
    if (i >= 50) bare.push_back(Since(t));
  }
  std::vector<double> cluster_tps;
  double cluster_p50_n1 = 0;
  for (int64_t n : sizes) {
    moe::v1::InferRequest req;
    moe::common::EncodeTensor(moe::common::RandomMatrix(n, c.d_model, n), {n, c.d_model},
                              moe::common::WireType::kFloat32, req.mutable_tokens());
    if (n == 1) {
      std::vector<double> lat;
      const auto start = Clock::now();
      while (Since(start) < seconds) {
        grpc::ClientContext ctx;
        moe::v1::InferResponse resp;
        const auto t = Clock::now();
        if (!stub->Infer(&ctx, req, &resp).ok()) return 1;
        lat.push_back(Since(t));
      }
      cluster_p50_n1 = Median(lat);
    }
    // Throughput: a window of requests in flight on one stream.
    const int window = n >= 256 ? 4 : 16;
    grpc::ClientContext ctx;
    auto stream = stub->InferStream(&ctx);
    int64_t sent = 0, done = 0;
    moe::v1::InferResponse resp;
    const auto start = Clock::now();
    while (Since(start) < seconds) {
      while (sent - done < window) {
        stream->Write(req);
        ++sent;
      }
      if (!stream->Read(&resp) || resp.code() != 0) return 1;
      ++done;
    }
    const double el = Since(start);
    stream->WritesDone();
    while (done < sent && stream->Read(&resp)) ++done;
    stream->Finish();
    cluster_tps.push_back(static_cast<double>(n * (done - (sent - done))) / el);
    std::fprintf(stderr, "cluster N=%lld: %.0f tokens/s\n", static_cast<long long>(n),
                 cluster_tps.back());
  }
  if (const absl::Status st = (*cluster)->Stop(); !st.ok()) {
    std::fprintf(stderr, "cluster_bench: %s\n", std::string(st.message()).c_str());
  }
  std::string rows;
  for (size_t i = 0; i < sizes.size(); ++i) {
    rows += absl::StrCat(i ? ", " : "", "{\"N\": ", sizes[i], ", \"in_process_tokens_per_s\": ",
                         local_tps[i], ", \"cluster_tokens_per_s\": ", cluster_tps[i],
                         ", \"ratio\": ", cluster_tps[i] / local_tps[i], "}");
  }
  const double bare_p50 = Median(bare);
  std::string gaps;
  for (const auto& [gap_us, p50] : by_gap) {
    gaps += absl::StrCat(gaps.empty() ? "" : ", ", "{\"gap_us\": ", gap_us, ", \"p50_s\": ", p50, "}");
  }
  std::printf(
      "{\"shards\": 4, \"shard_threads\": 1, \"in_process_threads\": %d, \"throughput\": [%s], "
      "\"latency_n1\": {\"cluster_p50_s\": %g, \"in_process_p50_s\": %g, \"bare_rtt_p50_s\": %g, "
      "\"added_in_round_trips\": %g, \"expert_forward_1row_by_gap\": [%s]}}\n",
      cores, rows.c_str(), cluster_p50_n1, local_p50_n1, bare_p50,
      (cluster_p50_n1 - local_p50_n1) / bare_p50, gaps.c_str());
  return 0;
}
