// Structure-aware fuzzing of the ring all-reduce's receiving side: a rank of a ring whose
// previous rank sends arbitrary chunks (moe.v1.CollectiveChunk, turned into transport chunks
// exactly as the gRPC service does: serialized, cut into slices at fuzzed places and parsed by
// ChunkFromWire) of any generation, step, piece, offset, count, wire format and payload. The wire
// parser must agree with protobuf's on every chunk; the rank must end with OK or an error, never
// crash, overrun or hang.

#include <cstdlib>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "fuzz/fuzz_inputs.pb.h"
#include "fuzz/proto_mutator.h"
#include "services/collective/grpc_transport.h"
#include "services/collective/ring_allreduce.h"
#include "services/common/clock.h"

MOE_PROTO_FUZZER(moe::fuzz::CollectiveInput)

namespace {
// Sends go nowhere; receives come from the hub the fuzzed chunks were delivered to.
class HubTransport final : public moe::collective::PeerTransport {
 public:
  explicit HubTransport(moe::collective::CollectiveHub* hub) : hub_(hub) {}
  absl::Status Send(moe::collective::Chunk) override { return absl::OkStatus(); }
  absl::StatusOr<moe::collective::Chunk> Recv(uint64_t generation, absl::Time deadline) override {
    return hub_->Take("fuzz", generation, deadline);
  }

 private:
  moe::collective::CollectiveHub* hub_;
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::fuzz::CollectiveInput in;
  if (!in.ParseFromArray(data, static_cast<int>(size))) return 0;
  const int world = 2 + static_cast<int>(in.world() % 6);
  const int rank = static_cast<int>(in.rank() % static_cast<uint32_t>(world));
  std::vector<float> buf(in.length() % 5000, 1.0f);
  moe::collective::CollectiveHub hub;
  const size_t cut = 1 + in.max_chunk() % 97;
  for (moe::v1::CollectiveChunk& c : *in.mutable_chunks()) {
    // The message as it arrives: its bytes in slices of `cut` bytes (payload elements straddle).
    const std::string bytes = c.SerializeAsString();
    std::vector<grpc::Slice> slices;
    for (size_t at = 0; at < bytes.size(); at += cut) {
      slices.emplace_back(bytes.data() + at, std::min(cut, bytes.size() - at));
    }
    std::string group;
    absl::StatusOr<moe::collective::Chunk> wire =
        moe::collective::ChunkFromWire(grpc::ByteBuffer(slices.data(), slices.size()), &group);
    if (!wire.ok()) std::abort();  // protobuf serialized it: it must parse
    moe::collective::Chunk ref = moe::collective::ChunkFromProto(moe::v1::CollectiveChunk(c));
    std::string got;
    for (absl::string_view piece : wire->payload.pieces) got.append(piece.data(), piece.size());
    if (group != c.group() || wire->generation != ref.generation || wire->step != ref.step ||
        wire->piece != ref.piece || wire->offset != ref.offset || wire->count != ref.count ||
        wire->wire != ref.wire || got != c.payload()) {
      std::abort();  // the two parsers disagree
    }
    hub.Deliver("fuzz", *std::move(wire));
  }
  HubTransport transport(&hub);
  moe::collective::AllReduceOptions opts;
  opts.max_piece_bytes = 4 * (1 + static_cast<int64_t>(in.max_chunk() % 2048));
  opts.op = in.max_chunk() % 2 ? moe::collective::ReduceOp::kAvg : moe::collective::ReduceOp::kSum;
  opts.wire = in.bf16() ? moe::collective::WireFormat::kBFloat16
                        : moe::collective::WireFormat::kFloat32;
  // The deadline has passed: whatever did not arrive ends the collective at once.
  absl::Status st =
      moe::collective::RingAllReduce(absl::MakeSpan(buf), rank, world, in.generation(),
                                     moe::common::MonotonicNow(), &transport, opts);
  (void)st;
  return 0;
}
