#include "client/router_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "moe/v1/coordinator.grpc.pb.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "services/common/security.h"
#include "services/common/server_util.h"
#include "services/common/tensor_codec.h"

namespace moe::client {

namespace {
std::string& Token() {
  static std::string* token = new std::string();
  return *token;
}
}  // namespace

void SetAuthToken(std::string token) { Token() = std::move(token); }

std::shared_ptr<grpc::Channel> MakeRouterChannel(const std::string& address) {
  return common::CreateAuthorizedChannel(address, common::UserChannelArgs(), Token());
}

std::unique_ptr<v1::Router::Stub> MakeRouterStub(const std::string& address) {
  return v1::Router::NewStub(MakeRouterChannel(address));
}

namespace {

// A peer as gRPC names it ("ipv4:H:P") as an address to dial ("H:P").
std::string PeerAddress(std::string peer) {
  for (const char* scheme : {"ipv4:", "ipv6:"}) {
    if (absl::StartsWith(peer, scheme)) return peer.substr(std::strlen(scheme));
  }
  return peer;
}

// Which of the cluster's services answers at `target`: "a router", "an expert shard", "the
// coordinator", or "" where none does within 1 s each. Any answer but UNIMPLEMENTED (an empty
// table, a refusal for want of a token) is the service.
std::string ServiceAt(const std::string& target) {
  auto channel = MakeRouterChannel(target);
  auto answers = [](const grpc::Status& st) {
    return st.error_code() != grpc::StatusCode::UNIMPLEMENTED &&
           st.error_code() != grpc::StatusCode::UNAVAILABLE &&
           st.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED;
  };
  auto context = [](grpc::ClientContext* ctx) {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
  };
  {
    grpc::ClientContext ctx;
    context(&ctx);
    v1::Placement p;
    if (answers(v1::Router::NewStub(channel)->GetPlacement(&ctx, {}, &p))) return "a router";
  }
  {
    grpc::ClientContext ctx;
    context(&ctx);
    v1::ShardStatus status;
    if (answers(v1::ExpertShard::NewStub(channel)->GetStatus(&ctx, {}, &status))) {
      return "an expert shard";
    }
  }
  grpc::ClientContext ctx;
  context(&ctx);
  v1::Membership members;
  if (answers(v1::Coordinator::NewStub(channel)->ListMembers(&ctx, {}, &members))) {
    return "the coordinator";
  }
  return "";
}

}  // namespace

grpc::Status CallWithReconnects(absl::Duration timeout,
                                const std::function<grpc::Status(grpc::ClientContext*)>& call) {
  grpc::Status first;
  for (int attempt = 0; attempt < 3; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    grpc::Status st = call(&ctx);
    if (st.error_code() == grpc::StatusCode::UNIMPLEMENTED && st.error_message().empty()) {
      // gRPC's own answer for a service the server does not have: say so, and what it is.
      const std::string peer = PeerAddress(ctx.peer());
      const std::string what = ServiceAt(peer);
      return grpc::Status(
          st.error_code(),
          absl::StrCat("the server at ", peer, " does not serve this call: ",
                       what.empty() ? "is that the address of another of the cluster's services?"
                                    : absl::StrCat("that is ", what, "'s address"),
                       " (moe-cluster prints each one's: READY router=... and a line per shard; "
                       "moe-client info --router ROUTER lists the shards)"));
    }
    if (st.error_code() != grpc::StatusCode::UNAVAILABLE) return st;
    if (attempt == 0) first = st;
  }
  return first;
}

ZipfTokens::ZipfTokens(const common::GateWeights& gate, int num_experts, int d_model, double s,
                       uint64_t seed, const std::vector<int>& order, int picks)
    : popularity_(num_experts),
      picks_(std::clamp(picks, 1, num_experts)),
      rng_(seed),
      d_model_(d_model) {
  for (int r = 0; r < num_experts; ++r) {
    popularity_[order.empty() ? r : order[r]] = 1.0 / std::pow(r + 1.0, s);
  }
  for (int e = 0; e < num_experts; ++e) {
    std::vector<float> row(gate.weight.begin() + static_cast<int64_t>(e) * d_model,
                           gate.weight.begin() + static_cast<int64_t>(e + 1) * d_model);
    double norm = 0;
    for (float v : row) norm += static_cast<double>(v) * v;
    norm = std::sqrt(std::max(norm, 1e-12));
    for (float& v : row) v = static_cast<float>(v / norm);
    dirs_.push_back(std::move(row));
  }
}

std::vector<float> ZipfTokens::Next(int64_t n) {
  std::vector<float> x(static_cast<size_t>(n * d_model_));
  // Scale so the chosen experts' logits stand well above the others'; each later pick at 0.8
  // of the one before, so the order of the picks is also the gate's.
  const float scale = 4.f * std::sqrt(static_cast<float>(d_model_)) / 8.f;
  std::vector<double> left(popularity_.size());
  for (int64_t t = 0; t < n; ++t) {
    float* row = &x[static_cast<size_t>(t * d_model_)];
    for (int i = 0; i < d_model_; ++i) row[i] = noise_(rng_);
    left = popularity_;
    float strength = scale;
    for (int k = 0; k < picks_; ++k) {
      const int e = std::discrete_distribution<int>(left.begin(), left.end())(rng_);
      left[e] = 0;  // without replacement
      const std::vector<float>& dir = dirs_[e];
      for (int i = 0; i < d_model_; ++i) row[i] += strength * dir[i];
      strength *= 0.8f;
    }
  }
  return x;
}

absl::StatusOr<double> RegressionLoss(const std::vector<float>& y, const std::vector<float>& target,
                                      int64_t tokens, std::vector<float>* dy) {
  if (y.size() != target.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the output has ", y.size(), " values, the target ", target.size()));
  }
  double loss = 0;
  dy->resize(y.size());
  for (size_t i = 0; i < y.size(); ++i) {
    const double r = static_cast<double>(y[i]) - target[i];
    loss += r * r / static_cast<double>(tokens);
    (*dy)[i] = static_cast<float>(2.0 * r / static_cast<double>(tokens));
  }
  if (!std::isfinite(loss)) {
    return absl::FailedPreconditionError(absl::StrCat("the loss (", loss, ") is not finite"));
  }
  if (common::FirstNonFinite(*dy) >= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("the loss (", loss, ") has a gradient that is not finite"));
  }
  return loss;
}

}  // namespace moe::client
