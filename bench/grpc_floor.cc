// The floor under the cluster's N = 1 latency: what gRPC alone costs on this machine for a request
// of the cluster's shape. A client sends one 512-wide token to a relay process, which sends the
// row on a long-lived bidi stream to each of two backend processes. Each backend echoes the row,
// and the relay answers once both have. There is no gating, no compute and no combine; the
// channel and server settings are the cluster's. It is measured in bare unary round trips to the
// same relay, in the same command, two ways:
//   - callback: the callback API, as the router and the shards use it;
//   - async: completion queues, each process handling every event on the one thread that polls
//     (the relay's Infer and its two streams share one queue). This is what a rewrite of the hot
//     path on the async API would reach at best. It lives here only to be measured: the services
//     keep the callback API.
// The two run in 3 alternating pairs, and each figure is the median of its 3 runs.
//
// usage: grpc_floor [SECONDS_PER_RUN]             prints one JSON object
//        grpc_floor backend callback|async         (children, spawned by the above)
//        grpc_floor relay callback|async HOST:PORT HOST:PORT

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "moe/v1/expert_shard.grpc.pb.h"
#include "moe/v1/router.grpc.pb.h"
#include "services/common/server_util.h"
#include "services/common/subprocess.h"

namespace {

using moe::v1::DispatchRequest;
using moe::v1::DispatchResponse;
using moe::v1::InferRequest;
using moe::v1::InferResponse;
using Clock = std::chrono::steady_clock;

constexpr int kDModel = 512;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? -1 : v[v.size() / 2];
}

// Starts a server on a free loopback port with the cluster's settings, serving `service` (and
// making `*cq` when given), and prints the line Subprocess::ReadListeningPort reads.
std::unique_ptr<grpc::Server> Serve(grpc::Service* service,
                                    std::unique_ptr<grpc::ServerCompletionQueue>* cq) {
  grpc::ServerBuilder builder;
  int port = 0;
  moe::common::ConfigureServerBuilder(&builder);
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(service);
  if (cq != nullptr) *cq = builder.AddCompletionQueue();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) return nullptr;
  std::printf("listening on 127.0.0.1:%d\n", port);
  std::fflush(stdout);
  return server;
}

// The bare round trip: a unary call answered at once, on the callback API as in the router.
grpc::ServerUnaryReactor* AnswerAtOnce(grpc::CallbackServerContext* ctx) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

// The backend's answer to one batch: its rows back, as a shard returns an expert's output.
void Echo(const DispatchRequest& req, DispatchResponse* resp) {
  resp->Clear();
  resp->set_batch_id(req.batch_id());
  *resp->add_outputs()->mutable_output() = req.rows();
}

// ---- backends ----

class CallbackBackend final : public moe::v1::ExpertShard::CallbackService {
  grpc::ServerBidiReactor<DispatchRequest, DispatchResponse>* Dispatch(
      grpc::CallbackServerContext* /*ctx*/) override {
    class Reactor final : public grpc::ServerBidiReactor<DispatchRequest, DispatchResponse> {
     public:
      Reactor() { StartRead(&req_); }
      void OnReadDone(bool ok) override {
        if (!ok) return Finish(grpc::Status::OK);
        Echo(req_, &resp_);
        StartWrite(&resp_);
      }
      void OnWriteDone(bool ok) override {
        if (ok) StartRead(&req_);
      }
      void OnDone() override { delete this; }

     private:
      DispatchRequest req_;
      DispatchResponse resp_;
    };
    return new Reactor;
  }
};

// One stream on a completion queue: read, echo, write, read again.
struct AsyncBackendCall {
  enum State { kNew, kReading, kWriting, kFinishing };
  grpc::ServerContext ctx;
  grpc::ServerAsyncReaderWriter<DispatchResponse, DispatchRequest> stream{&ctx};
  DispatchRequest req;
  DispatchResponse resp;
  State state = kNew;
};

int RunBackend(bool async) {
  CallbackBackend callback_service;
  moe::v1::ExpertShard::AsyncService async_service;
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  std::unique_ptr<grpc::Server> server =
      async ? Serve(&async_service, &cq) : Serve(&callback_service, nullptr);
  if (server == nullptr) return 1;
  if (!async) {
    server->Wait();
    return 0;
  }
  auto accept = [&] {
    auto* call = new AsyncBackendCall;
    async_service.RequestDispatch(&call->ctx, &call->stream, cq.get(), cq.get(), call);
  };
  accept();
  void* tag = nullptr;
  bool ok = false;
  while (cq->Next(&tag, &ok)) {
    auto* call = static_cast<AsyncBackendCall*>(tag);
    switch (call->state) {
      case AsyncBackendCall::kNew:
        accept();
        call->state = AsyncBackendCall::kReading;
        call->stream.Read(&call->req, call);
        break;
      case AsyncBackendCall::kReading:
        if (!ok) {
          call->state = AsyncBackendCall::kFinishing;
          call->stream.Finish(grpc::Status::OK, call);
          break;
        }
        Echo(call->req, &call->resp);
        call->state = AsyncBackendCall::kWriting;
        call->stream.Write(call->resp, call);
        break;
      case AsyncBackendCall::kWriting:
        call->state = AsyncBackendCall::kReading;
        call->stream.Read(&call->req, call);
        break;
      case AsyncBackendCall::kFinishing:
        delete call;
        break;
    }
  }
  return 0;
}

