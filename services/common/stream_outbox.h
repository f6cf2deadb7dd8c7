#ifndef MOE_SERVICES_COMMON_STREAM_OUTBOX_H_
#define MOE_SERVICES_COMMON_STREAM_OUTBOX_H_

// The write side of a bidirectional server stream whose responses are produced on other threads:
// responses queue and are written one at a time (the next one started from OnWriteDone), and the
// RPC finishes once the client has half-closed, nothing is pending and everything is written.
// It outlives its reactor: `reactor` is cleared in OnDone, after which responses are dropped.

#include <deque>
#include <memory>
#include <mutex>
#include <optional>

#include <grpcpp/grpcpp.h>

namespace moe::common {

template <typename Request, typename Response>
struct StreamOutbox {
  std::mutex mu;
  grpc::ServerBidiReactor<Request, Response>* reactor = nullptr;
  std::deque<std::unique_ptr<Response>> outbox;
  bool writing = false;
  bool reads_done = false;
  bool finished = false;
  int pending = 0;  // requests accepted and not yet answered
  std::optional<grpc::Status> finish_after_write;  // a Finish waiting for the write in flight

  void PushLocked(std::unique_ptr<Response> r) {
    if (reactor == nullptr || finished) return;
    outbox.push_back(std::move(r));
    WriteNextLocked();
  }
  void WriteNextLocked() {
    if (writing || finished || outbox.empty() || reactor == nullptr) return;
    writing = true;
    reactor->StartWrite(outbox.front().get());
  }
  void MaybeFinishLocked() {
    if (reads_done && pending == 0 && outbox.empty() && !writing) FinishLocked(grpc::Status::OK);
  }
  void FinishLocked(const grpc::Status& status) {
    if (finished || reactor == nullptr) return;
    finished = true;
    if (writing) {
      // gRPC takes no Finish while a write is outstanding: it follows in WriteDone. What is
      // queued behind the write in flight is dropped.
      finish_after_write = status;
      outbox.resize(1);
      return;
    }
    reactor->Finish(status);
  }
  void End(const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu);
    FinishLocked(status);
  }
  // The reactor's OnReadDone(false), OnWriteDone and OnDone.
  void ReadsDone() {
    std::lock_guard<std::mutex> lock(mu);
    reads_done = true;
    MaybeFinishLocked();
  }
  void WriteDone(bool ok) {
    std::lock_guard<std::mutex> lock(mu);
    writing = false;
    if (!outbox.empty()) outbox.pop_front();
    if (finish_after_write.has_value()) {
      if (reactor != nullptr) reactor->Finish(*finish_after_write);
      finish_after_write.reset();
      return;
    }
    if (!ok) {
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "stream broken"));
      return;
    }
    WriteNextLocked();
    MaybeFinishLocked();
  }
  void Detach() {
    std::lock_guard<std::mutex> lock(mu);
    reactor = nullptr;
    outbox.clear();
  }
};

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_STREAM_OUTBOX_H_
