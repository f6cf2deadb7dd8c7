#include "services/collective/grpc_transport.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/proto_buffer_writer.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "services/common/clock.h"

namespace moe::collective {

CollectiveHub::CollectiveHub(absl::Duration unclaimed_ttl, std::function<absl::Time()> now)
    : unclaimed_ttl_(unclaimed_ttl),
      now_(now ? std::move(now) : common::MonotonicNow),
      last_sweep_(now_()) {}

bool CollectiveHub::ForgottenLocked(const std::string& group, uint64_t generation) const {
  auto it = forgotten_.find(group);
  return it != forgotten_.end() && generation <= it->second;
}

void CollectiveHub::RememberForgottenLocked(const std::string& group, uint64_t generation) {
  auto [f, fresh] = forgotten_.try_emplace(group, generation);
  if (fresh) {
    forgotten_order_.push_back(group);
    if (forgotten_order_.size() > kForgottenGroups) {
      forgotten_.erase(forgotten_order_.front());
      forgotten_order_.pop_front();
    }
  } else {
    f->second = std::max(f->second, generation);
  }
}

CollectiveHub::Mailbox& CollectiveHub::BoxLocked(const std::string& group) {
  auto [it, fresh] = boxes_.try_emplace(group);
  if (fresh) it->second.claimed = now_();
  return it->second;
}

void CollectiveHub::SweepLocked() {
  const absl::Time now = now_();
  if (now - last_sweep_ < unclaimed_ttl_ / 4) return;
  last_sweep_ = now;
  for (auto it = boxes_.begin(); it != boxes_.end();) {
    const Mailbox& box = it->second;
    if (box.takers > 0 || now - box.claimed <= unclaimed_ttl_) {
      ++it;
      continue;
    }
    // What later arrives for it is refused too, as for a collective that ended here.
    uint64_t newest = box.broken_generation;
    for (const Chunk& c : box.chunks) newest = std::max(newest, c.generation);
    RememberForgottenLocked(it->first, newest);
    it = boxes_.erase(it);
    ++swept_;
  }
}

void CollectiveHub::Deliver(const std::string& group, Chunk chunk) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    SweepLocked();
    if (ForgottenLocked(group, chunk.generation)) {
      ++refused_;  // a late chunk of a collective that has ended here
      return;
    }
    BoxLocked(group).chunks.push_back(std::move(chunk));
  }
  cv_.notify_all();
}

void CollectiveHub::Break(const std::string& group, uint64_t generation) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    SweepLocked();
    if (ForgottenLocked(group, generation)) return;
    Mailbox& box = BoxLocked(group);
    box.broken_generation = std::max(box.broken_generation, generation);
  }
  cv_.notify_all();
}

int64_t CollectiveHub::swept() const {
  std::lock_guard<std::mutex> lock(mu_);
  return swept_;
}

size_t CollectiveHub::mailboxes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return boxes_.size();
}

void CollectiveHub::Forget(const std::string& group, uint64_t generation) {
  std::lock_guard<std::mutex> lock(mu_);
  RememberForgottenLocked(group, generation);
  auto it = boxes_.find(group);
  if (it == boxes_.end()) return;
  auto& chunks = it->second.chunks;
  for (auto c = chunks.begin(); c != chunks.end();) {
    c = c->generation <= generation ? chunks.erase(c) : std::next(c);
  }
  if (chunks.empty() && it->second.broken_generation <= generation && it->second.takers == 0) {
    boxes_.erase(it);
  }
}

int64_t CollectiveHub::refused() const {
  std::lock_guard<std::mutex> lock(mu_);
  return refused_;
}

absl::StatusOr<Chunk> CollectiveHub::Take(const std::string& group, uint64_t generation,
                                          absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  // Claimed while this call runs (a sweep leaves it alone); erased only by Forget, which the
  // rank calls after its last Take.
  Mailbox& box = BoxLocked(group);
  ++box.takers;
  absl::StatusOr<Chunk> result;
  while (true) {
    while (!box.chunks.empty() && box.chunks.front().generation < generation) {
      box.chunks.pop_front();  // a message of an older, abandoned collective
      ++refused_;
    }
    auto it = std::find_if(box.chunks.begin(), box.chunks.end(),
                           [&](const Chunk& c) { return c.generation == generation; });
    if (it != box.chunks.end()) {
      result = std::move(*it);
      box.chunks.erase(it);
      break;
    }
    if (box.broken_generation >= generation) {
      result = absl::AbortedError(absl::StrCat(
          "ring ", group, ": the previous rank's stream of generation ", generation,
          " broke (it failed, gave up or was cut off)"));
      break;
    }
    if (cv_.wait_for(lock, common::TimeLeft(deadline)) == std::cv_status::timeout &&
        common::MonotonicNow() >= deadline) {
      result = absl::DeadlineExceededError(absl::StrCat(
          "ring ", group, ": nothing from the previous rank before the deadline"));
      break;
    }
  }
  --box.takers;
  box.claimed = now_();
  return result;
}

