#include "services/collective/ring_allreduce.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "services/common/bf16.h"
#include "services/common/clock.h"
#include "services/common/notification.h"

namespace moe::collective {
namespace {

int Mod(int a, int n) { return ((a % n) + n) % n; }

size_t WireBytes(WireFormat w) { return w == WireFormat::kBFloat16 ? 2 : 4; }

void Encode(const float* src, int64_t n, WireFormat wire, Payload* out) {
  char* dst = out->Allocate(static_cast<size_t>(n) * WireBytes(wire));
  if (wire == WireFormat::kFloat32) {
    if (n > 0) std::memcpy(dst, src, sizeof(float) * n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = common::FloatToBf16(src[i]);
    std::memcpy(dst + 2 * i, &h, 2);
  }
}

// dst[i] += the m floats at p (unaligned bytes): the reduce-scatter's inner loop. At -O2 GCC keeps
// the plain loop scalar (p and dst may alias), so it adds 16 floats at a time as one vector, and
// is compiled three times: for AVX-512, AVX2 and the SSE2 baseline, picked once by what the CPU
// has. (By hand rather than target_clones: an ifunc resolver runs before ThreadSanitizer's runtime
// is up and crashes an instrumented binary at load.) Each element is still one IEEE add, so the
// sums are the scalar loop's to the bit.
__attribute__((always_inline)) inline void AddFloatsBody(const unsigned char* p, int64_t m,
                                                         float* dst) {
  typedef float Floats16 __attribute__((vector_size(64)));
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    Floats16 a, b;
    std::memcpy(&a, p + 4 * i, sizeof a);
    std::memcpy(&b, dst + i, sizeof b);
    b += a;
    std::memcpy(dst + i, &b, sizeof b);
  }
  for (; i < m; ++i) {
    float v;
    std::memcpy(&v, p + 4 * i, sizeof v);
    dst[i] += v;
  }
}

__attribute__((target("avx512f"))) void AddFloatsAvx512(const unsigned char* p, int64_t m,
                                                        float* dst) {
  AddFloatsBody(p, m, dst);
}

__attribute__((target("avx2"))) void AddFloatsAvx2(const unsigned char* p, int64_t m, float* dst) {
  AddFloatsBody(p, m, dst);
}

void AddFloatsBaseline(const unsigned char* p, int64_t m, float* dst) { AddFloatsBody(p, m, dst); }

void AddFloats(const unsigned char* p, int64_t m, float* dst) {
  using Fn = void (*)(const unsigned char*, int64_t, float*);
  static const Fn fn = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return static_cast<Fn>(AddFloatsAvx512);
    if (__builtin_cpu_supports("avx2")) return static_cast<Fn>(AddFloatsAvx2);
    return static_cast<Fn>(AddFloatsBaseline);
  }();
  fn(p, m, dst);
}

// dst[i] (+)= the m elements at p. FP32 adds straight from the bytes; BF16 decodes a block at a
// time first.
void ApplyRun(const unsigned char* p, int64_t m, WireFormat wire, bool add, float* dst) {
  if (wire == WireFormat::kFloat32) {
    if (!add) {
      if (m > 0) std::memcpy(dst, p, sizeof(float) * m);
      return;
    }
    AddFloats(p, m, dst);
    return;
  }
  constexpr int64_t kBlock = 1024;
  float buf[kBlock];
  for (int64_t at = 0; at < m; at += kBlock) {
    const int64_t b = std::min(kBlock, m - at);
    for (int64_t i = 0; i < b; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * (at + i), 2);
      buf[i] = common::Bf16ToFloat(h);
    }
    float* d = dst + at;
    if (add) {
      AddFloats(reinterpret_cast<const unsigned char*>(buf), b, d);
    } else {
      std::memcpy(d, buf, sizeof(float) * b);
    }
  }
}

