#ifndef MOE_SERVICES_COMMON_STREAM_OUTBOX_H_
#define MOE_SERVICES_COMMON_STREAM_OUTBOX_H_

// The write side of a bidirectional server stream whose responses are produced on other threads:
// responses queue and are written one at a time (the next one started from OnWriteDone), and the
// RPC finishes once the client has half-closed, nothing is pending and everything is written.
// A server going away calls CloseWhenIdle: the reactor reads no more requests (ReadingLocked) and
// the RPC finishes with the given status once what was accepted is answered.
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
  std::optional<grpc::Status> close_when_idle;     // set by CloseWhenIdle

  // Whether the reactor should read another request (under `mu`).
  bool ReadingLocked() const { return !finished && !close_when_idle.has_value(); }

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
    if (pending != 0 || !outbox.empty() || writing) return;
    if (reads_done) {
      FinishLocked(grpc::Status::OK);
    } else if (close_when_idle.has_value()) {
      FinishLocked(*close_when_idle);
    }
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
  // Ends the stream with `status` once every accepted request is answered and written (at once
  // when none is); no request is read after this. A read already started may still deliver one:
  // answered if the stream has not ended yet, dropped by the reactor if it has (the status tells
  // the client to resend). A client that half-closed first gets OK as usual.
  void CloseWhenIdle(const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu);
    if (!close_when_idle.has_value()) close_when_idle = status;
    MaybeFinishLocked();
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