// ---- relay ----

// One request waiting for both backends; `answer` runs once, on the thread of the last answer.
struct Fanout {
  std::atomic<int> left{2};
  std::function<void()> answer;
  void Arrived() {
    if (left.fetch_sub(1) == 1) answer();
  }
};

class Link {
 public:
  virtual ~Link() = default;
  // One request at a time: the driver waits for each answer before sending the next.
  virtual void Send(uint64_t id, const moe::v1::Tensor& rows, Fanout* fanout) = 0;

 protected:
  void Remember(uint64_t id, Fanout* f) {
    std::lock_guard<std::mutex> lock(mu_);
    waiting_[id] = f;
  }
  void Answered(uint64_t id) {
    Fanout* f = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = waiting_.find(id);
      if (it == waiting_.end()) return;
      f = it->second;
      waiting_.erase(it);
    }
    f->Arrived();
  }

 private:
  std::mutex mu_;
  std::map<uint64_t, Fanout*> waiting_;
};

class CallbackLink final : public Link,
                           public grpc::ClientBidiReactor<DispatchRequest, DispatchResponse> {
 public:
  explicit CallbackLink(moe::v1::ExpertShard::Stub* stub) {
    stub->async()->Dispatch(&ctx_, this);
    StartRead(&resp_);
    StartCall();
  }
  // A backend's answer can arrive before gRPC reports the write of its request done, so the
  // next request may come while that write is still outstanding: requests queue, one write at a
  // time (a second StartWrite would abort the process).
  void Send(uint64_t id, const moe::v1::Tensor& rows, Fanout* fanout) override {
    Remember(id, fanout);
    DispatchRequest req;
    req.set_batch_id(id);
    *req.mutable_rows() = rows;
    std::lock_guard<std::recursive_mutex> lock(write_mu_);  // OnWriteDone may run inline
    queued_.push_back(std::move(req));
    if (queued_.size() == 1) StartWrite(&queued_.front());
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::recursive_mutex> lock(write_mu_);
    queued_.pop_front();
    if (ok && !queued_.empty()) StartWrite(&queued_.front());
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    const uint64_t id = resp_.batch_id();
    StartRead(&resp_);
    Answered(id);
  }
  void OnDone(const grpc::Status& /*status*/) override {}

 private:
  grpc::ClientContext ctx_;
  std::recursive_mutex write_mu_;
  std::deque<DispatchRequest> queued_;  // the front one is being written
  DispatchResponse resp_;
};

class CallbackRelay final : public moe::v1::Router::CallbackService {
 public:
  std::vector<std::unique_ptr<Link>> links;
  std::atomic<uint64_t> next_id{1};

  grpc::ServerUnaryReactor* Infer(grpc::CallbackServerContext* ctx, const InferRequest* req,
                                  InferResponse* resp) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    auto* fanout = new Fanout;
    fanout->answer = [reactor, req, resp, fanout] {
      *resp->mutable_output() = req->tokens();
      reactor->Finish(grpc::Status::OK);
      delete fanout;
    };
    const uint64_t id = next_id++;
    for (auto& link : links) link->Send(id, req->tokens(), fanout);
    return reactor;
  }
  grpc::ServerUnaryReactor* GetClusterInfo(grpc::CallbackServerContext* ctx,
                                           const moe::v1::GetClusterInfoRequest* /*req*/,
                                           moe::v1::ClusterInfo* /*resp*/) override {
    return AnswerAtOnce(ctx);
  }
};

