#ifndef MOE_TESTS_CLUSTER_CLUSTER_FIXTURE_H_
#define MOE_TESTS_CLUSTER_CLUSTER_FIXTURE_H_

// The fixture of the multi-process tests (tests/cluster, tests/fault): a small checkpoint, local
// clusters of real moe-expert-server and moe-router processes, a load generator that checks
// every answer against the in-process MoeLayer, and metric scraping.

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "client/local_cluster.h"
#include "client/router_client.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "moe/v1/router.grpc.pb.h"
#include "router/moe_layer.h"
#include "services/common/random_checkpoint.h"
#include "services/common/subprocess.h"
#include "services/common/tensor_codec.h"
#include "tests/reference/test_util.h"

namespace moe::testing {

using Clock = std::chrono::steady_clock;

inline common::ModelConfig Config() {
  common::ModelConfig c;
  c.num_experts = 8;
  c.d_model = 32;
  c.d_ff = 64;
  c.top_k = 2;
  c.activation = common::Activation::kSilu;
  c.gated = true;
  return c;
}

inline double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Polls `done` every 20 ms for up to `limit` seconds; returns the seconds it took, or -1.
template <typename F>
double WaitFor(F done, double limit) {
  const auto start = Clock::now();
  while (Since(start) < limit) {
    if (done()) return Since(start);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

inline std::string ScrapeBody(int port) { return ScrapeMetrics(port); }

// The value of the first series of a /metrics `body` that `series` names: its metric name and,
// of its labels, those `series` gives, whatever others it has (a shard's series carry
// shard="ADDRESS"); e.g. `moe_shard_rejected_batches_total{reason="deadline"}`. -1 when none.
inline double MetricValue(const std::string& body, const std::string& series) {
  const size_t brace = series.find('{');
  const std::string name = series.substr(0, brace);
  std::vector<std::string> wanted;  // label="value", none with a comma in it
  if (brace != std::string::npos) {
    wanted = absl::StrSplit(series.substr(brace + 1, series.rfind('}') - brace - 1), ',');
  }
  for (absl::string_view line : absl::StrSplit(body, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    const size_t end = line.find_first_of("{ ");
    if (end == absl::string_view::npos || line.substr(0, end) != name) continue;
    std::string labels = ",";
    size_t value = end;
    if (line[end] == '{') {
      const size_t close = line.find('}', end);
      if (close == absl::string_view::npos) continue;
      labels = absl::StrCat(",", line.substr(end + 1, close - end - 1), ",");
      value = close + 1;
    }
    bool all = true;
    for (const std::string& w : wanted) {
      all = all && labels.find(absl::StrCat(",", w, ",")) != std::string::npos;
    }
    if (all) return std::atof(std::string(line.substr(value)).c_str());
  }
  return -1;
}

// GET http://127.0.0.1:port/metrics and return the value of `series` in it, or -1.
inline double ScrapeMetric(int port, const std::string& series) {
  return MetricValue(ScrapeBody(port), series);
}

class ClusterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ck_ = new common::Checkpoint(common::MakeRandomCheckpoint({Config(), true, 23}));
    path_ = new std::string(TempPath("cluster_test.safetensors"));
    ASSERT_TRUE(common::SaveCheckpoint(*path_, *ck_).ok());
    layer_ = router::MoeLayer::Create(*ck_).value().release();
    setup_ok_ = true;
  }

  // A failure in SetUpTestSuite would only skip the tests; fail them instead.
  void SetUp() override { ASSERT_TRUE(setup_ok_) << "suite set-up failed"; }

  // Starts a cluster of `o` (bin_dir and checkpoint filled in).
  std::unique_ptr<client::LocalCluster> StartWith(client::LocalClusterOptions o) {
    o.bin_dir = MOE_BIN_DIR;
    o.checkpoint = *path_;
    auto c = client::LocalCluster::Start(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  std::unique_ptr<client::LocalCluster> Start(const std::string& placement, int shards,
                                              std::vector<std::string> router_args = {},
                                              std::vector<std::string> shard_args = {},
                                              int metrics_port = -1) {
    client::LocalClusterOptions o;
    o.shards = shards;
    o.placement = placement;
    o.router_args = std::move(router_args);
    o.shard_args = std::move(shard_args);
    o.metrics_port = metrics_port;
    return StartWith(std::move(o));
  }

  // Start with MOE_FAILPOINT=`failpoint` in the environment of every process it starts.
  std::unique_ptr<client::LocalCluster> StartWithFailpoint(const char* failpoint,
                                                           const std::string& placement,
                                                           int shards) {
    EXPECT_EQ(setenv("MOE_FAILPOINT", failpoint, 1), 0);
    auto cluster = Start(placement, shards);
    unsetenv("MOE_FAILPOINT");
    return cluster;
  }

  static v1::InferRequest Request(const std::vector<float>& x, int64_t n, const std::string& id) {
    v1::InferRequest r;
    r.set_request_id(id);
    r.set_return_routing(true);
    common::EncodeTensor(x, {n, Config().d_model}, common::WireType::kFloat32, r.mutable_tokens());
    return r;
  }

  // Checks a response against the in-process layer (1e-5) and returns whether it matched.
  static bool Matches(const std::vector<float>& x, int64_t n, const v1::InferResponse& resp,
                      const router::MoeLayer& layer) {
    auto ref = layer.Forward(x.data(), n);
    auto v = common::DecodeMatrix(resp.output(), "output", Config().d_model);
    if (!v.ok() || v->dim(0) != n) return false;
    const std::vector<float> y = common::ViewToFloat(*v);
    for (size_t i = 0; i < y.size(); ++i) {
      if (std::fabs(y[i] - ref->y[i]) > 1e-5 * (1 + std::fabs(ref->y[i]))) return false;
    }
    if (resp.has_routing()) {
      for (int i = 0; i < resp.routing().expert_ids_size(); ++i) {
        if (resp.routing().expert_ids(i) != ref->gating.expert_ids[i]) return false;
      }
    }
    return true;
  }

  static grpc::Status Infer(v1::Router::Stub* stub, const v1::InferRequest& req,
                            v1::InferResponse* resp, int deadline_ms = 10000) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
    return stub->Infer(&ctx, req, resp);
  }

  // Requests of 4 tokens from `gen`, one at a time, until `done()` or `limit_s` seconds; the first
  // failure ends it and is returned, except UNAVAILABLE where `tolerate_unavailable` (an expert
  // whose holders are out of rotation). `sent`, when given, counts the requests.
  static grpc::Status LoadUntil(v1::Router::Stub* stub, client::ZipfTokens* gen,
                                const std::function<bool()>& done, double limit_s,
                                bool tolerate_unavailable, int* sent = nullptr) {
    for (const auto start = Clock::now(); !done() && Since(start) < limit_s;) {
      const std::vector<float> x = gen->Next(4);
      v1::InferResponse resp;
      const grpc::Status st = Infer(stub, Request(x, 4, "zipf"), &resp);
      if (sent != nullptr) ++*sent;
      if (!st.ok() && !(tolerate_unavailable && st.error_code() == grpc::StatusCode::UNAVAILABLE)) {
        return st;
      }
    }
    return grpc::Status::OK;
  }

  // Load from `threads` clients until `stop`; counts successes, failures and wrong answers.
  struct LoadResult {
    std::atomic<int> ok{0}, failed{0}, wrong{0};
    std::string first_error;
    std::mutex mu;
  };
  static void RunLoad(const std::string& router, int threads, std::atomic<bool>* stop,
                      LoadResult* result) {
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        auto stub = client::MakeRouterStub(router);
        for (int i = 0; !stop->load(); ++i) {
          const int64_t n = 1 + (i * 7 + t) % 24;
          const std::vector<float> x = common::RandomMatrix(n, Config().d_model, t * 100000 + i);
          v1::InferResponse resp;
          grpc::Status st = Infer(stub.get(), Request(x, n, "load"), &resp);
          if (!st.ok()) {
            ++result->failed;
            std::lock_guard<std::mutex> lock(result->mu);
            if (result->first_error.empty()) {
              result->first_error = std::to_string(st.error_code()) + ": " + st.error_message();
            }
          } else if (!Matches(x, n, resp, *layer_)) {
            ++result->wrong;
          } else {
            ++result->ok;
          }
        }
      });
    }
    for (auto& t : ts) t.join();
  }

