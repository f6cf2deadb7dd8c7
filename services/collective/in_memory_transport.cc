#include "services/collective/in_memory_transport.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "services/common/clock.h"

namespace moe::collective {

class InMemoryRing::Transport : public PeerTransport {
 public:
  Transport(InMemoryRing* ring, int rank) : ring_(ring), rank_(rank) {}

  absl::Status Send(Chunk chunk) override {
    Mailbox& box = *ring_->inbox_[(rank_ + 1) % ring_->world_];
    std::lock_guard<std::mutex> lock(box.mu);
    if (box.broken) {
      return absl::AbortedError(absl::StrCat("rank ", rank_, ": link to the next rank is broken"));
    }
    box.chunks.push_back(std::move(chunk));
    box.cv.notify_all();
    return absl::OkStatus();
  }

  absl::StatusOr<Chunk> Recv(uint64_t generation, absl::Time deadline) override {
    Mailbox& box = *ring_->inbox_[rank_];
    std::unique_lock<std::mutex> lock(box.mu);
    while (true) {
      while (!box.chunks.empty() && box.chunks.front().generation < generation) {
        box.chunks.pop_front();
        std::lock_guard<std::mutex> rl(ring_->mu_);
        ++ring_->refused_;
      }
      if (box.broken) {
        return absl::AbortedError(
            absl::StrCat("rank ", rank_, ": link from the previous rank is broken"));
      }
      // A chunk of a newer generation (the previous rank is already in the next collective)
      // waits in the mailbox for that collective, as on the gRPC transport.
      for (auto it = box.chunks.begin(); it != box.chunks.end(); ++it) {
        if (it->generation == generation) {
          Chunk c = std::move(*it);
          box.chunks.erase(it);
          return c;
        }
      }
      if (box.cv.wait_for(lock, common::TimeLeft(deadline)) == std::cv_status::timeout &&
          !box.broken) {
        return absl::DeadlineExceededError(
            absl::StrCat("rank ", rank_, ": no data from the previous rank before the deadline"));
      }
    }
  }

 private:
  InMemoryRing* ring_;
  int rank_;
};

InMemoryRing::InMemoryRing(int world) : world_(world) {
  for (int r = 0; r < world; ++r) {
    inbox_.push_back(std::make_unique<Mailbox>());
    transports_.push_back(std::make_unique<Transport>(this, r));
  }
}

InMemoryRing::~InMemoryRing() = default;

PeerTransport* InMemoryRing::transport(int rank) { return transports_[rank].get(); }

void InMemoryRing::Kill(int rank) {
  for (int r : {rank, (rank + 1) % world_}) {
    Mailbox& box = *inbox_[r];
    std::lock_guard<std::mutex> lock(box.mu);
    box.broken = true;
    box.cv.notify_all();
  }
}

void InMemoryRing::Inject(int rank, Chunk chunk) {
  Mailbox& box = *inbox_[rank];
  std::lock_guard<std::mutex> lock(box.mu);
  box.chunks.push_back(std::move(chunk));
  box.cv.notify_all();
}

int64_t InMemoryRing::refused() const {
  std::lock_guard<std::mutex> lock(mu_);
  return refused_;
}

}  // namespace moe::collective
