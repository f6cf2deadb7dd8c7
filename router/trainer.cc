#include "router/trainer.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <thread>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "services/common/clock.h"
#include "services/common/log.h"
#include "services/common/status_macros.h"
#include "services/common/tensor_codec.h"

namespace moe::router {

std::vector<v1::ReplicaGroup> ReplicaGroups(const RoutingTable& table) {
  std::map<std::vector<int>, std::vector<int>> by_set;
  for (size_t e = 0; e < table.placement.replicas.size(); ++e) {
    const auto& r = table.placement.replicas[e];
    if (r.size() >= 2) by_set[r].push_back(static_cast<int>(e));
  }
  std::vector<v1::ReplicaGroup> out;
  for (const auto& [shards, experts] : by_set) {
    v1::ReplicaGroup g;
    for (int e : experts) g.add_experts(e);
    for (int s : shards) g.add_shards(table.shards[s]->address());
    out.push_back(std::move(g));
  }
  return out;
}

Trainer::Trainer(const common::ModelConfig& config, Committer committer,
                 absl::Duration coordinator_grace)
    : config_(config),
      committer_(std::move(committer)),
      coordinator_grace_(coordinator_grace),
      // Steps of different router lifetimes must not collide on a shard.
      next_step_(static_cast<uint64_t>(absl::ToUnixMillis(absl::Now())) << 16) {}

namespace {

// Whether `address` is one of `table`'s shards.
bool HasShard(const RoutingTable& table, const std::string& address) {
  return std::any_of(table.shards.begin(), table.shards.end(),
                     [&](const auto& s) { return s->address() == address; });
}

// The shards of `table` that hold a replica of some expert in its placement, in order: those
// that take part in a step (its commit or abort must reach them). A shard that holds none (a
// dead one the placement has moved off, or one not given experts yet) has no weight to update.
std::vector<size_t> Participants(const RoutingTable& table) {
  std::vector<bool> holds(table.shards.size(), false);
  for (const auto& where : table.placement.replicas) {
    for (int s : where) {
      if (s >= 0 && static_cast<size_t>(s) < holds.size()) holds[s] = true;
    }
  }
  std::vector<size_t> out;
  for (size_t i = 0; i < holds.size(); ++i) {
    if (holds[i]) out.push_back(i);
  }
  return out;
}

// The code of a step that failed for `cause`: a gradient or update that is not finite
// (OUT_OF_RANGE) would be again if the step were sent again, the caller's to change; any other
// failure is ABORTED, a step to retry.
absl::StatusCode StepFailure(absl::StatusCode cause) {
  return cause == absl::StatusCode::kOutOfRange ? absl::StatusCode::kOutOfRange
                                                : absl::StatusCode::kAborted;
}

// Whether shard `address` of `table` takes part in its steps (see Participants).
bool Participates(const RoutingTable& table, const std::string& address) {
  for (size_t i : Participants(table)) {
    if (table.shards[i]->address() == address) return true;
  }
  return false;
}

}  // namespace

bool Trainer::Counts(const RoutingTable& table, const RoutingTable* live,
                     const std::string& address, const PendingCommit& u) {
  // A commit it lacks matters where it holds a replica; an update it may hold that the others
  // aborted, wherever it is listed (its copies could still spread it).
  if (!HasShard(table, address)) return false;
  return u.unsettled_abort || Participates(table, address) ||
         (live != nullptr && Participates(*live, address));
}

absl::Status Trainer::RetryConfirmations(const RoutingTable& table, bool drop_absent,
                                         const RoutingTable* live) {
  if (drop_absent) DropUnconfirmedOutside(table);
  std::map<std::string, PendingCommit> todo;
  {
    std::lock_guard<std::mutex> lock(unconfirmed_mu_);
    todo = unconfirmed_;
  }
  for (const auto& [address, u] : todo) {
    for (size_t i = 0; i < table.shards.size(); ++i) {
      const auto& s = table.shards[i];
      if (s->address() != address) continue;
      if (!Counts(table, live, address, u)) break;
      if (u.unsettled_abort) {
        // Settled against the live table only: a proposed one (a switch not yet applied) may
        // not list what the shard holds now, nor hold it where it names a source.
        if (!drop_absent) break;
        const absl::Status settled = SettleAbort(table, i, u.step, u.learning_rate);
        if (!settled.ok()) {
          // What keeps it unsettled now, for the error of the steps refused meanwhile.
          std::lock_guard<std::mutex> lock(unconfirmed_mu_);
          auto it = unconfirmed_.find(address);
          if (it != unconfirmed_.end()) it->second.settle_error = std::string(settled.message());
          break;
        }
      } else {
        if (!s->FinishStep(u.step, /*commit=*/true, u.learning_rate, kAbortTimeout).ok()) break;
        common::Log("moe-router: step id %llu: %s has now confirmed the commit\n",
                    static_cast<unsigned long long>(u.step), address.c_str());
      }
      std::lock_guard<std::mutex> lock(unconfirmed_mu_);
      unconfirmed_.erase(address);
      break;
    }
  }
  return Unconfirmed(table, live);
}

absl::Status Trainer::SettleAbort(const RoutingTable& table, size_t shard, uint64_t step,
                                  float learning_rate) {
  const auto& s = table.shards[shard];
  ASSIGN_OR_RETURN(v1::StepOutcome::State state, s->GetStep(step, kAbortTimeout));
  if (state == v1::StepOutcome::COMMITTED) {
    // It received the commit: let it finish applying the update (a repeated commit waits for
    // the one under way and applies nothing twice), or a copy made now would be updated again.
    RETURN_IF_ERROR(s->FinishStep(step, /*commit=*/true, learning_rate, kAbortTimeout));
  } else {
    RETURN_IF_ERROR(s->FinishStep(step, /*commit=*/false, 0.f, kAbortTimeout));
  }
  // Which of its experts carry the update is read from their weights: that also finds an update
  // applied, kept in --state-dir and brought back by a restart, after which the shard no longer
  // knows the step (UNKNOWN above).
  ASSIGN_OR_RETURN(v1::ShardStatus status, s->GetStatus(kAbortTimeout));
  std::set<int> updated;
  for (const v1::ExpertStatus& x : status.experts()) {
    if (x.state() == v1::ExpertStatus::LOADING) {
      // Its step is not known until it is read (a restart reading --state-dir).
      return absl::UnavailableError(absl::StrCat(
          s->address(), " is still loading expert ", x.expert(),
          "; whether it holds the update of aborted step id ", step, " is known once it is read"));
    }
    if (x.trained_step() >= step) updated.insert(x.expert());
  }
  if (updated.empty()) {
    common::Log("moe-router: step id %llu: %s had not applied it, and has now aborted it\n",
                static_cast<unsigned long long>(step), s->address().c_str());
    return absl::OkStatus();
  }
  // Its replicas of experts held elsewhere take those replicas' weights again, replacing its
  // newer ones. A source must be in rotation, settled itself (another unsettled shard may hold
  // the same update), and its own replica must be from before the step (read, not assumed: a
  // copy back from a replica that carries the update would give nothing back).
  std::set<std::string> unsettled;
  {
    std::lock_guard<std::mutex> lock(unconfirmed_mu_);
    for (const auto& [address, u] : unconfirmed_) unsettled.insert(address);
  }
  std::map<int, std::map<int, uint64_t>> steps_on;  // shard -> expert -> trained step
  auto before_step = [&](int r, int e) {
    auto it = steps_on.find(r);
    if (it == steps_on.end()) {
      it = steps_on.emplace(r, std::map<int, uint64_t>()).first;
      absl::StatusOr<v1::ShardStatus> st = table.shards[r]->GetStatus(kAbortTimeout);
      if (st.ok()) {
        for (const v1::ExpertStatus& x : st->experts()) {
          if (x.state() == v1::ExpertStatus::READY) it->second[x.expert()] = x.trained_step();
        }
      }
    }
    auto found = it->second.find(e);
    return found != it->second.end() && found->second < step;
  };
  std::map<std::string, std::vector<int>> by_source;
  std::vector<int> alone;
  for (int e : updated) {
    if (e < 0 || static_cast<size_t>(e) >= table.placement.replicas.size()) continue;
    const auto& where = table.placement.replicas[e];
    if (std::find(where.begin(), where.end(), static_cast<int>(shard)) == where.end()) continue;
    if (where.size() == 1) {
      alone.push_back(e);
      continue;
    }
    std::string source;
    for (int r : where) {
      const auto& c = table.shards[r];
      if (r != static_cast<int>(shard) && c->healthy() && !unsettled.count(c->address()) &&
          before_step(r, e)) {
        source = c->address();
        break;
      }
    }
    if (source.empty()) {
      return absl::UnavailableError(
          absl::StrCat("expert ", e, " on ", s->address(), " holds the update of aborted step id ",
                       step, " and no other replica can give its weights back now"));
    }
    by_source[source].push_back(e);
  }
  // Version 0: a roll-back changes no placement, and the shard may have taken a later version
  // than the table's (from a switch that failed), which would refuse the table's.
  for (const auto& [source, experts] : by_source) {
    RETURN_IF_ERROR(s->RollBackExperts(experts, 0, source, absl::Minutes(5)).status());
  }
  common::Log(
      "moe-router: step id %llu: %s had applied it although every other shard aborted "
      "it; its replicas of %zu expert(s) were copied back from their other replicas%s%s\n",
      static_cast<unsigned long long>(step), s->address().c_str(),
      static_cast<size_t>(
          std::accumulate(by_source.begin(), by_source.end(), size_t{0},
                          [](size_t n, const auto& b) { return n + b.second.size(); })),
      alone.empty() ? "" : "; experts with no other replica keep the update: ",
      absl::StrJoin(alone, ",").c_str());
  return absl::OkStatus();
}

void Trainer::DropUnconfirmedOutside(const RoutingTable& table) {
  std::lock_guard<std::mutex> lock(unconfirmed_mu_);
  for (auto it = unconfirmed_.begin(); it != unconfirmed_.end();) {
    const bool listed = HasShard(table, it->first);
    if (listed && (it->second.unsettled_abort || Participates(table, it->first))) {
      ++it;
      continue;
    }
    common::Log("moe-router: step id %llu: %s %s before %s; dropped%s\n",
                static_cast<unsigned long long>(it->second.step), it->first.c_str(),
                listed ? "holds no replica any more (one placed on it later is copied from a "
                         "replica that has the update)"
                       : "left the placement",
                it->second.unsettled_abort ? "telling whether it had committed the step"
                                           : "confirming the commit",
                it->second.unsettled_abort
                    ? " (should it come back with the update, its replicas are given back the "
                      "others' weights)"
                    : "");
    it = unconfirmed_.erase(it);
  }
}

bool Trainer::AbortedUpdate(uint64_t step) const {
  std::lock_guard<std::mutex> lock(unconfirmed_mu_);
  return step != 0 && aborted_updates_.count(step) > 0;
}

bool TrainedOutside(const Placement& p, int r, int e, uint64_t step, bool aborted) {
  return step != 0 && !aborted && !p.Holds(r, e);
}

StalePlan PlanStaleReplicas(const Placement& p, const std::vector<std::map<int, uint64_t>>& at,
                            const std::function<bool(uint64_t)>& aborted,
                            std::map<int, uint64_t>* reached) {
  StalePlan plan;
  plan.copy.resize(at.size());
  plan.give_back.resize(at.size());
  auto held = [&](int r, int e) -> const uint64_t* {
    if (r < 0 || static_cast<size_t>(r) >= at.size()) return nullptr;
    auto it = at[r].find(e);
    return it == at[r].end() ? nullptr : &it->second;
  };
  for (int e = 0; e < static_cast<int>(p.replicas.size()); ++e) {
    int latest = -1;
    bool all_seen = true;
    for (int r : p.replicas[e]) {
      const uint64_t* step = held(r, e);
      all_seen = all_seen && step != nullptr;
      if (step == nullptr || aborted(*step)) continue;
      if (latest < 0 || *step > *held(latest, e)) latest = r;
    }
    uint64_t& was = (*reached)[e];
    if (latest >= 0 && *held(latest, e) < was) {
      // The replicas without an aborted update are behind the training this expert reached
      // (restarted meanwhile): giving theirs back would lose it all. A replica with the aborted
      // update is taken as the latest, as when it is the only one: the expert keeps the update.
      for (int r : p.replicas[e]) {
        const uint64_t* step = held(r, e);
        if (step != nullptr && *step > *held(latest, e)) latest = r;
      }
    }
    // A replica outside the placement trained past its replicas (kept by the control loop's
    // UnloadExtras: another router trained it there) holds the expert's latest weights.
    for (int r = 0; r < static_cast<int>(at.size()); ++r) {
      const uint64_t* step = held(r, e);
      if (step == nullptr || !TrainedOutside(p, r, e, *step, aborted(*step))) continue;
      if (latest < 0 || *step > *held(latest, e)) latest = r;
    }
    if (latest < 0) continue;
    const uint64_t step = *held(latest, e);
    if (all_seen && step < was) {
      plan.lost.push_back({e, step});
      was = step;  // reported once: this is where the expert stands now
    } else {
      was = std::max(was, step);
    }
    for (int r : p.replicas[e]) {
      const uint64_t* mine = held(r, e);
      if (mine == nullptr || *mine == step) continue;
      if (aborted(*mine) && *mine > step && !aborted(step)) {
        plan.give_back[r][latest].push_back(e);
      } else if (*mine < step) {
        plan.copy[r][latest].push_back(e);
      }
    }
  }
  return plan;
}

absl::Status CarryOutStalePlan(const RoutingTable& t, const StalePlan& plan, uint64_t version,
                               absl::Duration timeout, int* done) {
  absl::Status result;
  for (size_t s = 0; s < t.shards.size() && s < plan.copy.size(); ++s) {
    for (const bool back : {false, true}) {
      for (const auto& [r, experts] : back ? plan.give_back[s] : plan.copy[s]) {
        const std::string& source = t.shards[r]->address();
        // A give-back changes no placement: version 0, as SettleAbort's.
        absl::Status st = (back ? t.shards[s]->RollBackExperts(experts, 0, source, timeout)
                                : t.shards[s]->LoadExperts(experts, version, source, timeout))
                              .status();
        if (st.ok()) {
          *done += static_cast<int>(experts.size());
          continue;
        }
        common::Log("moe-router: copying experts %s from %s to %s failed: %s\n",
                    absl::StrJoin(experts, ",").c_str(), source.c_str(),
                    t.shards[s]->address().c_str(), std::string(st.message()).c_str());
        if (result.ok()) {
          result = absl::UnavailableError(absl::StrCat(
              "replicas of experts ", absl::StrJoin(experts, ","), " on ", t.shards[s]->address(),
              back ? " carry an aborted step's update" : " are behind their latest training step",
              " and copying them from ", source, " failed: ", st.message()));
        }
      }
    }
  }
  return result;
}

absl::Status Trainer::Unconfirmed(const RoutingTable& table, const RoutingTable* live) const {
  std::lock_guard<std::mutex> lock(unconfirmed_mu_);
  for (const auto& entry : unconfirmed_) {
    if (!Counts(table, live, entry.first, entry.second)) continue;
    if (entry.second.unsettled_abort) {
      return absl::UnavailableError(absl::StrCat(
          "shard ", entry.first, " could not be asked whether it had committed step id ",
          entry.second.step, ", which was aborted (", entry.second.reason, ")",
          entry.second.settle_error.empty() ? "" : "; asked again: ", entry.second.settle_error,
          "; steps resume once it is settled (the router asks it again every second)"));
    }
    return absl::UnavailableError(absl::StrCat(
        "shard ", entry.first, " has not confirmed step id ", entry.second.step, " (",
        entry.second.reason,
        "); steps resume once it has applied that update (the router asks it again every "
        "second)"));
  }
  return absl::OkStatus();
}

namespace {

// Runs fn(i) for every shard i of `table` that takes part in its steps (Participants) at once,
// one thread each, and waits for all.
void OnEveryShard(const RoutingTable& table, const std::function<void(size_t)>& fn) {
  std::vector<std::thread> calls;
  for (size_t i : Participants(table)) calls.emplace_back([&fn, i] { fn(i); });
  for (auto& t : calls) t.join();
}

}  // namespace

void Trainer::AbortEverywhere(const RoutingTable& table, uint64_t step) {
  OnEveryShard(table, [&](size_t i) {
    table.shards[i]->FinishStep(step, /*commit=*/false, 0.f, kAbortTimeout).IgnoreError();
  });
}

bool Trainer::ResolveLostVerdict(const RoutingTable& table, uint64_t step, absl::Time until,
                                 std::vector<std::string>* unanswered) {
  while (true) {
    const bool last = common::MonotonicNow() >= until;
    std::vector<absl::StatusOr<v1::StepOutcome::State>> seen(table.shards.size(),
                                                              v1::StepOutcome::UNKNOWN);
    OnEveryShard(table,
                 [&](size_t i) { seen[i] = table.shards[i]->GetStep(step, kAbortTimeout); });
    bool aborted = false;
    unanswered->clear();
    for (size_t i = 0; i < seen.size(); ++i) {
      if (!seen[i].ok()) {
        unanswered->push_back(table.shards[i]->address());
        continue;
      }
      if (*seen[i] == v1::StepOutcome::COMMITTED) {
        common::Log(
            "moe-router: step id %llu: the coordinator's verdict was lost, but %s had "
            "received a commit: finishing the commit on every shard\n",
            static_cast<unsigned long long>(step), table.shards[i]->address().c_str());
        return true;
      }
      aborted |= *seen[i] == v1::StepOutcome::ABORTED;
    }
    if (aborted) {
      unanswered->clear();  // the verdict was abort: a shard that did not answer saw no commit
      return false;
    }
    if (last) return false;
    absl::SleepFor(std::min(absl::Milliseconds(100), until - common::MonotonicNow()));
  }
}

void Trainer::CommitEverywhere(const RoutingTable& table, uint64_t step, float learning_rate,
                               const std::string& reason) {
  std::vector<absl::Status> st(table.shards.size());
  OnEveryShard(table, [&](size_t i) {
    st[i] = table.shards[i]->FinishStep(step, /*commit=*/true, learning_rate, kAbortTimeout);
  });
  std::lock_guard<std::mutex> lock(unconfirmed_mu_);
  for (size_t i = 0; i < st.size(); ++i) {
    if (!st[i].ok()) {
      unconfirmed_[table.shards[i]->address()] =
          PendingCommit{step, learning_rate, reason, /*unsettled_abort=*/false, ""};
    }
  }
}

absl::Status Trainer::EveryReplicaInRotation(const RoutingTable& table) {
  const int S = static_cast<int>(table.shards.size());
  for (size_t e = 0; e < table.placement.replicas.size(); ++e) {
    for (int s : table.placement.replicas[e]) {
      if (s < S && !table.shards[s]->healthy()) {
        return absl::UnavailableError(absl::StrCat(
            "replica of expert ", e, " on ", table.shards[s]->address(),
            " is out of rotation: the step could not commit; retry once the shard is back or "
            "the placement has moved off it"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<TrainResult> Trainer::Step(const RoutingTable& table,
                                          const common::GateWeights& gate, const float* x,
                                          const float* dy, int64_t n, const TrainParams& params,
                                          absl::Time deadline) {
  const int k = config_.top_k, E = config_.num_experts;
  const int64_t d = config_.d_model;
  const int S = static_cast<int>(table.shards.size());
  // The previous commit first: every shard must hold the same weights before a step starts.
  RETURN_IF_ERROR(RetryConfirmations(table));
  TrainResult result;
  result.step = next_step_.fetch_add(1);
  // Every replica must apply the update: with one out of rotation the step could not commit, so
  // refuse it now rather than after the ring has timed out.
  RETURN_IF_ERROR(EveryReplicaInRotation(table));
  GateParams gp{gate.weight.data(), gate.bias.empty() ? nullptr : gate.bias.data(), E,
                config_.d_model};
  result.gating = Route(gp, x, n, GatingOptions{k, config_.normalize_topk, params.capacity_factor, {}});
  const GatingResult& g = result.gating;
  const ExpertGroups groups = GroupByExpert(g);
  // Each expert's rows in contiguous parts over its healthy replicas.
  std::vector<std::map<int, std::vector<int64_t>>> plan(S);
  for (int e = 0; e < E; ++e) {
    const int64_t begin = groups.offsets[e], count = groups.offsets[e + 1] - begin;
    if (count == 0) continue;
    std::vector<int> reps;
    for (int s : table.placement.replicas[e]) {
      if (s < S && table.shards[s]->healthy()) reps.push_back(s);
    }
    if (reps.empty()) {
      return absl::UnavailableError(absl::StrCat("expert ", e, " has no healthy replica"));
    }
    for (size_t i = 0; i < reps.size(); ++i) {
      const int64_t b = begin + count * static_cast<int64_t>(i) / static_cast<int64_t>(reps.size());
      const int64_t en =
          begin + count * static_cast<int64_t>(i + 1) / static_cast<int64_t>(reps.size());
      if (en == b) continue;  // fewer rows than replicas
      auto& dst = plan[reps[i]][e];
      for (int64_t p = b; p < en; ++p) dst.push_back(p);
    }
  }
  // A shard's share in batches within its limits (as the dispatcher cuts them).
  const std::vector<ShardBatch> parts =
      CutIntoBatches(std::move(plan), table.shards, d, kMaxDispatchBytes);
  const int P = static_cast<int>(parts.size());
  std::vector<uint64_t> batch_ids(P);  // each forward's, which its backward names
  // Training forwards.
  struct Wait {
    std::mutex mu;
    std::condition_variable cv;
    int waiting = 0;
    std::vector<std::pair<int, absl::StatusOr<v1::DispatchResponse>>> results;
  };
  auto wait = std::make_shared<Wait>();
  std::vector<int32_t> local(n, -1);
  const uint32_t timeout_ms = static_cast<uint32_t>(
      std::max<int64_t>(1, absl::ToInt64Milliseconds(deadline - common::MonotonicNow())));
  for (int b = 0; b < P; ++b) {
    const int s = parts[b].shard;
    auto req =
        BuildShardRequest(parts[b].plan, groups, k, x, d, common::WireType::kFloat32, &local);
    batch_ids[b] = req->batch_id();
    req->set_train_step(result.step);
    req->set_timeout_ms(timeout_ms);
    req->set_placement_version(table.placement.version);
    int64_t rows = 0;
    for (const auto& [e, pos] : parts[b].plan) rows += static_cast<int64_t>(pos.size());
    {
      std::lock_guard<std::mutex> lock(wait->mu);
      ++wait->waiting;
    }
    table.shards[s]->Dispatch(req, rows, [wait, b](absl::StatusOr<v1::DispatchResponse> r) {
      std::lock_guard<std::mutex> lock(wait->mu);
      wait->results.emplace_back(b, std::move(r));
      --wait->waiting;
      wait->cv.notify_all();
    });
  }
  std::vector<float> eo(groups.assignment.size() * d);
  {
    std::unique_lock<std::mutex> lock(wait->mu);
    if (!wait->cv.wait_for(lock, common::TimeLeft(deadline), [&] { return wait->waiting == 0; })) {
      lock.unlock();
      AbortEverywhere(table, result.step);
      return absl::DeadlineExceededError("deadline passed during the training forward");
    }
  }
  for (auto& [b, r] : wait->results) {
    const int s = parts[b].shard;
    absl::Status err = r.ok() ? absl::Status(static_cast<absl::StatusCode>(r->code()), r->message())
                              : r.status();
    if (err.ok()) {
      err = CheckShardAnswer(r->outputs(), parts[b].plan, d, table.shards[s]->address());
    }
    if (!err.ok()) {
      AbortEverywhere(table, result.step);
      return absl::AbortedError(absl::StrCat("training forward on shard ",
                                             table.shards[s]->address(), " failed: ",
                                             err.message(), "; step aborted, no weight changed"));
    }
    for (const v1::ExpertOutput& out : r->outputs()) {
      const std::vector<int64_t>& pos = parts[b].plan.at(out.expert());  // CheckShardAnswer
      const std::vector<float> vals =
          common::ViewToFloat(*common::DecodeMatrix(out.output(), "output", d));
      for (size_t i = 0; i < pos.size(); ++i) {
        std::memcpy(&eo[pos[i] * d], &vals[i * d], sizeof(float) * d);
      }
    }
  }
  // Backward through the combine: dL/dw = <dy, E(x)>, and each expert sees w * dy.
  std::vector<float> dweights(n * k, 0.f);
  for (int64_t a = 0; a < n * k; ++a) {
    const int64_t slot = groups.slot[a];
    if (slot < 0) continue;
    const float* dyt = dy + (a / k) * d;
    const float* o = &eo[slot * d];
    float dot = 0.f;
    for (int64_t i = 0; i < d; ++i) dot += dyt[i] * o[i];
    dweights[a] = dot;
  }
  std::vector<float> dxe(groups.assignment.size() * d);
  std::vector<absl::Status> back_status(P);
  // A thread per shard, which sends its parts one after another: a shard builds a whole set of
  // gradients per expert a backward covers, so parts of one shard at once would multiply that.
  std::vector<std::thread> threads;
  std::vector<bool> computed(S, false);
  for (const ShardBatch& p : parts) computed[p.shard] = true;
  auto backward = [&](int b) {
    const int s = parts[b].shard;
    const std::map<int, std::vector<int64_t>>& plan_b = parts[b].plan;
    v1::BackwardRequest req;
    req.set_train_step(result.step);
    req.set_batch_id(batch_ids[b]);
    req.set_learning_rate(params.learning_rate);
    for (const auto& [e, pos] : plan_b) {
      std::vector<float> rows(pos.size() * d);
      for (size_t i = 0; i < pos.size(); ++i) {
        const int64_t a = groups.assignment[pos[i]];
        const float w = g.weights[a];
        const float* dyt = dy + (a / k) * d;
        for (int64_t j = 0; j < d; ++j) rows[i * d + j] = w * dyt[j];
      }
      v1::ExpertOutput* out = req.add_grads();
      out->set_expert(e);
      common::EncodeTensor(rows, {static_cast<int64_t>(pos.size()), d}, common::WireType::kFloat32,
                           out->mutable_output());
    }
    absl::StatusOr<v1::BackwardResponse> resp = table.shards[s]->Backward(
        req, std::max(deadline - common::MonotonicNow(), absl::Milliseconds(1)));
    if (!resp.ok()) {
      back_status[b] = resp.status();
      return;
    }
    back_status[b] = CheckShardAnswer(resp->grad_inputs(), plan_b, d, table.shards[s]->address());
    if (!back_status[b].ok()) return;
    for (const v1::ExpertOutput& gi : resp->grad_inputs()) {
      const std::vector<int64_t>& pos = plan_b.at(gi.expert());
      const std::vector<float> vals =
          common::ViewToFloat(*common::DecodeMatrix(gi.output(), "grad_input", d));
      for (size_t i = 0; i < pos.size(); ++i) {
        std::memcpy(&dxe[pos[i] * d], &vals[i * d], sizeof(float) * d);
      }
    }
  };
  for (int s = 0; s < S; ++s) {
    if (!computed[s]) continue;
    threads.emplace_back([&, s] {
      for (int b = 0; b < P; ++b) {
        if (parts[b].shard != s) continue;
        backward(b);
        if (!back_status[b].ok()) return;  // the step fails: no more of this shard's parts
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int b = 0; b < P; ++b) {
    if (!back_status[b].ok()) {
      AbortEverywhere(table, result.step);
      // The shard client's message names the shard ("backward on shard ADDRESS: ...").
      return absl::Status(
          StepFailure(back_status[b].code()),
          absl::StrCat(back_status[b].message(), "; step aborted, no weight changed"));
    }
  }
  result.grad_input.assign(n * d, 0.f);
  for (int64_t a = 0; a < n * k; ++a) {
    const int64_t slot = groups.slot[a];
    if (slot < 0) continue;
    float* gx = &result.grad_input[(a / k) * d];
    const float* src = &dxe[slot * d];
    for (int64_t i = 0; i < d; ++i) gx[i] += src[i];
  }
  // The gate.
  std::vector<float> dlogits(n * E);
  GateBackward(g, dweights.data(), config_.normalize_topk, params.aux_loss_coef,
               params.z_loss_coef, dlogits.data());
  result.gate_weight.resize(static_cast<size_t>(E) * d);
  result.gate_bias.resize(gate.bias.size());
  GateParamBackward(gp, x, dlogits.data(), n, result.gate_weight.data(),
                    gate.bias.empty() ? nullptr : result.gate_bias.data(),
                    result.grad_input.data());
  // The gate's update, as the router applies it once the step commits (w -= lr * g), must leave
  // finite weights: checked now, while the step can still be aborted.
  for (const auto& [name, g, w] : {std::tuple{"weight", &result.gate_weight, &gate.weight},
                                   std::tuple{"bias", &result.gate_bias, &gate.bias}}) {
    for (size_t i = 0; i < g->size() && i < w->size(); ++i) {
      const float next = (*w)[i] - params.learning_rate * (*g)[i];
      if (std::isfinite((*g)[i]) && std::isfinite(next)) continue;
      AbortEverywhere(table, result.step);
      return absl::OutOfRangeError(absl::StrCat(
          std::isfinite((*g)[i]) ? "the update of the gate's " : "the gradient of the gate's ",
          name, " is not finite (", name, "[", i,
          "]): the model has diverged or grad_output is too large; lower the learning rate. "
          "Step aborted, no weight changed"));
    }
  }
  // Commit: replicas sum their gradients, then every shard applies its update, or none does.
  v1::CommitStepRequest commit;
  commit.set_train_step(result.step);
  commit.set_learning_rate(params.learning_rate);
  commit.set_bf16_wire(params.bf16_allreduce);
  for (auto& grp : ReplicaGroups(table)) *commit.add_groups() = std::move(grp);
  for (size_t s : Participants(table)) commit.add_shards(table.shards[s]->address());
  for (int s = 0; s < S; ++s) {
    if (computed[s]) commit.add_computed_shards(table.shards[s]->address());
  }
  commit.set_timeout_ms(static_cast<uint32_t>(
      std::max<int64_t>(1000, absl::ToInt64Milliseconds(deadline - common::MonotonicNow()))));
  const absl::Time sent = common::MonotonicNow();
  absl::StatusOr<v1::CommitStepResponse> done = committer_(commit);
  if (!done.ok()) {
    const std::string lost = absl::StrCat("the coordinator's verdict was lost: ",
                                          done.status().message());
    const absl::Time until =
        sent + absl::Milliseconds(commit.timeout_ms()) + coordinator_grace_;
    std::vector<std::string> unanswered;
    if (ResolveLostVerdict(table, result.step, until, &unanswered)) {
      CommitEverywhere(table, result.step, params.learning_rate, lost);
      return result;
    }
    AbortEverywhere(table, result.step);
    if (!unanswered.empty()) {
      // Any of them may have received the lost verdict, a commit: settled before the next step
      // (RetryConfirmations), which is refused until then.
      {
        std::lock_guard<std::mutex> lock(unconfirmed_mu_);
        for (const std::string& address : unanswered) {
          unconfirmed_[address] = PendingCommit{result.step, params.learning_rate, lost,
                                                /*unsettled_abort=*/true, ""};
        }
        aborted_updates_.insert(result.step);
        if (aborted_updates_.size() > kKeptAborts) aborted_updates_.erase(aborted_updates_.begin());
      }
      return absl::AbortedError(absl::StrCat(
          "commit of step id ", result.step, " failed (", lost, "); no shard that answered "
          "had committed it, so it was aborted; ", absl::StrJoin(unanswered, ", "),
          " could not be asked: had it committed, its replicas are copied back from the others "
          "before the next step"));
    }
    return absl::AbortedError(absl::StrCat("commit of step id ", result.step, " failed (", lost,
                                           "); no shard had committed it, so it was aborted "
                                           "everywhere and no weight changed"));
  }
  if (!done->committed()) {
    // The code of the member's failure that aborted it (a sum that is not finite, say).
    // A router that does not hold the placement lease: sent again, the step would be again.
    return absl::Status(
        done->not_lease_holder() ? absl::StatusCode::kFailedPrecondition
                                 : StepFailure(static_cast<absl::StatusCode>(done->code())),
        absl::StrCat("step id ", result.step, " aborted, no weight changed: ", done->reason()));
  }
  if (done->unconfirmed_shards_size() > 0) {
    std::lock_guard<std::mutex> lock(unconfirmed_mu_);
    for (const std::string& address : done->unconfirmed_shards()) {
      unconfirmed_[address] = PendingCommit{result.step, params.learning_rate, done->reason(),
                                            /*unsettled_abort=*/false, ""};
    }
    common::Log(
        "moe-router: step id %llu committed, but %d shard(s) did not confirm it (%s); "
        "FinishStep is sent again until they do, and no step starts before\n",
        static_cast<unsigned long long>(result.step), done->unconfirmed_shards_size(),
        done->reason().c_str());
  }
  return result;
}

}  // namespace moe::router