Chunk ChunkFromProto(v1::CollectiveChunk&& msg) {
  Chunk c;
  c.generation = msg.generation();
  c.step = msg.step();
  c.piece = msg.piece();
  c.offset = msg.offset();
  c.count = msg.count();
  c.wire = msg.wire() == 1 ? WireFormat::kBFloat16 : WireFormat::kFloat32;
  c.payload = Payload::Take(std::move(*msg.mutable_payload()));
  return c;
}

namespace {

constexpr int kPayloadField = v1::CollectiveChunk::kPayloadFieldNumber;

void AppendVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

}  // namespace

grpc::ByteBuffer ChunkToWire(const std::string& group, int from_rank, Chunk chunk) {
  v1::CollectiveChunk head;
  head.set_group(group);
  head.set_generation(chunk.generation);
  head.set_from_rank(from_rank);
  head.set_step(chunk.step);
  head.set_piece(chunk.piece);
  head.set_offset(chunk.offset);
  head.set_count(chunk.count);
  head.set_wire(chunk.wire == WireFormat::kBFloat16 ? 1 : 0);
  std::string prefix = head.SerializeAsString();
  // A length-delimited field appended to a serialized message is that field of the message.
  const size_t size = chunk.payload.size();
  AppendVarint((kPayloadField << 3) | 2, &prefix);
  AppendVarint(size, &prefix);
  std::vector<grpc::Slice> slices;
  slices.emplace_back(prefix);
  for (absl::string_view piece : chunk.payload.pieces) {
    if (piece.empty()) continue;
    // Each slice holds a reference to the payload's owner until gRPC has written it.
    auto* keep = new std::shared_ptr<const void>(chunk.payload.owner);
    slices.emplace_back(
        const_cast<char*>(piece.data()), piece.size(),
        [](void* k) { delete static_cast<std::shared_ptr<const void>*>(k); }, keep);
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

absl::StatusOr<Chunk> ChunkFromWire(grpc::ByteBuffer wire, std::string* group) {
  using google::protobuf::internal::WireFormatLite;
  auto owned = std::make_shared<grpc::ByteBuffer>(std::move(wire));
  grpc::ProtoBufferReader reader(owned.get());
  google::protobuf::io::CodedInputStream in(&reader);
  Chunk c;
  auto bad = [](const char* what) {
    return absl::InvalidArgumentError(absl::StrCat("collective chunk: malformed ", what));
  };
  uint64_t v = 0;
  uint32_t tag;
  while ((tag = in.ReadTag()) != 0) {
    const int field = WireFormatLite::GetTagFieldNumber(tag);
    const auto type = WireFormatLite::GetTagWireType(tag);
    const bool varint = type == WireFormatLite::WIRETYPE_VARINT;
    if (field == v1::CollectiveChunk::kGroupFieldNumber &&
        type == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      if (!WireFormatLite::ReadString(&in, group)) return bad("group");
    } else if (field == kPayloadField && type == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      uint64_t len64 = 0;
      if (!in.ReadVarint64(&len64) || len64 > static_cast<uint64_t>(INT32_MAX)) {
        return bad("payload length");
      }
      uint32_t len = static_cast<uint32_t>(len64);
      c.payload.pieces.clear();  // a repeated field: the last one wins, as in protobuf
      while (len > 0) {
        const void* data = nullptr;
        int size = 0;
        if (!in.GetDirectBufferPointer(&data, &size) || size <= 0) return bad("payload");
        const uint32_t take = std::min<uint32_t>(len, static_cast<uint32_t>(size));
        c.payload.pieces.emplace_back(static_cast<const char*>(data), take);
        if (!in.Skip(static_cast<int>(take))) return bad("payload");
        len -= take;
      }
    } else if (varint) {
      if (!in.ReadVarint64(&v)) return bad("field");
      switch (field) {
        case v1::CollectiveChunk::kGenerationFieldNumber: c.generation = v; break;
        case v1::CollectiveChunk::kStepFieldNumber: c.step = static_cast<int32_t>(v); break;
        case v1::CollectiveChunk::kPieceFieldNumber: c.piece = static_cast<int32_t>(v); break;
        case v1::CollectiveChunk::kOffsetFieldNumber: c.offset = static_cast<int64_t>(v); break;
        case v1::CollectiveChunk::kCountFieldNumber: c.count = static_cast<int64_t>(v); break;
        case v1::CollectiveChunk::kWireFieldNumber:
          c.wire = static_cast<int32_t>(v) == 1 ? WireFormat::kBFloat16 : WireFormat::kFloat32;
          break;
        default: break;  // from_rank (informational) or a field this parser does not know
      }
    } else if (!WireFormatLite::SkipField(&in, tag)) {
      return bad("field");
    }
  }
  if (!in.ConsumedEntireMessage()) return bad("message");
  c.payload.owner = std::move(owned);
  return c;
}

namespace {

class PushReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  PushReactor(CollectiveHub* hub, grpc::ByteBuffer* ack) : hub_(hub), ack_(ack) {
    StartRead(&msg_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      v1::CollectiveAck ack;
      ack.set_chunks(count_);
      bool own = false;
      grpc::GenericSerialize<grpc::ProtoBufferWriter, v1::CollectiveAck>(ack, ack_, &own);
      Finish(grpc::Status::OK);
      return;
    }
    std::string group;
    absl::StatusOr<Chunk> c = ChunkFromWire(std::move(msg_), &group);
    msg_.Clear();
    if (!c.ok()) {
      // The stream is of no use any more: the collective it feeds fails now, not at its deadline.
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!group_.empty()) hub_->Break(group_, generation_);
      }
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(c.status().message())));
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      group_ = group;
      generation_ = c->generation;
    }
    hub_->Deliver(group, *std::move(c));
    ++count_;
    StartRead(&msg_);
  }
  void OnCancel() override {
    // The sender died or was cut off mid-collective (runs concurrently with OnReadDone).
    std::lock_guard<std::mutex> lock(mu_);
    if (!group_.empty()) hub_->Break(group_, generation_);
  }
  void OnDone() override { delete this; }

 private:
  CollectiveHub* hub_;
  grpc::ByteBuffer* ack_;
  grpc::ByteBuffer msg_;
  std::mutex mu_;
  std::string group_;
  uint64_t generation_ = 0;
  int64_t count_ = 0;
};

}  // namespace

