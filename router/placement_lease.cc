#include "router/placement_lease.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "services/common/log.h"

namespace moe::router {

PlacementLease::PlacementLease(v1::Coordinator::StubInterface* coordinator,
                               std::string coordinator_address, std::string router_id,
                               std::shared_ptr<LeaseEpochs> epochs, RouterMetrics* metrics,
                               Hooks hooks)
    : coordinator_(coordinator),
      coordinator_address_(std::move(coordinator_address)),
      router_id_(std::move(router_id)),
      epochs_(std::move(epochs)),
      metrics_(metrics),
      hooks_(std::move(hooks)) {}

PlacementLease::~PlacementLease() { Stop(); }

void PlacementLease::SetAddress(std::string address) {
  std::lock_guard<std::mutex> lock(mu_);
  address_ = std::move(address);
}

void PlacementLease::Start() {
  loop_ = std::thread([this] { Loop(); });
}

void PlacementLease::Stop() {
  {
    std::lock_guard<std::mutex> lock(loop_mu_);
    stop_ = true;
  }
  loop_cv_.notify_all();
  if (loop_.joinable()) loop_.join();
}

bool PlacementLease::HeldNowLocked() const {
  return held_ && absl::FromChrono(std::chrono::steady_clock::now() - confirmed_) <= length_;
}

bool PlacementLease::MayPlace() {
  std::lock_guard<std::mutex> lock(mu_);
  return !lost_.load() && (unsupported_ || HeldNowLocked());
}

bool PlacementLease::MayPlaceNow() {
  bool ask = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t held = epochs_->held.load();
    ask = held_ ? !HeldNowLocked() || (held != 0 && epochs_->seen.load() > held)
                : !unsupported_ && !lost_.load();
  }
  if (ask) Ask();
  return MayPlace();
}

bool PlacementLease::Fences() {
  std::lock_guard<std::mutex> lock(mu_);
  return !unsupported_;
}

std::string PlacementLease::State() {
  std::lock_guard<std::mutex> lock(mu_);
  if (lost_.load()) return absl::StrCat("lost: ", lost_why_);
  if (unsupported_) {
    return "none: the coordinator grants no placement lease (an older build); a second "
           "router on it would not be told";
  }
  if (held_) {
    const absl::Duration age = absl::Milliseconds(
        absl::ToInt64Milliseconds(absl::FromChrono(std::chrono::steady_clock::now() - confirmed_)));
    return absl::StrCat(age <= length_ ? "held" : "held, not renewed", " (renewed ",
                        absl::FormatDuration(age), " ago)");
  }
  return wait_.empty() ? absl::StrCat("asking coordinator ", coordinator_address_) : wait_;
}

absl::Status PlacementLease::LostStatus() {
  std::lock_guard<std::mutex> lock(mu_);
  return lost_.load() ? absl::UnavailableError(lost_why_) : absl::OkStatus();
}

absl::Status PlacementLease::NotServing() {
  std::lock_guard<std::mutex> lock(mu_);
  if (lost_.load()) return absl::UnavailableError(lost_why_);
  if (held_ || unsupported_) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("the router does not serve: ",
                   wait_.empty() ? "it has not been granted the placement lease yet" : wait_));
}

absl::Status PlacementLease::NotRenewed() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!held_ || lost_.load()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "this router's placement lease has not been renewed for over a lease (coordinator ",
      coordinator_address_,
      " does not answer it in time): the router serves, but changes no placement and runs no "
      "training step until the lease is renewed"));
}

void PlacementLease::WaitLocked(const std::string& why, const std::string& kind) {
  wait_ = why;
  if (kind != wait_said_) {
    common::Log("moe-router: %s\n", why.c_str());
    wait_said_ = kind;
  }
}

bool PlacementLease::LoseLocked(std::string why) {
  if (lost_.load()) return false;
  lost_why_ = std::move(why);
  held_ = false;
  lost_ = true;
  metrics_->SetPlacementLeaseHeld(false);
  return true;
}

void PlacementLease::Lose(std::string why) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!LoseLocked(std::move(why))) return;
  }
  Lost();
}

void PlacementLease::Lost() {
  {
    // Under loop_mu_, so that the loop cannot test lost_ and then wait past this notification.
    std::lock_guard<std::mutex> lock(loop_mu_);
    loop_cv_.notify_all();
  }
  if (hooks_.lost) hooks_.lost();
}

