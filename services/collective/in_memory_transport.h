#ifndef MOE_SERVICES_COLLECTIVE_IN_MEMORY_TRANSPORT_H_
#define MOE_SERVICES_COLLECTIVE_IN_MEMORY_TRANSPORT_H_

// N ranks in one process (threads) joined in a ring of mailboxes, with fault injection: a rank
// can be killed (its links break) or stalled (it stops reading and writing).

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "services/collective/transport.h"

namespace moe::collective {

class InMemoryRing {
 public:
  explicit InMemoryRing(int world);
  ~InMemoryRing();
  // The transport of `rank` (owned by the ring).
  PeerTransport* transport(int rank);
  // Breaks both links of `rank`: its neighbours' Send/Recv on them fail with ABORTED.
  void Kill(int rank);
  // Delivers a chunk to `rank` as if the previous rank had sent it (for stale-message tests).
  void Inject(int rank, Chunk chunk);
  // Chunks dropped because their generation was older than the receiver's.
  int64_t refused() const;

  class Transport;

 private:
  struct Mailbox {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Chunk> chunks;
    bool broken = false;
  };
  friend class Transport;
  int world_;
  std::vector<std::unique_ptr<Mailbox>> inbox_;  // inbox_[r]: chunks for rank r
  std::vector<std::unique_ptr<Transport>> transports_;
  mutable std::mutex mu_;
  int64_t refused_ = 0;
};

}  // namespace moe::collective

#endif  // MOE_SERVICES_COLLECTIVE_IN_MEMORY_TRANSPORT_H_