grpc::ServerReadReactor<grpc::ByteBuffer>* CollectiveService::Push(
    grpc::CallbackServerContext*, grpc::ByteBuffer* ack) {
  return new PushReactor(hub_, ack);
}

GrpcPeerTransport::GrpcPeerTransport(CollectiveHub* hub, std::string group, int rank,
                                     std::shared_ptr<grpc::Channel> next, absl::Time deadline)
    : hub_(hub), group_(std::move(group)), rank_(rank), channel_(std::move(next)) {
  ctx_.set_deadline(common::ToWallDeadline(deadline));
  // A next rank that is not reachable yet (starting, or a transient connect failure) is retried
  // until the deadline; a stream that breaks once open still fails at once.
  ctx_.set_wait_for_ready(true);
  writer_ = std::thread([this] { WriterLoop(); });
}

GrpcPeerTransport::~GrpcPeerTransport() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closing_ = true;
  }
  cv_.notify_all();
  writer_.join();
}

void GrpcPeerTransport::WriterLoop() {
  // Push with raw messages (ChunkToWire): the payload goes out from the chunk's own memory.
  static const char* const kMethod = "/moe.v1.Collective/Push";
  const grpc::internal::RpcMethod method(kMethod, grpc::internal::RpcMethod::CLIENT_STREAMING,
                                         channel_);
  grpc::ByteBuffer ack;
  // The stream opens with the first chunk. A collective that sends nothing (an empty buffer)
  // opens none, so it never waits for a next rank that, having nothing to wait for either, may
  // be gone already.
  std::unique_ptr<grpc::ClientWriter<grpc::ByteBuffer>> writer;
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return closing_ || aborted_ || !queue_.empty(); });
    if (aborted_ || queue_.empty()) break;
    Chunk c = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    if (writer == nullptr) {
      writer.reset(grpc::internal::ClientWriterFactory<grpc::ByteBuffer>::Create(
          channel_.get(), method, &ctx_, &ack));
    }
    const bool ok = writer->Write(ChunkToWire(group_, rank_, std::move(c)));
    lock.lock();
    if (!ok) {
      broken_ = true;
      broken_reason_ = "the stream to the next rank broke";
      queue_.clear();
      break;
    }
  }
  const bool half_close = !broken_ && !aborted_;
  lock.unlock();
  if (writer == nullptr) return;
  if (half_close) writer->WritesDone();
  grpc::Status st = writer->Finish();
  if (!st.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    broken_ = true;
    broken_reason_ = st.error_message();
  }
}

void GrpcPeerTransport::Abort() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    queue_.clear();
  }
  ctx_.TryCancel();  // also before the writer has started the call: it starts cancelled
  cv_.notify_all();
}

absl::Status GrpcPeerTransport::Send(Chunk chunk) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_) {
      return absl::AbortedError(absl::StrCat("ring ", group_, " rank ", rank_,
                                             ": link to the next rank is broken (",
                                             broken_reason_, ")"));
    }
    if (aborted_) return absl::AbortedError(absl::StrCat("ring ", group_, " was aborted"));
    queue_.push_back(std::move(chunk));
  }
  cv_.notify_all();
  return absl::OkStatus();
}

absl::StatusOr<Chunk> GrpcPeerTransport::Recv(uint64_t generation, absl::Time deadline) {
  // Wake up periodically to notice a broken outgoing link too: the ring is dead either way.
  while (true) {
    const absl::Time until = std::min(deadline, common::MonotonicNow() + absl::Milliseconds(50));
    absl::StatusOr<Chunk> c = hub_->Take(group_, generation, until);
    if (c.ok() || c.status().code() != absl::StatusCode::kDeadlineExceeded || until >= deadline) {
      return c;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_) {
      return absl::AbortedError(absl::StrCat("ring ", group_, " rank ", rank_,
                                             ": link to the next rank is broken (",
                                             broken_reason_, ")"));
    }
  }
}

}  // namespace moe::collective
