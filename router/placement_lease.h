#ifndef MOE_ROUTER_PLACEMENT_LEASE_H_
#define MOE_ROUTER_PLACEMENT_LEASE_H_

// The placement lease: with a coordinator, one router at a time places experts on its members,
// the one that holds the coordinator's placement lease. A router asks for it before its first
// placement, and stands by (NOT_SERVING, saying which router holds it) until it gets it; the
// holder renews it every quarter lease. A holder told that another router holds it now (it
// stalled for a whole lease, and a router standing by took over) places nothing more and stops.
// A holder whose last grant is older than a lease (the coordinator does not answer) keeps serving
// but changes no placement until it is granted again: no other router may place meanwhile, but
// this one cannot tell. The lease's time is counted from the ask that was granted, by this
// router's clock: the coordinator counts from its answer, so the router's view ends first.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "moe/v1/coordinator.grpc.pb.h"
#include "router/router_metrics.h"
#include "router/shard_client.h"

namespace moe::router {

class PlacementLease {
 public:
  struct Hooks {
    // Granted again under another epoch than the one held (this router went a whole lease
    // without renewing it; another may have placed meanwhile): the router catches up.
    std::function<void()> regranted;
    // Lost: another router places the shards now (or Lose was called). Called once, at once,
    // on the thread that found it, with no lock of the lease held; that thread may hold the
    // router's own locks (a switch asks), so it must not wait for them.
    std::function<void()> lost;
    // Called once after `lost`, on Start's thread as its loop ends (not for a loss that comes
    // after Stop ended it): where the router drops what it placed, taking the locks it needs.
    std::function<void()> loop_ended_lost;
  };
  // No hook may call Start, Stop or the destructor.

  // `coordinator` (named `coordinator_address` in messages) outlives this object. `epochs`
  // holds the granted epoch (`held`), which the router sends with each load and unload, and
  // the highest the shards report (`seen`), asked past. `metrics` gets
  // moe_router_placement_lease_held.
  PlacementLease(v1::Coordinator::StubInterface* coordinator, std::string coordinator_address,
                 std::string router_id, std::shared_ptr<LeaseEpochs> epochs, RouterMetrics* metrics,
                 Hooks hooks);
  // Ends Start's thread as Stop does; the lease is not given up.
  ~PlacementLease();
  PlacementLease(const PlacementLease&) = delete;
  PlacementLease& operator=(const PlacementLease&) = delete;

  // This router's address ("HOST:PORT", for the other routers' messages), once its server has
  // a port: nothing is asked before.
  void SetAddress(std::string address);
  // Asks in a thread of its own: every 250 ms until granted, then every quarter lease, until
  // Stop or the loss of the lease (then Hooks::loop_ended_lost). Once at most.
  void Start();
  // Ends Start's thread; the lease is kept until Release or its end.
  void Stop();
  // Gives the lease up, so that a router standing by takes over at its next ask.
  void Release();

  // Asks the coordinator once (or renews), and records the answer. Any thread.
  void Ask();
  // Whether this router may change the placement now: it holds a lease granted less than a
  // lease ago, or the coordinator grants none (an older build).
  bool MayPlace();
  // The same, after asking first where that may change the answer: a holder whose grant is
  // older than a lease (it learns of a router that took over), one not holding it (the first
  // placement need not wait for Start's loop), one whose epoch is behind the shards'.
  bool MayPlaceNow();
  // Whether the lease keeps other routers from placing the shards (the coordinator grants one).
  bool Fences();
  // Another router places the shards now (or Lose was called).
  bool lost() const { return lost_.load(); }
  // Takes the lease for lost, with `why` as the router's parting words (LostStatus); once.
  void Lose(std::string why);
  // UNAVAILABLE with why the lease was lost; OK while it is not.
  absl::Status LostStatus();
  // UNAVAILABLE where the lease keeps this router from serving (lost, or not granted yet: says
  // which router holds it, or that the coordinator does not answer); OK otherwise.
  absl::Status NotServing();
  // UNAVAILABLE, saying that the lease has not been renewed for over a lease, where it is held
  // and not lost (for a change that MayPlaceNow refused); OK otherwise.
  absl::Status NotRenewed();
  // ClusterInfo.placement_lease: "held (renewed 1.2s ago)", "standing by: ...", "lost: ...".
  std::string State();
  // Grants under a new epoch so far (Hooks::regranted).
  uint64_t regrants() const { return regrants_.load(); }

 private:
  // Held, and granted less than a lease ago by this router's clock. mu_.
  bool HeldNowLocked() const;
  // The lease is not held: `why` (State's text) is said once in the log per `kind`.
  void WaitLocked(const std::string& why, const std::string& kind);
  // Sets lost_ with `why`; false where it was lost already. mu_.
  bool LoseLocked(std::string why);
  // After LoseLocked returned true, with mu_ released: ends the loop and calls Hooks::lost.
  void Lost();
  // Start's thread.
  void Loop();

  v1::Coordinator::StubInterface* const coordinator_;
  const std::string coordinator_address_;
  const std::string router_id_;  // random, one per process
  const std::shared_ptr<LeaseEpochs> epochs_;
  RouterMetrics* const metrics_;
  const Hooks hooks_;

  std::mutex mu_;
  std::string address_;  // "" until SetAddress
  // The coordinator grants no lease (an older build): the router places without one.
  bool unsupported_ = false;
  bool held_ = false;
  // Why the lease is not held, as State says it ("standing by: ..." or "waiting for ..."); ""
  // before the first answer. Said once in the log per holder or kind of trouble.
  std::string wait_;
  std::string wait_said_;
  // Since its last grant, this router was told of another holder
  // (PlacementLeaseRequest.defer_while_settling).
  bool other_holder_ = false;
  std::chrono::steady_clock::time_point confirmed_{};  // the last grant's ask
  std::chrono::steady_clock::time_point asked_{};      // the last ask
  // Ask runs on several threads (the loop, the control thread, Rebalance and TrainStep): each
  // ask is numbered, and a reply older than one applied is dropped (an older grant would take
  // the lease's epoch, or its time, back).
  uint64_t ask_seq_ = 0;
  uint64_t reply_seq_ = 0;
  absl::Duration length_ = absl::Seconds(3);  // the coordinator's, once told
  std::atomic<bool> lost_{false};             // set once, under mu_
  std::string lost_why_;
  std::atomic<uint64_t> regrants_{0};

  std::mutex loop_mu_;
  std::condition_variable loop_cv_;
  bool stop_ = false;  // loop_mu_
  std::thread loop_;
};

}  // namespace moe::router

#endif  // MOE_ROUTER_PLACEMENT_LEASE_H_
