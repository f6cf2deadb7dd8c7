#ifndef MOE_SERVICES_COLLECTIVE_TRANSPORT_H_
#define MOE_SERVICES_COLLECTIVE_TRANSPORT_H_

// The small transport interface the ring all-reduce is written against: each rank sends chunks
// to the next rank and receives them from the previous one. No gRPC here.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace moe::collective {

enum class WireFormat : int32_t { kFloat32 = 0, kBFloat16 = 1 };

// A chunk's bytes as contiguous pieces, in order, kept alive by `owner`: the sender's own
// buffer, or the slices of a received message, so nothing is copied between the ring and the
// wire on either side.
struct Payload {
  std::vector<absl::string_view> pieces;
  std::shared_ptr<const void> owner;

  size_t size() const;
  // Fresh memory of `n` bytes (not zeroed) as the only piece, to be filled through the result.
  char* Allocate(size_t n);
  // A copy of `bytes` as the only piece.
  static Payload Copy(absl::string_view bytes);
  // `bytes` itself, moved, as the only piece.
  static Payload Take(std::string bytes);
};

// One piece of one ring step. `payload` holds `count` elements in `wire` format.
struct Chunk {
  uint64_t generation = 0;  // which collective this belongs to
  int32_t step = 0;         // 0 .. 2(N-1)-1
  int32_t piece = 0;        // index within the step
  int64_t offset = 0;       // first element of the buffer it covers
  int64_t count = 0;        // elements
  WireFormat wire = WireFormat::kFloat32;
  Payload payload;
};

class PeerTransport {
 public:
  virtual ~PeerTransport() = default;
  // Queues `chunk` for the next rank and returns without waiting for it to be read. ABORTED when
  // the link to the next rank is broken.
  virtual absl::Status Send(Chunk chunk) = 0;
  // The next chunk of `generation` from the previous rank. Chunks of an older generation are
  // refused (dropped). ABORTED when the link from the previous rank is broken, DEADLINE_EXCEEDED
  // at `deadline`.
  virtual absl::StatusOr<Chunk> Recv(uint64_t generation, absl::Time deadline) = 0;
  // Whether Send may be given payloads that borrow the caller's memory: the transport only ever
  // reads it before the chunk has reached the next rank, and keeps `owner` (which keeps the
  // memory alive) until it no longer reads it. A transport that hands the bytes themselves to
  // the receiver (in memory) must not.
  virtual bool CanBorrow() const { return false; }
  // Called when this rank gives up the collective (any error, its own or a neighbour's): tells
  // the next rank, whose Recv then fails with ABORTED at once instead of at its deadline, so that
  // one failure goes round the ring in moments. Nothing is sent after it.
  virtual void Abort() {}
};

}  // namespace moe::collective

#endif  // MOE_SERVICES_COLLECTIVE_TRANSPORT_H_
