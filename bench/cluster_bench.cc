// The cluster (router + 4 shards on loopback, 1 compute thread each) against the in-process
// MoeLayer (OpenMP threads = this machine's cores) on the same checkpoint: tokens/s at N tokens
// per request, and the latency the cluster adds at N = 1 in units of a bare gRPC unary round
// trip to the same router (GetClusterInfo), all measured in this run. N = 1 is measured three
// ways, to tell its parts apart: one token repeated (the headline figure), a new token per
// request, and one token on a model of d_ff 32 whose experts cost next to nothing (what the
// cluster's own path adds). Prints one JSON object.

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <array>
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

// The p50 of fn(i) for i = 0, 1, ..., called back to back for `seconds`; -1 if fn fails.
template <typename Fn>
double P50For(double seconds, Fn fn) {
  std::vector<double> lat;
  const auto start = Clock::now();
  for (int64_t i = 0; Since(start) < seconds; ++i) {
    const auto t = Clock::now();
    if (!fn(i)) return -1;
    lat.push_back(Since(t));
  }
  return Median(lat);
}

// One Infer request per row of `x` [n, d].
std::vector<moe::v1::InferRequest> OneTokenRequests(const std::vector<float>& x, int64_t d) {
  std::vector<moe::v1::InferRequest> reqs(x.size() / d);
  for (size_t i = 0; i < reqs.size(); ++i) {
    moe::common::EncodeTensor(absl::MakeConstSpan(x.data() + i * d, d), {1, d},
                              moe::common::WireType::kFloat32, reqs[i].mutable_tokens());
  }
  return reqs;
}

// p50 of unary Infer calls through `stub`, request i % reqs.size() at call i; -1 on an error.
double InferP50(moe::v1::Router::Stub* stub, const std::vector<moe::v1::InferRequest>& reqs,
                double seconds) {
  return P50For(seconds, [&](int64_t i) {
    grpc::ClientContext ctx;
    moe::v1::InferResponse resp;
    return stub->Infer(&ctx, reqs[i % reqs.size()], &resp).ok();
  });
}

// p50 of a bare unary round trip to the router (GetClusterInfo), after 50 warm-up calls.
double BareRoundTrip(moe::v1::Router::Stub* stub) {
  std::vector<double> bare;
  for (int i = 0; i < 400; ++i) {
    grpc::ClientContext ctx;
    moe::v1::ClusterInfo info;
    const auto t = Clock::now();
    stub->GetClusterInfo(&ctx, moe::v1::GetClusterInfoRequest(), &info);
    if (i >= 50) bare.push_back(Since(t));
  }
  return Median(bare);
}

std::string SaveBenchCheckpoint(const moe::common::Checkpoint& ck, const std::string& name) {
  const std::string path =
      absl::StrCat("/tmp/moe_cluster_bench_", getpid(), "_", name, ".safetensors");
  return moe::common::SaveCheckpoint(path, ck).ok() ? path : "";
}

absl::StatusOr<std::unique_ptr<moe::client::LocalCluster>> StartCluster(const std::string& path) {
  moe::client::LocalClusterOptions o;
  o.checkpoint = path;
  o.shards = 4;
  o.placement = "hybrid";
  return moe::client::LocalCluster::Start(o);
}

