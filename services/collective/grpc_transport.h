#ifndef MOE_SERVICES_COLLECTIVE_GRPC_TRANSPORT_H_
#define MOE_SERVICES_COLLECTIVE_GRPC_TRANSPORT_H_

// The ring's gRPC transport: a moe.v1.Collective service receives chunks from the previous rank
// into a hub of mailboxes (one per ring group); each rank's GrpcPeerTransport streams its chunks
// to the next rank from a writer thread, so Send never waits for the receiver.

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "moe/v1/collective.grpc.pb.h"
#include "services/collective/transport.h"

namespace moe::collective {

// Chunks received for each ring group, waiting for their rank to take them.
// A received message as the ring's chunk (the payload is moved, not copied).
Chunk ChunkFromProto(v1::CollectiveChunk&& msg);

// The wire form of a CollectiveChunk without protobuf's copies: the small fields serialized,
// then the payload field whose bytes are the chunk's own pieces (referenced, not copied).
grpc::ByteBuffer ChunkToWire(const std::string& group, int from_rank, Chunk chunk);
// A received CollectiveChunk as the ring's chunk, its payload pointing into the message's slices
// (kept alive with it). `group` gets the ring's name. INVALID_ARGUMENT when it does not parse.
absl::StatusOr<Chunk> ChunkFromWire(grpc::ByteBuffer wire, std::string* group);

class CollectiveHub {
 public:
  // A mailbox no rank has taken from for `unclaimed_ttl` (since it opened, or since the last
  // Take on it ended: a rank polls in short Takes, see GrpcPeerTransport::Recv) is dropped, and its
  // collective forgotten: chunks sent to a rank that never joined (its part of an aborted step
  // never ran) would otherwise be kept until the process exits, a whole reduce-scatter's worth
  // per step. It must outlast any collective's deadline. `now` is the clock (tests move it);
  // null: a monotonic one, so that a change of the wall clock drops nothing early.
  explicit CollectiveHub(absl::Duration unclaimed_ttl = absl::Seconds(150),
                         std::function<absl::Time()> now = nullptr);
  void Deliver(const std::string& group, Chunk chunk);
  // The incoming stream of `generation` for `group` broke: its Take fails with ABORTED.
  void Break(const std::string& group, uint64_t generation);
  absl::StatusOr<Chunk> Take(const std::string& group, uint64_t generation, absl::Time deadline);
  // Drops a finished collective's leftovers (chunks of `generation` and older). Chunks and
  // breaks of it that arrive later are dropped too: they would otherwise open a mailbox nobody
  // takes from (a training step's group names are used once).
  void Forget(const std::string& group, uint64_t generation);
  int64_t refused() const;
  // Mailboxes open (for tests: none is left once every collective is forgotten).
  size_t mailboxes() const;
  // Mailboxes dropped unclaimed so far.
  int64_t swept() const;

 private:
  struct Mailbox {
    std::deque<Chunk> chunks;
    uint64_t broken_generation = 0;  // 0: none
    absl::Time claimed;  // when it opened, or the last Take on it ended
    int takers = 0;      // Take calls waiting on it: never swept while one is
  };
  // Whether `generation` of `group` was forgotten (mu_ held).
  bool ForgottenLocked(const std::string& group, uint64_t generation) const;
  // Marks `generation` and older of `group` as forgotten (mu_ held).
  void RememberForgottenLocked(const std::string& group, uint64_t generation);
  // The mailbox of `group`, opened now if there is none (mu_ held).
  Mailbox& BoxLocked(const std::string& group);
  // Drops mailboxes unclaimed past the ttl; runs at most once per quarter ttl (mu_ held).
  void SweepLocked();

  const absl::Duration unclaimed_ttl_;
  const std::function<absl::Time()> now_;
  absl::Time last_sweep_;
  int64_t swept_ = 0;

  static constexpr size_t kForgottenGroups = 4096;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, Mailbox> boxes_;
  // The newest forgotten generation of the most recent groups, oldest group first out.
  std::map<std::string, uint64_t> forgotten_;
  std::deque<std::string> forgotten_order_;
  int64_t refused_ = 0;
};

// The service that feeds a hub. Push is served raw (ByteBuffer in, parsed by ChunkFromWire) so
// a chunk's payload reaches the ring without being copied out of the received slices.
class CollectiveService final
    : public v1::Collective::WithRawCallbackMethod_Push<v1::Collective::Service> {
 public:
  explicit CollectiveService(CollectiveHub* hub) : hub_(hub) {}
  grpc::ServerReadReactor<grpc::ByteBuffer>* Push(grpc::CallbackServerContext* ctx,
                                                  grpc::ByteBuffer* ack) override;

 private:
  CollectiveHub* hub_;
};

class GrpcPeerTransport final : public PeerTransport {
 public:
  // `next` reaches rank + 1's Collective service; the outgoing stream lives until `deadline`.
  GrpcPeerTransport(CollectiveHub* hub, std::string group, int rank,
                    std::shared_ptr<grpc::Channel> next, absl::Time deadline);
  ~GrpcPeerTransport() override;  // flushes and closes the outgoing stream

  absl::Status Send(Chunk chunk) override;
  absl::StatusOr<Chunk> Recv(uint64_t generation, absl::Time deadline) override;
  // gRPC copies a message's bytes into the socket before the next rank can have them, and drops
  // its slices (and so the payload's owner) once written.
  bool CanBorrow() const override { return true; }
  // Cancels the outgoing stream (the next rank's Push sees the cancellation and breaks the
  // collective there) and drops what was still queued.
  void Abort() override;

 private:
  void WriterLoop();

  CollectiveHub* hub_;
  const std::string group_;
  const int rank_;
  std::shared_ptr<grpc::Channel> channel_;
  grpc::ClientContext ctx_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Chunk> queue_;
  bool closing_ = false;
  bool aborted_ = false;
  bool broken_ = false;
  std::string broken_reason_;
  std::thread writer_;
};

}  // namespace moe::collective

#endif  // MOE_SERVICES_COLLECTIVE_GRPC_TRANSPORT_H_
