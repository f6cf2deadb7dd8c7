#ifndef MOE_CLIENT_ROUTER_CLIENT_H_
#define MOE_CLIENT_ROUTER_CLIENT_H_

// A small C++ client library for moe.v1.Router: channels, and token generators for load.

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "moe/v1/router.grpc.pb.h"
#include "services/common/checkpoint.h"

namespace moe::client {

// Calls through stubs made afterwards carry "authorization: Bearer <token>" (empty: none).
void SetAuthToken(std::string token);
// A stub over the process's TLS configuration (common::ConfigureTls) and auth token.
std::unique_ptr<v1::Router::Stub> MakeRouterStub(const std::string& address);
// The channel under such a stub, for a caller that also watches the connection.
std::shared_ptr<grpc::Channel> MakeRouterChannel(const std::string& address);

// One idempotent unary call, `call(ctx)`, each attempt with a fresh context of `timeout`. A call
// that fails UNAVAILABLE is made twice more, 300 ms apart (past the channel's reconnect
// backoff): a connection attempt can fail on a loaded machine (common::UserChannelArgs gives
// a handshake 2 s) without the server being gone. Returns the first
// failure when every attempt fails (later ones only say that a reconnect was cut short). Not
// wait_for_ready, whose DEADLINE_EXCEEDED would hide why the server could not be reached. A
// server without the service (UNIMPLEMENTED with no message) is named in the message.
grpc::Status CallWithReconnects(absl::Duration timeout,
                                const std::function<grpc::Status(grpc::ClientContext*)>& call);

// Tokens whose experts follow a Zipf law: each token's `picks` experts (the layer's top-k) are
// drawn without replacement, the expert of popularity rank r with weight 1 / (r + 1)^s, and the
// token points along the sum of their unit gate rows (the first drawn strongest) plus noise, so
// the gate sends it to exactly those experts. s = 0 is uniform.
class ZipfTokens {
 public:
  // Expert popularity by rank: the r-th most popular expert is `order`[r], or expert r when
  // `order` is empty.
  ZipfTokens(const common::GateWeights& gate, int num_experts, int d_model, double s,
             uint64_t seed, const std::vector<int>& order = {}, int picks = 1);
  std::vector<float> Next(int64_t n);

 private:
  std::vector<std::vector<float>> dirs_;  // unit gate rows
  std::vector<double> popularity_;        // by expert id, unnormalized
  int picks_;
  std::normal_distribution<float> noise_{0.f, 0.3f};
  std::mt19937_64 rng_;
  int d_model_;
};

// `moe-client train --synthetic`'s objective for a batch of `tokens` outputs `y` against
// `target`: returns the loss, the mean over tokens of |y - target|^2 (in double), and sets `dy`
// to its gradient 2 (y - target) / tokens (in float, as the step sends it). FAILED_PRECONDITION
// when the loss, or its gradient, is not finite: a residual near float's largest overflows the
// gradient where the loss does not.
absl::StatusOr<double> RegressionLoss(const std::vector<float>& y, const std::vector<float>& target,
                                      int64_t tokens, std::vector<float>* dy);

}  // namespace moe::client

#endif  // MOE_CLIENT_ROUTER_CLIENT_H_
