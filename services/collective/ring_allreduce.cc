#include "services/collective/ring_allreduce.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "services/common/bf16.h"

namespace moe::collective {
namespace {

int Mod(int a, int n) { return ((a % n) + n) % n; }

size_t WireBytes(WireFormat w) { return w == WireFormat::kBFloat16 ? 2 : 4; }

void Encode(const float* src, int64_t n, WireFormat wire, std::string* out) {
  out->resize(static_cast<size_t>(n) * WireBytes(wire));
  if (wire == WireFormat::kFloat32) {
    if (n > 0) std::memcpy(out->data(), src, sizeof(float) * n);
    return;
  }
  auto* dst = reinterpret_cast<unsigned char*>(out->data());
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = common::FloatToBf16(src[i]);
    std::memcpy(dst + 2 * i, &h, 2);
  }
}

// dst[i] (+)= decoded payload[i], a block at a time so the loops vectorise.
void Apply(const std::string& payload, WireFormat wire, bool add, float* dst, int64_t n) {
  const auto* p = reinterpret_cast<const unsigned char*>(payload.data());
  constexpr int64_t kBlock = 1024;
  float buf[kBlock];
  for (int64_t at = 0; at < n; at += kBlock) {
    const int64_t m = std::min(kBlock, n - at);
    if (wire == WireFormat::kFloat32) {
      std::memcpy(buf, p + 4 * at, sizeof(float) * m);
    } else {
      uint16_t half[kBlock];
      std::memcpy(half, p + 2 * at, 2 * m);
      for (int64_t i = 0; i < m; ++i) buf[i] = common::Bf16ToFloat(half[i]);
    }
    float* d = dst + at;
    if (add) {
      for (int64_t i = 0; i < m; ++i) d[i] += buf[i];
    } else {
      std::memcpy(d, buf, sizeof(float) * m);
    }
  }
}

}  // namespace

std::pair<int64_t, int64_t> Segment(int64_t length, int world, int i) {
  const int64_t base = length / world, extra = length % world;
  const int64_t begin = i * base + std::min<int64_t>(i, extra);
  return {begin, begin + base + (i < extra ? 1 : 0)};
}

absl::Status RingAllReduce(absl::Span<float> data, int rank, int world, uint64_t generation,
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
  for (int step = 0; step < steps; ++step) {
    const bool gather = step >= world - 1;
    const int s = gather ? step - (world - 1) : step;
    const int send_seg = gather ? Mod(rank + 1 - s, world) : Mod(rank - s, world);
    const int recv_seg = gather ? Mod(rank - s, world) : Mod(rank - s - 1, world);
    if (step == world - 1) {
      // This rank owns segment (rank + 1) mod N: finish it before anyone copies it.
      const auto [b, e] = Segment(length, world, send_seg);
      if (options.op == ReduceOp::kAvg) {
        for (int64_t i = b; i < e; ++i) data[i] /= static_cast<float>(world);
      }
      if (options.wire == WireFormat::kBFloat16) {
        for (int64_t i = b; i < e; ++i) data[i] = common::Bf16ToFloat(common::FloatToBf16(data[i]));
      }
    }
    const auto [sb, se] = Segment(length, world, send_seg);
    const auto [rb, re] = Segment(length, world, recv_seg);
    const int64_t send_pieces = pieces_of(send_seg), recv_pieces = pieces_of(recv_seg);
    // Piece k of this step goes out, then piece k comes in; sends never wait for the receiver.
    for (int64_t k = 0; k < std::max(send_pieces, recv_pieces); ++k) {
      if (k < send_pieces) {
        Chunk c;
        c.generation = generation;
        c.step = step;
        c.piece = static_cast<int32_t>(k);
        c.offset = sb + k * piece_elems;
        c.count = std::min(piece_elems, se - c.offset);
        c.wire = options.wire;
        Encode(data.data() + c.offset, c.count, options.wire, &c.payload);
        absl::Status st = transport->Send(std::move(c));
        if (!st.ok()) return st;
      }
      if (k < recv_pieces) {
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
      }
    }
  }
  if (world == 1 && options.wire == WireFormat::kBFloat16) {
    // A ring of one still rounds like the others would.
    for (float& v : data) v = common::Bf16ToFloat(common::FloatToBf16(v));
  }
  return absl::OkStatus();
}

absl::Status RingAllReduceFused(const std::vector<absl::Span<float>>& tensors, int rank,
                                int world, uint64_t generation, absl::Time deadline,
                                PeerTransport* transport, const AllReduceOptions& options) {
  size_t total = 0;
  for (const auto& t : tensors) total += t.size();
  std::vector<float> fused(total);
  size_t at = 0;
  for (const auto& t : tensors) {
    if (!t.empty()) std::memcpy(fused.data() + at, t.data(), sizeof(float) * t.size());
    at += t.size();
  }
  absl::Status st = RingAllReduce(absl::MakeSpan(fused), rank, world, generation, deadline,
                                  transport, options);
  if (!st.ok()) return st;
  at = 0;
  for (const auto& t : tensors) {
    if (!t.empty()) std::memcpy(t.data(), fused.data() + at, sizeof(float) * t.size());
    at += t.size();
  }
  return absl::OkStatus();
}

}  // namespace moe::collective