  // RunLoad on a thread of its own for the scope of a test; Stop() (or leaving the scope, also
  // through a failed ASSERT, which would otherwise abort on a joinable thread) ends it.
  class BackgroundLoad {
   public:
    BackgroundLoad(const std::string& router, int threads)
        : thread_([this, router, threads] { RunLoad(router, threads, &stop_, &result_); }) {}
    ~BackgroundLoad() { Stop(); }
    const LoadResult& Stop() {
      stop_ = true;
      if (thread_.joinable()) thread_.join();
      return result_;
    }
    const LoadResult& result() const { return result_; }

   private:
    std::atomic<bool> stop_{false};
    LoadResult result_;
    std::thread thread_;
  };

  // Token rows the shard whose /metrics is on `port` computed, over every expert (one scrape).
  static double ShardTokens(int port) {
    const std::string body = ScrapeBody(port);
    double sum = 0;
    for (int e = 0; e < Config().num_experts; ++e) {
      sum += std::max(0.0, MetricValue(body, "moe_shard_tokens_total{expert=\"" +
                                                          std::to_string(e) + "\"}"));
    }
    return sum;
  }

  static common::Checkpoint* ck_;
  static std::string* path_;
  static router::MoeLayer* layer_;
  static bool setup_ok_;
};

inline bool ClusterTest::setup_ok_ = false;

inline common::Checkpoint* ClusterTest::ck_ = nullptr;
inline std::string* ClusterTest::path_ = nullptr;
inline router::MoeLayer* ClusterTest::layer_ = nullptr;

}  // namespace moe::testing

#endif  // MOE_TESTS_CLUSTER_CLUSTER_FIXTURE_H_