void PlacementLease::Ask() {
  using Clock = std::chrono::steady_clock;
  v1::PlacementLeaseRequest req;
  const Clock::time_point asked = Clock::now();
  absl::Duration deadline;
  uint64_t seq = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (lost_.load() || address_.empty()) return;
    seq = ++ask_seq_;
    req.set_router_id(router_id_);
    req.set_router_address(address_);
    // A holder that went a whole lease without asking (it stalled) may have been replaced: it
    // defers too.
    const bool stalled = held_ && absl::FromChrono(asked - asked_) > length_;
    req.set_defer_while_settling(other_holder_ || stalled);
    // The shards were placed under a later epoch than this router's (its coordinator restarted
    // with its clock behind): the lease, if granted, goes on past it.
    if (const uint64_t seen = epochs_->seen.load(); seen > epochs_->held.load()) {
      req.set_min_epoch(seen);
    }
    asked_ = asked;
    deadline = std::min(absl::Milliseconds(500), length_ / 2);
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(deadline));
  v1::PlacementLeaseResponse resp;
  const grpc::Status st = coordinator_->AcquirePlacementLease(&ctx, req, &resp);
  bool regranted = false;
  bool lost = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (lost_.load() || seq < reply_seq_) return;
    reply_seq_ = seq;
    if (st.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
      if (!unsupported_) {
        common::Log(
            "moe-router: coordinator %s grants no placement lease (an older build): "
            "this router places without one, and a second router following it would "
            "not be told\n",
            coordinator_address_.c_str());
      }
      unsupported_ = true;
      metrics_->SetPlacementLeaseHeld(true);
      return;
    }
    if (!st.ok()) {
      // Unreachable: a holder keeps serving (MayPlace: it places again once granted).
      if (!held_) {
        WaitLocked(absl::StrCat("waiting for coordinator ", coordinator_address_,
                                ", which does not answer (", st.error_message(),
                                "): check that it runs and that --coordinator names it; the "
                                "router places its shards once the coordinator grants it the "
                                "placement lease"),
                   "unreachable");
      }
      return;
    }
    unsupported_ = false;
    if (resp.lease_ms() > 0) length_ = absl::Milliseconds(resp.lease_ms());
    const std::string holder =
        resp.holder_id().empty()
            ? ""
            : absl::StrCat("router ", resp.holder_address(), " (", resp.holder_id(), ")");
    if (resp.granted()) {
      if (!held_ && !wait_said_.empty()) {
        common::Log("moe-router: this router holds the placement lease now\n");
      }
      held_ = true;
      other_holder_ = false;
      wait_.clear();
      wait_said_.clear();
      confirmed_ = asked;
      if (const uint64_t held = epochs_->held.load(); held != 0 && resp.epoch() != held) {
        ++regrants_;
        regranted = true;
      }
      epochs_->held.store(resp.epoch());
      metrics_->SetPlacementLeaseHeld(true);
    } else {
      other_holder_ |= !holder.empty();
      if (held_ && !holder.empty()) {
        lost = LoseLocked(absl::StrCat(
            holder, " holds the placement lease at coordinator ", coordinator_address_,
            " now (this router last renewed it ",
            absl::FormatDuration(absl::Milliseconds(
                absl::ToInt64Milliseconds(absl::FromChrono(asked - confirmed_)))),
            " ago, and that router took over): this router stops, as its placement is no "
            "longer the shards'; start it again to stand by"));
      } else if (held_) {
        return;  // settling: asked again within a quarter lease
      } else {
        if (holder.empty()) {
          WaitLocked(absl::StrCat("standing by: coordinator ", coordinator_address_,
                                  " started moments ago, and the router that held its "
                                  "placement lease may ask for it again first"),
                     "settling");
        } else {
          WaitLocked(
              absl::StrCat("standing by: ", holder, " holds the placement lease at coordinator ",
                           coordinator_address_, " (it lapses ", resp.holder_expires_in_ms(),
                           " ms from now unless renewed); this router places the shards "
                           "once that router stops. One router places a cluster's "
                           "shards at a time"),
              holder);
        }
        metrics_->SetPlacementLeaseHeld(false);
      }
    }
  }
  if (regranted && hooks_.regranted) hooks_.regranted();
  if (lost) Lost();
}

void PlacementLease::Loop() {
  std::unique_lock<std::mutex> lock(loop_mu_);
  while (!stop_ && !lost_.load()) {
    lock.unlock();
    Ask();
    std::chrono::milliseconds wait(250);
    {
      std::lock_guard<std::mutex> l(mu_);
      if (held_ || unsupported_) wait = absl::ToChronoMilliseconds(length_ / 4);
      // 1 while the router may place: a lease not renewed for a lease reads 0.
      metrics_->SetPlacementLeaseHeld(!lost_.load() && (unsupported_ || HeldNowLocked()));
    }
    lock.lock();
    loop_cv_.wait_for(lock, wait, [this] { return stop_ || lost_.load(); });
  }
  const bool lost = lost_.load();
  lock.unlock();
  if (lost && hooks_.loop_ended_lost) hooks_.loop_ended_lost();
}

void PlacementLease::Release() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!held_ || lost_.load()) return;
    held_ = false;
    metrics_->SetPlacementLeaseHeld(false);
  }
  v1::PlacementLeaseRequest req;
  req.set_router_id(router_id_);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  v1::PlacementLeaseResponse resp;
  (void)coordinator_->ReleasePlacementLease(&ctx, req, &resp);
}

}  // namespace moe::router