// dst[i] (+)= decoded payload[i] for the n elements of a payload of n * wire size bytes, read
// piece by piece where it lies (an element may straddle two pieces).
void Apply(const Payload& payload, WireFormat wire, bool add, float* dst, int64_t n) {
  const size_t esz = WireBytes(wire);
  int64_t at = 0;
  unsigned char carry[4];
  size_t have = 0;
  for (absl::string_view piece : payload.pieces) {
    const auto* p = reinterpret_cast<const unsigned char*>(piece.data());
    size_t len = piece.size();
    if (have > 0) {
      const size_t take = std::min(esz - have, len);
      std::memcpy(carry + have, p, take);
      have += take;
      p += take;
      len -= take;
      if (have < esz) continue;
      ApplyRun(carry, 1, wire, add, dst + at);
      ++at;
      have = 0;
    }
    const int64_t whole = std::min<int64_t>(static_cast<int64_t>(len / esz), n - at);
    ApplyRun(p, whole, wire, add, dst + at);
    at += whole;
    p += whole * esz;
    len -= whole * esz;
    if (len > 0) {
      std::memcpy(carry, p, len);
      have = len;
    }
  }
}

}  // namespace

std::pair<int64_t, int64_t> Segment(int64_t length, int world, int i) {
  const int64_t base = length / world, extra = length % world;
  const int64_t begin = i * base + std::min<int64_t>(i, extra);
  return {begin, begin + base + (i < extra ? 1 : 0)};
}