// Tags on the async relay's one queue: a link's event, or an Infer call's (low bit set).
class AsyncLink final : public Link {
 public:
  struct Tag {
    AsyncLink* link;
    enum { kStarted, kWritten, kRead } what;
  };
  AsyncLink(moe::v1::ExpertShard::Stub* stub, grpc::CompletionQueue* cq)
      : stream_(stub->PrepareAsyncDispatch(&ctx_, cq)) {
    stream_->StartCall(&started_);
  }
  // As CallbackLink: one write outstanding at a time. Send and Handle run on the relay's one
  // queue thread.
  void Send(uint64_t id, const moe::v1::Tensor& rows, Fanout* fanout) override {
    Remember(id, fanout);
    DispatchRequest req;
    req.set_batch_id(id);
    *req.mutable_rows() = rows;
    queued_.push_back(std::move(req));
    if (queued_.size() == 1) stream_->Write(queued_.front(), &written_);
  }
  void Handle(const Tag& tag, bool ok) {
    if (tag.what == Tag::kWritten) {
      queued_.pop_front();
      if (ok && !queued_.empty()) stream_->Write(queued_.front(), &written_);
      return;
    }
    if (!ok) return;
    if (tag.what == Tag::kRead) {
      const uint64_t id = resp_.batch_id();
      stream_->Read(&resp_, &read_);
      Answered(id);
      return;
    }
    stream_->Read(&resp_, &read_);
  }

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientAsyncReaderWriter<DispatchRequest, DispatchResponse>> stream_;
  std::deque<DispatchRequest> queued_;  // the front one is being written
  DispatchResponse resp_;
  Tag started_{this, Tag::kStarted}, written_{this, Tag::kWritten}, read_{this, Tag::kRead};
};

// Infer on the queue; GetClusterInfo (the bare round trip) on the callback API, as in the router.
// The other methods are async too (never requested), so the server starts no sync-API threads.
using Router = moe::v1::Router;
class MixedRelayService
    : public Router::WithAsyncMethod_Infer<Router::WithAsyncMethod_InferStream<
          Router::WithAsyncMethod_TrainStep<Router::WithCallbackMethod_GetClusterInfo<
              Router::WithAsyncMethod_GetPlacement<Router::WithAsyncMethod_Rebalance<
                  Router::WithAsyncMethod_SaveCheckpoint<Router::Service>>>>>>> {
 public:
  grpc::ServerUnaryReactor* GetClusterInfo(grpc::CallbackServerContext* ctx,
                                           const moe::v1::GetClusterInfoRequest* /*req*/,
                                           moe::v1::ClusterInfo* /*resp*/) override {
    return AnswerAtOnce(ctx);
  }
};

struct AsyncInferCall {
  grpc::ServerContext ctx;
  InferRequest req;
  InferResponse resp;
  grpc::ServerAsyncResponseWriter<InferResponse> writer{&ctx};
  bool answered = false;
  Fanout fanout;
  void* tag() { return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(this) | 1); }
};

int RunRelay(bool async, const std::vector<std::string>& backends) {
  const grpc::ChannelArguments args = moe::common::ClientChannelArgs();
  std::vector<std::unique_ptr<moe::v1::ExpertShard::Stub>> stubs;
  for (const std::string& b : backends) {
    stubs.push_back(moe::v1::ExpertShard::NewStub(
        grpc::CreateCustomChannel(b, grpc::InsecureChannelCredentials(), args)));
  }
  CallbackRelay callback_relay;
  MixedRelayService mixed;
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  if (!async) {
    for (auto& s : stubs) callback_relay.links.push_back(std::make_unique<CallbackLink>(s.get()));
  }
  std::unique_ptr<grpc::Server> server =
      async ? Serve(&mixed, &cq) : Serve(&callback_relay, nullptr);
  if (server == nullptr) return 1;
  if (!async) {
    server->Wait();
    return 0;
  }
  std::vector<std::unique_ptr<AsyncLink>> links;
  for (auto& s : stubs) links.push_back(std::make_unique<AsyncLink>(s.get(), cq.get()));
  auto accept = [&] {
    auto* call = new AsyncInferCall;
    mixed.RequestInfer(&call->ctx, &call->req, &call->writer, cq.get(), cq.get(), call->tag());
  };
  accept();
  uint64_t next_id = 1;
  void* tag = nullptr;
  bool ok = false;
  while (cq->Next(&tag, &ok)) {
    const auto bits = reinterpret_cast<uintptr_t>(tag);
    if ((bits & 1) == 0) {
      const auto* t = static_cast<AsyncLink::Tag*>(tag);
      t->link->Handle(*t, ok);
      continue;
    }
    auto* call = reinterpret_cast<AsyncInferCall*>(bits & ~uintptr_t{1});
    if (call->answered || !ok) {
      delete call;
      continue;
    }
    accept();
    call->answered = true;
    call->fanout.answer = [call] {
      *call->resp.mutable_output() = call->req.tokens();
      call->writer.Finish(call->resp, grpc::Status::OK, call->tag());
    };
    const uint64_t id = next_id++;
    for (auto& link : links) link->Send(id, call->req.tokens(), &call->fanout);
  }
  return 0;
}

