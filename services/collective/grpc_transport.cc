#include "services/collective/grpc_transport.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace moe::collective {

void CollectiveHub::Deliver(const std::string& group, Chunk chunk) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    boxes_[group].chunks.push_back(std::move(chunk));
  }
  cv_.notify_all();
}

void CollectiveHub::Break(const std::string& group, uint64_t generation) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    Mailbox& box = boxes_[group];
    box.broken_generation = std::max(box.broken_generation, generation);
  }
  cv_.notify_all();
}

void CollectiveHub::Forget(const std::string& group, uint64_t generation) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = boxes_.find(group);
  if (it == boxes_.end()) return;
  auto& chunks = it->second.chunks;
  for (auto c = chunks.begin(); c != chunks.end();) {
    c = c->generation <= generation ? chunks.erase(c) : std::next(c);
  }
  if (chunks.empty() && it->second.broken_generation <= generation) boxes_.erase(it);
}

int64_t CollectiveHub::refused() const {
  std::lock_guard<std::mutex> lock(mu_);
  return refused_;
}

absl::StatusOr<Chunk> CollectiveHub::Take(const std::string& group, uint64_t generation,
                                          absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    Mailbox& box = boxes_[group];
    while (!box.chunks.empty() && box.chunks.front().generation < generation) {
      box.chunks.pop_front();  // a message of an older, abandoned collective
      ++refused_;
    }
    for (auto it = box.chunks.begin(); it != box.chunks.end(); ++it) {
      if (it->generation == generation) {
        Chunk c = std::move(*it);
        box.chunks.erase(it);
        return c;
      }
    }
    if (box.broken_generation >= generation) {
      return absl::AbortedError(absl::StrCat("ring ", group, ": the previous rank's stream of "
                                             "generation ", generation, " broke"));
    }
    if (cv_.wait_until(lock, absl::ToChronoTime(deadline)) == std::cv_status::timeout &&
        absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "ring ", group, ": nothing from the previous rank before the deadline"));
    }
  }
}

Chunk ChunkFromProto(v1::CollectiveChunk&& msg) {
  Chunk c;
  c.generation = msg.generation();
  c.step = msg.step();
  c.piece = msg.piece();
  c.offset = msg.offset();
  c.count = msg.count();
  c.wire = msg.wire() == 1 ? WireFormat::kBFloat16 : WireFormat::kFloat32;
  c.payload = std::move(*msg.mutable_payload());
  return c;
}

namespace {

class PushReactor final : public grpc::ServerReadReactor<v1::CollectiveChunk> {
 public:
  PushReactor(CollectiveHub* hub, v1::CollectiveAck* ack) : hub_(hub), ack_(ack) {
    StartRead(&msg_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      ack_->set_chunks(count_);
      Finish(grpc::Status::OK);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      group_ = msg_.group();
      generation_ = msg_.generation();
    }
    hub_->Deliver(group_, ChunkFromProto(std::move(msg_)));
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
  v1::CollectiveAck* ack_;
  v1::CollectiveChunk msg_;
  std::mutex mu_;
  std::string group_;
  uint64_t generation_ = 0;
  int64_t count_ = 0;
};

}  // namespace

grpc::ServerReadReactor<v1::CollectiveChunk>* CollectiveService::Push(
    grpc::CallbackServerContext*, v1::CollectiveAck* ack) {
  return new PushReactor(hub_, ack);
}

GrpcPeerTransport::GrpcPeerTransport(CollectiveHub* hub, std::string group, int rank,
                                     std::shared_ptr<grpc::Channel> next, absl::Time deadline)
    : hub_(hub), group_(std::move(group)), rank_(rank), stub_(v1::Collective::NewStub(next)) {
  ctx_.set_deadline(absl::ToChronoTime(deadline));
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
  v1::CollectiveAck ack;
  std::unique_ptr<grpc::ClientWriter<v1::CollectiveChunk>> writer = stub_->Push(&ctx_, &ack);
  v1::CollectiveChunk msg;
  msg.set_group(group_);
  msg.set_from_rank(rank_);
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return closing_ || !queue_.empty(); });
    if (queue_.empty()) break;
    Chunk c = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    msg.set_generation(c.generation);
    msg.set_step(c.step);
    msg.set_piece(c.piece);
    msg.set_offset(c.offset);
    msg.set_count(c.count);
    msg.set_wire(c.wire == WireFormat::kBFloat16 ? 1 : 0);
    *msg.mutable_payload() = std::move(c.payload);
    const bool ok = writer->Write(msg);
    lock.lock();
    if (!ok) {
      broken_ = true;
      broken_reason_ = "the stream to the next rank broke";
      queue_.clear();
      break;
    }
  }
  const bool broken = broken_;
  lock.unlock();
  if (!broken) writer->WritesDone();
  grpc::Status st = writer->Finish();
  if (!st.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    broken_ = true;
    broken_reason_ = st.error_message();
  }
}

absl::Status GrpcPeerTransport::Send(Chunk chunk) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_) {
      return absl::AbortedError(absl::StrCat("ring ", group_, " rank ", rank_,
                                             ": link to the next rank is broken (",
                                             broken_reason_, ")"));
    }
    queue_.push_back(std::move(chunk));
  }
  cv_.notify_all();
  return absl::OkStatus();
}

absl::StatusOr<Chunk> GrpcPeerTransport::Recv(uint64_t generation, absl::Time deadline) {
  // Wake up periodically to notice a broken outgoing link too: the ring is dead either way.
  while (true) {
    const absl::Time until = std::min(deadline, absl::Now() + absl::Milliseconds(50));
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
