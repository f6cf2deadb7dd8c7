#ifndef MOE_ROUTER_GRPC_SHARD_CLIENT_H_
#define MOE_ROUTER_GRPC_SHARD_CLIENT_H_

// ShardClient over gRPC: one long-lived Dispatch stream per shard (reopened after a failure),
// keepalive on the channel, and a health watcher that takes the shard out of rotation when it
// stops answering or says NOT_SERVING and brings it back when it is SERVING again.

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "moe/v1/expert_shard.grpc.pb.h"
#include "router/shard_client.h"
#include "services/common/server_util.h"

namespace moe::router {

// The log lines of one shard's flips in and out of rotation. A shard whose streams break while
// its health says SERVING flips up to four times a second, so the lines are limited: the first
// kLogged flips out of a minute are logged, with their returns; the first past them says the
// rest are not, and the next one logged counts them.
class FlipLines {
 public:
  static constexpr int kLogged = 5;
  explicit FlipLines(std::string address) : address_(std::move(address)) {}
  // The line for the shard leaving rotation at `now` for `why`; "" when none is logged.
  std::string Out(absl::Time now, const std::string& why);
  // The line for the shard coming back; "" for a shard's first SERVING and for the return from a
  // flip out that was not logged.
  std::string Back() const;

 private:
  const std::string address_;
  absl::Time window_ = absl::InfinitePast();  // when the current minute began
  int logged_in_window_ = 0;
  int unlogged_ = 0;       // flips out since the last one logged
  bool log_back_ = false;  // the last flip out was logged (none before the first)
};

class GrpcShardClient final : public ShardClient {
 public:
  // `on_health_change` runs (from the watcher thread or a gRPC thread) when healthy() flips.
  // `model_fingerprint` (common::ModelFingerprint of the router's checkpoint), when given, goes
  // with each Dispatch stream: a shard of other weights refuses its batches. `lease_epochs`,
  // when given, is the router's: its epoch goes with each load and unload, and the shard's
  // reported epoch is seen there.
  GrpcShardClient(std::string address, const common::RpcLimits& limits,
                  std::function<void(bool)> on_health_change = nullptr,
                  absl::Duration health_interval = absl::Milliseconds(250),
                  std::string model_fingerprint = "",
                  std::shared_ptr<LeaseEpochs> lease_epochs = nullptr);
  ~GrpcShardClient() override;

  void Dispatch(std::shared_ptr<const v1::DispatchRequest> request, int64_t rows,
                DispatchDone done) override;
  void CancelBatch(uint64_t batch_id) override;
  bool healthy() const override { return healthy_.load(); }
  bool answering() const override { return answering_.load(); }
  void CheckHealthNow() override;
  OutOfRotation out_of_rotation() const override;
  int64_t outstanding_rows() const override { return outstanding_rows_.load(); }
  const std::string& address() const override { return address_; }
  absl::StatusOr<v1::ShardStatus> LoadExperts(const std::vector<int>& experts, uint64_t version,
                                              const std::string& peer,
                                              absl::Duration timeout) override;
  absl::StatusOr<v1::ShardStatus> RollBackExperts(const std::vector<int>& experts,
                                                  uint64_t version, const std::string& peer,
                                                  absl::Duration timeout) override;
  absl::StatusOr<v1::ShardStatus> UnloadExperts(const std::vector<int>& experts,
                                                uint64_t version,
                                                absl::Duration timeout) override;
  absl::StatusOr<v1::ShardStatus> GetStatus(absl::Duration timeout) override;
  absl::StatusOr<v1::BackwardResponse> Backward(const v1::BackwardRequest& request,
                                                absl::Duration timeout) override;
  absl::Status FinishStep(uint64_t step, bool commit, float learning_rate,
                          absl::Duration timeout) override;
  absl::StatusOr<v1::StepOutcome::State> GetStep(uint64_t step, absl::Duration timeout) override;
  absl::StatusOr<std::string> ExportExpert(int expert, absl::Duration timeout) override;
  void CancelAdminCalls() override;

  class Stream;
  class AdminCall;

 private:
  friend class Stream;
  absl::StatusOr<v1::ShardStatus> Load(const std::vector<int>& experts, uint64_t version,
                                       const std::string& peer, bool replace_newer,
                                       absl::Duration timeout);
  // Flips healthy() and reports the flip; a shard taken out is logged with `why`, which
  // out_of_rotation() then tells.
  void SetHealthy(bool healthy, const std::string& why = "");
  // The shard's batch limits, from any status it answers with (a placement's first loads
  // bring them before it serves).
  void NoteStatus(const v1::ShardStatus& status);
  void StreamEnded(Stream* stream, const grpc::Status& status);
  void StreamReleased();  // the stream's object (and its hold on the channel) is gone
  void HealthLoop();
  // One health check, numbered in `*seq` in the order the checks start.
  absl::StatusOr<common::HealthState> ProbeHealth(uint64_t* seq);
  // Whether check `seq` may be applied (health_mu_ held): no check that started later has been
  // applied. An older answer (NOT_SERVING, read before the shard's first load ended) must not
  // undo a newer one (SERVING, read by CheckHealthNow once the load had ended).
  bool FreshLocked(uint64_t seq);

  const std::string address_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertShard::Stub> stub_;
  std::function<void(bool)> on_health_change_;
  // SetHealthy's flip and its report, held only by them and out_of_rotation(); under it
  // on_health_change_ takes the router's metrics lock, which calls nothing back.
  mutable std::mutex flip_mu_;
  const absl::Duration health_interval_;
  const std::string model_fingerprint_;
  const std::shared_ptr<LeaseEpochs> lease_epochs_;
  OutOfRotation out_;  // flip_mu_
  FlipLines flip_lines_;  // flip_mu_

  std::atomic<bool> healthy_{false};
  std::atomic<bool> answering_{false};
  std::atomic<uint64_t> probes_started_{0};
  std::mutex health_mu_;          // applies one check's answer at a time; before mu_
  uint64_t newest_applied_ = 0;  // health_mu_
  std::atomic<int64_t> outstanding_rows_{0};

  std::mutex mu_;
  Stream* stream_ = nullptr;  // the open stream, if any
  std::set<Stream*> live_;  // started and not yet ended
  int live_streams_ = 0;
  std::condition_variable streams_done_;
  bool stopping_ = false;
  std::condition_variable stop_cv_;
  std::thread health_thread_;

  std::mutex admin_mu_;
  std::set<grpc::ClientContext*> admin_calls_;  // placement calls in progress
  bool admin_cancelled_ = false;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_GRPC_SHARD_CLIENT_H_