namespace {

absl::Status RunRing(absl::Span<float> data, int rank, int world, uint64_t generation,
                     absl::Time deadline, PeerTransport* transport,
                     const AllReduceOptions& options) {
  if (world < 1 || rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " of ", world, " is invalid"));
  }
  const int64_t length = static_cast<int64_t>(data.size());
  const int64_t piece_elems =
      std::max<int64_t>(1, options.max_piece_bytes / static_cast<int64_t>(WireBytes(options.wire)));
  auto pieces_of = [&](int seg) {
    const auto [b, e] = Segment(length, world, seg);
    return (e - b + piece_elems - 1) / piece_elems;
  };
  const int steps = 2 * (world - 1);
  // Borrowed sends: pieces point into `data`. That is safe while the collective runs: a region is
  // changed again (reduced into, finished, or overwritten by the all-gather) only before it is
  // sent, or after what was sent from it has travelled around the ring to come back, i.e. after
  // the next rank has received it. The last pieces are waited for before returning.
  const bool borrow = options.keepalive != nullptr && options.wire == WireFormat::kFloat32 &&
                      transport->CanBorrow();
  struct Loan {
    Loan(std::shared_ptr<const void> k, std::shared_ptr<common::Notification> r)
        : keepalive(std::move(k)), returned(std::move(r)) {}
    Loan(const Loan&) = delete;
    Loan& operator=(const Loan&) = delete;
    ~Loan() { returned->Notify(); }  // the last piece that left from `data` is gone
    std::shared_ptr<const void> keepalive;
    std::shared_ptr<common::Notification> returned;
  };
  auto returned = std::make_shared<common::Notification>();
  std::shared_ptr<const Loan> loan;
  if (borrow) loan = std::make_shared<const Loan>(options.keepalive, returned);
  auto send_seg_of = [&](int step) {
    const bool gather = step >= world - 1;
    const int s = gather ? step - (world - 1) : step;
    return gather ? Mod(rank + 1 - s, world) : Mod(rank - s, world);
  };
  auto recv_seg_of = [&](int step) {
    const bool gather = step >= world - 1;
    const int s = gather ? step - (world - 1) : step;
    return gather ? Mod(rank - s, world) : Mod(rank - s - 1, world);
  };
  // Sends piece k of `step`'s segment. At the first all-gather step this rank's segment is final:
  // it is finished (averaged, rounded to the wire) piece by piece just before it leaves.
  auto send_piece = [&](int step, int64_t k) -> absl::Status {
    const auto [sb, se] = Segment(length, world, send_seg_of(step));
    Chunk c;
    c.generation = generation;
    c.step = step;
    c.piece = static_cast<int32_t>(k);
    c.offset = sb + k * piece_elems;
    c.count = std::min(piece_elems, se - c.offset);
    c.wire = options.wire;
    if (step == world - 1) {
      float* p = data.data() + c.offset;
      if (options.op == ReduceOp::kAvg) {
        for (int64_t i = 0; i < c.count; ++i) p[i] /= static_cast<float>(world);
      }
      if (options.wire == WireFormat::kBFloat16) {
        for (int64_t i = 0; i < c.count; ++i) p[i] = common::Bf16ToFloat(common::FloatToBf16(p[i]));
      }
    }
    if (borrow) {
      const char* from = reinterpret_cast<const char*>(data.data() + c.offset);
      c.payload.pieces.assign(1, absl::string_view(from, sizeof(float) * c.count));
      c.payload.owner = loan;
    } else {
      Encode(data.data() + c.offset, c.count, options.wire, &c.payload);
    }
    return transport->Send(std::move(c));
  };
  // Pipelined: the first step's pieces all leave at once (the data is ready); from then on piece
  // k of step s + 1 covers exactly what piece k of step s received, so it leaves as soon as that
  // piece has arrived and been reduced, while the rest of step s is still on the wire. Each link
  // still carries the pieces in (step, piece) order.
  if (steps > 0) {
    for (int64_t k = 0; k < pieces_of(send_seg_of(0)); ++k) {
      absl::Status st = send_piece(0, k);
      if (!st.ok()) return st;
    }
  }
  for (int step = 0; step < steps; ++step) {
    const bool gather = step >= world - 1;
    const int recv_seg = recv_seg_of(step);
    const auto [rb, re] = Segment(length, world, recv_seg);
    const int64_t recv_pieces = pieces_of(recv_seg);
    for (int64_t k = 0; k < recv_pieces; ++k) {
      absl::StatusOr<Chunk> c = transport->Recv(generation, deadline);
      if (!c.ok()) return c.status();
      const int64_t offset = rb + k * piece_elems;
      const int64_t count = std::min(piece_elems, re - offset);
      if (c->step != step || c->piece != k || c->offset != offset || c->count != count ||
          c->wire != options.wire ||
          c->payload.size() != static_cast<size_t>(count) * WireBytes(options.wire)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "rank ", rank, ": unexpected chunk (step ", c->step, " piece ", c->piece, " offset ",
            c->offset, " count ", c->count, "), expected step ", step, " piece ", k,
            " offset ", offset, " count ", count, ": ranks disagree on the buffer"));
      }
      Apply(c->payload, options.wire, !gather, data.data() + offset, count);
      if (step + 1 < steps) {
        absl::Status st = send_piece(step + 1, k);
        if (!st.ok()) return st;
      }
    }
  }
  if (loan != nullptr) {
    // Every piece that left from `data` must be off it before the caller may change it.
    loan.reset();
    if (!returned->WaitForNotificationWithTimeout(deadline - common::MonotonicNow())) {
      return absl::DeadlineExceededError(absl::StrCat(
          "rank ", rank, ": the last pieces had not left for the next rank by the deadline"));
    }
  }
  if (world == 1 && options.wire == WireFormat::kBFloat16) {
    // A ring of one still rounds like the others would.
    for (float& v : data) v = common::Bf16ToFloat(common::FloatToBf16(v));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RingAllReduce(absl::Span<float> data, int rank, int world, uint64_t generation,
                           absl::Time deadline, PeerTransport* transport,
                           const AllReduceOptions& options) {
  absl::Status st = RunRing(data, rank, world, generation, deadline, transport, options);
  if (!st.ok()) transport->Abort();  // the neighbours need not wait for their deadline
  return st;
}

absl::Status RingAllReduceFused(const std::vector<absl::Span<float>>& tensors, int rank,
                                int world, uint64_t generation, absl::Time deadline,
                                PeerTransport* transport, const AllReduceOptions& options) {
  size_t total = 0;
  for (const auto& t : tensors) total += t.size();
  // Shared: a transport that borrows the buffer may hold on to it past a failed collective.
  auto owned = std::make_shared<std::vector<float>>(total);
  std::vector<float>& fused = *owned;
  size_t at = 0;
  for (const auto& t : tensors) {
    if (!t.empty()) std::memcpy(fused.data() + at, t.data(), sizeof(float) * t.size());
    at += t.size();
  }
  AllReduceOptions o = options;
  o.keepalive = owned;
  absl::Status st = RingAllReduce(absl::MakeSpan(fused), rank, world, generation, deadline,
                                  transport, o);
  if (!st.ok()) return st;
  at = 0;
  for (const auto& t : tensors) {
    if (!t.empty()) std::memcpy(t.data(), fused.data() + at, sizeof(float) * t.size());
    at += t.size();
  }
  return absl::OkStatus();
}

}  // namespace moe::collective