// What N = 1 costs a cluster on a model whose experts compute next to nothing (d_ff 32, same
// d_model, experts and top-k as `c`): the path itself, against the in-process layer on the same
// model. {cluster p50, in-process p50, bare round trip p50}; all -1 on a failure.
std::array<double, 3> NegligibleComputeN1(moe::common::ModelConfig c, double seconds) {
  c.d_ff = 32;
  const auto ck = moe::common::MakeRandomCheckpoint({c, false, 2});
  const auto x = moe::common::RandomMatrix(1, c.d_model, 3);
  auto layer = moe::router::MoeLayer::Create(ck).value();
  const double local =
      P50For(seconds, [&](int64_t) { return layer->Forward(x.data(), 1).ok(); });
  const std::string path = SaveBenchCheckpoint(ck, "negligible");
  if (path.empty()) return {-1, -1, -1};
  auto cluster = StartCluster(path);
  if (!cluster.ok()) return {-1, -1, -1};
  auto stub = moe::client::MakeRouterStub((*cluster)->router_address());
  const double bare = BareRoundTrip(stub.get());
  const double remote = InferP50(stub.get(), OneTokenRequests(x, c.d_model), seconds);
  (void)(*cluster)->Stop();
  std::remove(path.c_str());
  return {remote, local, bare};
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
  const std::string path = SaveBenchCheckpoint(ck, "main");
  if (path.empty()) return 1;
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
  // N = 1 with a new token per request (cycling through kVaried), so each request's two experts
  // vary as in serving and are seldom still in cache; the loop above repeats one token, which
  // keeps its two experts' weights hot back to back (the in-process layer's best case).
  constexpr int64_t kVaried = 256;
  const auto varied = moe::common::RandomMatrix(kVaried, c.d_model, 7);
  const double local_p50_n1_varied = P50For(seconds, [&](int64_t i) {
    return layer->Forward(varied.data() + (i % kVaried) * c.d_model, 1).ok();
  });

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
  auto cluster = StartCluster(path);
  if (!cluster.ok()) {
    std::fprintf(stderr, "cluster_bench: %s\n", std::string(cluster.status().message()).c_str());
    return 1;
  }
  auto stub = moe::client::MakeRouterStub((*cluster)->router_address());
  const double bare_p50 = BareRoundTrip(stub.get());
  const double cluster_p50_n1_varied =
      InferP50(stub.get(), OneTokenRequests(varied, c.d_model), seconds);
  if (cluster_p50_n1_varied < 0) return 1;
  std::vector<double> cluster_tps;
  double cluster_p50_n1 = 0;
  for (int64_t n : sizes) {
    const auto x = moe::common::RandomMatrix(n, c.d_model, n);
    moe::v1::InferRequest req;
    moe::common::EncodeTensor(x, {n, c.d_model}, moe::common::WireType::kFloat32,
                              req.mutable_tokens());
    if (n == 1) {
      cluster_p50_n1 = InferP50(stub.get(), OneTokenRequests(x, c.d_model), seconds);
      if (cluster_p50_n1 < 0) return 1;
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
  std::remove(path.c_str());
  const auto [tiny_cluster, tiny_local, tiny_bare] = NegligibleComputeN1(c, seconds);
  if (tiny_cluster < 0) return 1;
  std::string rows;
  for (size_t i = 0; i < sizes.size(); ++i) {
    rows += absl::StrCat(i ? ", " : "", "{\"N\": ", sizes[i], ", \"in_process_tokens_per_s\": ",
                         local_tps[i], ", \"cluster_tokens_per_s\": ", cluster_tps[i],
                         ", \"ratio\": ", cluster_tps[i] / local_tps[i], "}");
  }
  std::string gaps;
  for (const auto& [gap_us, p50] : by_gap) {
    gaps += absl::StrCat(gaps.empty() ? "" : ", ", "{\"gap_us\": ", gap_us, ", \"p50_s\": ", p50, "}");
  }
  std::printf(
      "{\"shards\": 4, \"shard_threads\": 1, \"in_process_threads\": %d, \"throughput\": [%s], "
      "\"latency_n1\": {\"cluster_p50_s\": %g, \"in_process_p50_s\": %g, \"bare_rtt_p50_s\": %g, "
      "\"added_in_round_trips\": %g, \"expert_forward_1row_by_gap\": [%s], "
      "\"varied_tokens\": {\"cluster_p50_s\": %g, \"in_process_p50_s\": %g, "
      "\"added_in_round_trips\": %g}, "
      "\"negligible_compute\": {\"d_ff\": 32, \"cluster_p50_s\": %g, \"in_process_p50_s\": %g, "
      "\"bare_rtt_p50_s\": %g, \"added_in_round_trips\": %g}}}\n",
      cores, rows.c_str(), cluster_p50_n1, local_p50_n1, bare_p50,
      (cluster_p50_n1 - local_p50_n1) / bare_p50, gaps.c_str(), cluster_p50_n1_varied,
      local_p50_n1_varied, (cluster_p50_n1_varied - local_p50_n1_varied) / bare_p50,
      tiny_cluster, tiny_local, tiny_bare, (tiny_cluster - tiny_local) / tiny_bare);
  return 0;
}