// ---- driver ----

struct Floor {
  double bare_s = -1;
  double two_hop_s = -1;
};

// Starts two backends and a relay of `kind`, then measures bare round trips and relayed requests
// for `seconds` each (after a warm-up), one call at a time.
absl::StatusOr<Floor> Measure(const std::string& self, const std::string& kind, double seconds) {
  std::vector<moe::common::Subprocess> backends;
  std::vector<std::string> relay_argv = {self, "relay", kind};
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<moe::common::Subprocess> b =
        moe::common::Subprocess::Spawn({self, "backend", kind});
    if (!b.ok()) return b.status();
    absl::StatusOr<int> port = b->ReadListeningPort(absl::Seconds(10));
    if (!port.ok()) return port.status();
    relay_argv.push_back("127.0.0.1:" + std::to_string(*port));
    backends.push_back(std::move(*b));
  }
  absl::StatusOr<moe::common::Subprocess> relay = moe::common::Subprocess::Spawn(relay_argv);
  if (!relay.ok()) return relay.status();
  absl::StatusOr<int> port = relay->ReadListeningPort(absl::Seconds(10));
  if (!port.ok()) return port.status();
  auto stub = moe::v1::Router::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(*port), grpc::InsecureChannelCredentials()));

  InferRequest token;
  moe::v1::Tensor* t = token.mutable_tokens();
  t->add_shape(1);
  t->add_shape(kDModel);
  t->set_dtype(moe::v1::FLOAT32);
  std::vector<float> row(kDModel);
  for (int i = 0; i < kDModel; ++i) row[i] = 0.01f * static_cast<float>(i % 97);
  t->set_data(row.data(), row.size() * sizeof(float));

  auto p50 = [&](bool relayed) -> double {
    std::vector<double> lat;
    const auto start = Clock::now();
    for (int i = 0; Since(start) < seconds + 0.2; ++i) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      const auto t0 = Clock::now();
      grpc::Status st;
      if (relayed) {
        InferResponse resp;
        st = stub->Infer(&ctx, token, &resp);
      } else {
        moe::v1::ClusterInfo info;
        st = stub->GetClusterInfo(&ctx, moe::v1::GetClusterInfoRequest(), &info);
      }
      if (!st.ok()) {
        std::fprintf(stderr, "grpc_floor: %s relay: %s\n", kind.c_str(),
                     st.error_message().c_str());
        return -1;
      }
      if (Since(start) > 0.2) lat.push_back(Since(t0));  // the first 0.2 s warm up
    }
    return Median(lat);
  };
  Floor f;
  f.bare_s = p50(false);
  f.two_hop_s = p50(true);
  if (f.bare_s < 0 || f.two_hop_s < 0) return absl::InternalError("a call failed");
  return f;
}

int RunDriver(double seconds) {
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return 1;
  self[n] = '\0';
  std::map<std::string, std::vector<double>> bare, two_hop, ratio;
  for (int pair = 0; pair < 3; ++pair) {
    for (const std::string kind : {"callback", "async"}) {
      absl::StatusOr<Floor> f = Measure(self, kind, seconds);
      if (!f.ok()) {
        std::fprintf(stderr, "grpc_floor: %s: %s\n", kind.c_str(), f.status().ToString().c_str());
        return 1;
      }
      bare[kind].push_back(f->bare_s);
      two_hop[kind].push_back(f->two_hop_s);
      ratio[kind].push_back(f->two_hop_s / f->bare_s);
      std::fprintf(stderr, "grpc_floor: %s pair %d: bare %.0f us, two hops %.0f us\n",
                   kind.c_str(), pair + 1, f->bare_s * 1e6, f->two_hop_s * 1e6);
    }
  }
  std::printf("{");
  const char* sep = "";
  for (const std::string kind : {"callback", "async"}) {
    std::printf("%s\"%s\": {\"bare_rtt_p50_s\": %g, \"two_hop_p50_s\": %g, \"in_round_trips\": %g}",
                sep, kind.c_str(), Median(bare[kind]), Median(two_hop[kind]),
                Median(ratio[kind]));
    sep = ", ";
  }
  std::printf("}\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "backend" && argc == 3) return RunBackend(std::string(argv[2]) == "async");
  if (mode == "relay" && argc == 5) {
    return RunRelay(std::string(argv[2]) == "async", {argv[3], argv[4]});
  }
  const double seconds = argc > 1 ? std::atof(argv[1]) : 2.0;
  if (seconds <= 0) {
    std::fprintf(stderr,
                 "usage: grpc_floor [SECONDS_PER_RUN] (the backend and relay modes are its own)\n");
    return 2;
  }
  return RunDriver(seconds);
}
