// The cluster (router + 4 shards on loopback, 1 compute thread each) against the in-process
// MoeLayer (OpenMP threads = this machine's cores) on the same checkpoint: tokens/s at N tokens
// per request, and the latency the cluster adds at N = 1 in units of a bare gRPC unary round
// trip to the same router (GetClusterInfo), all measured in this run. N = 1 is measured three
// ways, to tell its parts apart: one token repeated (the headline figure), a new token per
// request, and one token on a model of d_ff 32 whose experts cost next to nothing (what the
// cluster's own path adds). Throughput is measured in rounds, each timing the in-process layer
// and the cluster back to back (in alternating order) at every N, and each N's ratio is the
// median of its rounds' ratios: this VM's speed drifts by 10-20 % over a minute (other tenants),
// and a ratio of two figures taken a minute apart measured the drift as much as the cluster.
// Prints one JSON object.

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
#include "absl/strings/str_join.h"
#include "client/local_cluster.h"
#include "client/router_client.h"
#include "expert_server/expert_ffn.h"
#include "router/moe_layer.h"
#include "services/common/random_checkpoint.h"
#include "services/common/tensor_codec.h"

namespace {

using Clock = std::chrono::steady_clock;

// Rounds of the throughput comparison; each measurement takes seconds / kRounds.
constexpr int kRounds = 3;

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

// Tokens/s of the in-process layer on `x` [n, d], forward after forward for `seconds`; -1 if a
// forward fails or none finished.
double LocalTokensPerSecond(moe::router::MoeLayer* layer, const std::vector<float>& x, int64_t n,
                            double seconds) {
  if (!layer->Forward(x.data(), n).ok()) return -1;
  int64_t calls = 0;
  const auto start = Clock::now();
  while (Since(start) < seconds) {
    if (!layer->Forward(x.data(), n).ok()) return -1;
    ++calls;
  }
  return calls > 0 ? static_cast<double>(n * calls) / Since(start) : -1;
}

// Tokens/s of the cluster on `x` [n, d] in steady state: a window of requests in flight on one
// InferStream, a new one written as each response is read; the clock starts once a window's
// worth of responses has come back (the pipeline full) and counts the responses read in
// `seconds`. -1 on an error.
double ClusterTokensPerSecond(moe::v1::Router::Stub* stub, const std::vector<float>& x, int64_t n,
                              int64_t d, double seconds) {
  moe::v1::InferRequest req;
  moe::common::EncodeTensor(x, {n, d}, moe::common::WireType::kFloat32, req.mutable_tokens());
  const int window = n >= 256 ? 4 : 16;
  grpc::ClientContext ctx;
  auto stream = stub->InferStream(&ctx);
  moe::v1::InferResponse resp;
  int64_t sent = 0, done = 0;
  bool ok = true;
  std::string failed;  // the first response that failed, "code N: message"
  for (; sent < window; ++sent) ok = ok && stream->Write(req);
  // One response read, one request written; false on an error.
  auto turn = [&] {
    if (!stream->Read(&resp)) return false;
    if (resp.code() != 0) {
      failed = absl::StrCat("code ", resp.code(), ": ", resp.message());
      return false;
    }
    ++done;
    ++sent;
    return stream->Write(req);
  };
  for (int i = 0; ok && i < window; ++i) ok = turn();
  const int64_t done_before = done;
  const auto start = Clock::now();
  while (ok && Since(start) < seconds) ok = turn();
  const double el = Since(start);
  const int64_t counted = done - done_before;
  stream->WritesDone();
  while (done < sent && stream->Read(&resp)) ++done;
  const grpc::Status st = stream->Finish();
  if (!st.ok() || !ok) {
    std::fprintf(stderr, "cluster_bench: InferStream at N=%lld failed: %s\n",
                 static_cast<long long>(n),
                 !st.ok()          ? st.error_message().c_str()
                 : !failed.empty() ? failed.c_str()
                                   : "the stream ended early");
    return -1;
  }
  return static_cast<double>(n * counted) / el;
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
  double local_p50_n1 = 0;
  {
    const auto x = moe::common::RandomMatrix(1, c.d_model, 1);
    (void)layer->Forward(x.data(), 1);
    local_p50_n1 = P50For(seconds, [&](int64_t) { return layer->Forward(x.data(), 1).ok(); });
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
  double cluster_p50_n1 = 0;
  {
    const auto x = moe::common::RandomMatrix(1, c.d_model, 1);
    cluster_p50_n1 = InferP50(stub.get(), OneTokenRequests(x, c.d_model), seconds);
    if (cluster_p50_n1 < 0) return 1;
  }
  // Throughput, in rounds (see the top of the file). The idle cluster stays up while the
  // in-process layer runs: its processes wait on their sockets and timers.
  struct Point {
    std::vector<double> local, cluster, ratio;
  };
  std::vector<Point> points(sizes.size());
  // Warm-up at every N, untimed: the first batches of a new size create oneDNN primitives (one
  // per row count where the kernel wants them) on the shards and in process.
  for (int64_t n : sizes) {
    const auto x = moe::common::RandomMatrix(n, c.d_model, n);
    if (LocalTokensPerSecond(layer.get(), x, n, 0.3) < 0) return 1;
    if (ClusterTokensPerSecond(stub.get(), x, n, c.d_model, 0.3) < 0) return 1;
  }
  for (int round = 0; round < kRounds; ++round) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      const int64_t n = sizes[i];
      const auto x = moe::common::RandomMatrix(n, c.d_model, n);
      double local = 0, remote = 0;
      for (int turn = 0; turn < 2; ++turn) {
        if ((turn == 0) == (round % 2 == 0)) {
          local = LocalTokensPerSecond(layer.get(), x, n, seconds / kRounds);
          if (local <= 0) return 1;
        } else {
          remote = ClusterTokensPerSecond(stub.get(), x, n, c.d_model, seconds / kRounds);
          if (remote < 0) return 1;
        }
      }
      points[i].local.push_back(local);
      points[i].cluster.push_back(remote);
      points[i].ratio.push_back(remote / local);
      std::fprintf(stderr, "round %d/%d N=%lld: in-process %.0f, cluster %.0f tokens/s (%.2f)\n",
                   round + 1, kRounds, static_cast<long long>(n), local, remote, remote / local);
    }
  }
  if (const absl::Status st = (*cluster)->Stop(); !st.ok()) {
    std::fprintf(stderr, "cluster_bench: %s\n", std::string(st.message()).c_str());
  }
  std::remove(path.c_str());
  const auto [tiny_cluster, tiny_local, tiny_bare] = NegligibleComputeN1(c, seconds);
  if (tiny_cluster < 0) return 1;
  std::string rows;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const Point& p = points[i];
    rows += absl::StrCat(i ? ", " : "", "{\"N\": ", sizes[i], ", \"in_process_tokens_per_s\": ",
                         Median(p.local), ", \"cluster_tokens_per_s\": ", Median(p.cluster),
                         ", \"ratio\": ", Median(p.ratio), ", \"round_ratios\": [",
                         absl::StrJoin(p.ratio, ", "), "]}");
  }
  std::string gaps;
  for (const auto& [gap_us, p50] : by_gap) {
    gaps += absl::StrCat(gaps.empty() ? "" : ", ", "{\"gap_us\": ", gap_us, ", \"p50_s\": ", p50, "}");
  }
  std::printf(
      "{\"shards\": 4, \"shard_threads\": 1, \"in_process_threads\": %d, \"rounds\": %d, "
      "\"throughput\": [%s], "
      "\"latency_n1\": {\"cluster_p50_s\": %g, \"in_process_p50_s\": %g, \"bare_rtt_p50_s\": %g, "
      "\"added_in_round_trips\": %g, \"expert_forward_1row_by_gap\": [%s], "
      "\"varied_tokens\": {\"cluster_p50_s\": %g, \"in_process_p50_s\": %g, "
      "\"added_in_round_trips\": %g}, "
      "\"negligible_compute\": {\"d_ff\": 32, \"cluster_p50_s\": %g, \"in_process_p50_s\": %g, "
      "\"bare_rtt_p50_s\": %g, \"added_in_round_trips\": %g}}}\n",
      cores, kRounds, rows.c_str(), cluster_p50_n1, local_p50_n1, bare_p50,
      (cluster_p50_n1 - local_p50_n1) / bare_p50, gaps.c_str(), cluster_p50_n1_varied,
      local_p50_n1_varied, (cluster_p50_n1_varied - local_p50_n1_varied) / bare_p50,
      tiny_cluster, tiny_local, tiny_bare, (tiny_cluster - tiny_local) / tiny_bare);
  return 0;
}
