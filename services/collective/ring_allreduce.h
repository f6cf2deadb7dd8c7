#ifndef MOE_SERVICES_COLLECTIVE_RING_ALLREDUCE_H_
#define MOE_SERVICES_COLLECTIVE_RING_ALLREDUCE_H_

// Ring all-reduce over a PeerTransport.
//
// The buffer of L elements is cut into N contiguous segments (sizes differ by at most one), one
// per rank. Reduce-scatter: in step s = 0 .. N-2, rank r sends segment (r - s) mod N to rank
// r + 1 and adds the segment (r - s - 1) mod N it receives from rank r - 1 into its own copy;
// after N - 1 steps rank r holds the complete sum of segment (r + 1) mod N. All-gather: in step
// s = 0 .. N-2, rank r sends segment (r + 1 - s) mod N, now final, and overwrites segment
// (r - s) mod N with what it receives; after N - 1 more steps every rank holds every sum. Each
// rank sends and receives 2 (N - 1) / N of the buffer. Segments travel in pieces of at most
// 1 MiB of wire bytes. The first step's pieces leave at once, and every later piece as soon as
// the piece it covers has arrived and been reduced, so consecutive steps overlap (pipelining)
// and no rank waits for a whole segment. With a BF16 wire the owner rounds its final segment to
// BF16 before the all-gather, so every rank ends with the same bits.

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "services/collective/transport.h"

namespace moe::collective {

enum class ReduceOp { kSum, kAvg };

struct AllReduceOptions {
  ReduceOp op = ReduceOp::kSum;
  WireFormat wire = WireFormat::kFloat32;
  int64_t max_piece_bytes = 1 << 20;
  // When set, it owns the buffer being reduced, and FP32 pieces leave straight from it (no copy)
  // where the transport can borrow; it then keeps the buffer alive for as long as the transport
  // holds a piece, also past a failed collective. A successful collective returns only once the
  // transport has let go of every piece, so the buffer may be changed right after.
  std::shared_ptr<const void> keepalive;
};

// Reduces `data` in place across `world` ranks; this process is `rank`. Every rank must call it
// with the same length, generation and options. Errors: ABORTED when a link breaks,
// DEADLINE_EXCEEDED at `deadline` (a time on common::MonotonicNow's clock, as every deadline of
// the ring and its transports), INVALID_ARGUMENT for inconsistent chunks. On error `data` is
// left partly reduced: callers must not apply it.
absl::Status RingAllReduce(absl::Span<float> data, int rank, int world, uint64_t generation,
                           absl::Time deadline, PeerTransport* transport,
                           const AllReduceOptions& options = {});

// Several tensors fused into one buffer, reduced together, and copied back.
absl::Status RingAllReduceFused(const std::vector<absl::Span<float>>& tensors, int rank,
                                int world, uint64_t generation, absl::Time deadline,
                                PeerTransport* transport, const AllReduceOptions& options = {});

// [begin, end) of segment `i` of a buffer of `length` elements cut into `world` segments.
std::pair<int64_t, int64_t> Segment(int64_t length, int world, int i);

}  // namespace moe::collective

#endif  // MOE_SERVICES_COLLECTIVE_RING_ALLREDUCE_H_
