#include "router/dispatcher.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "router/moe_layer.h"
#include "services/common/bf16.h"
#include "services/common/clock.h"
#include "services/common/deadline_timer.h"
#include "services/common/notification.h"

namespace moe::router {
namespace {

// Shard errors worth re-sending elsewhere: the shard is gone, busy, or no longer has the expert.
bool Retryable(absl::StatusCode code) {
  return code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kCancelled ||
         code == absl::StatusCode::kFailedPrecondition ||
         code == absl::StatusCode::kResourceExhausted || code == absl::StatusCode::kAborted ||
         code == absl::StatusCode::kUnknown || code == absl::StatusCode::kInternal;
}

void AppendRow(const float* row, int64_t d, common::WireType wire, std::string* bytes) {
  if (wire == common::WireType::kFloat32) {
    bytes->append(reinterpret_cast<const char*>(row), sizeof(float) * d);
    return;
  }
  const size_t at = bytes->size();
  bytes->resize(at + 2 * d);
  auto* dst = reinterpret_cast<unsigned char*>(bytes->data() + at);
  for (int64_t i = 0; i < d; ++i) {
    const uint16_t h = common::FloatToBf16(row[i]);
    std::memcpy(dst + 2 * i, &h, 2);
  }
}

}  // namespace

std::shared_ptr<v1::DispatchRequest> BuildShardRequest(
    const std::map<int, std::vector<int64_t>>& plan, const ExpertGroups& groups, int k,
    const float* x, int64_t d, common::WireType wire, std::vector<int32_t>* local) {
  static std::atomic<uint64_t> next_batch_id{1};
  auto req = std::make_shared<v1::DispatchRequest>();
  req->set_batch_id(next_batch_id.fetch_add(1, std::memory_order_relaxed));
  req->set_output_dtype(wire == common::WireType::kBFloat16 ? v1::BFLOAT16 : v1::FLOAT32);
  req->set_num_experts(static_cast<int32_t>(groups.offsets.size()) - 1);
  v1::Tensor* rows = req->mutable_rows();
  std::string* bytes = rows->mutable_data();
  int32_t num_rows = 0;
  std::vector<int64_t> touched;
  for (const auto& [e, pos] : plan) {
    v1::ExpertRows* er = req->add_experts();
    er->set_expert(e);
    er->mutable_rows()->Reserve(static_cast<int>(pos.size()));
    for (int64_t p : pos) {
      const int64_t t = groups.assignment[p] / k;
      if ((*local)[t] < 0) {
        (*local)[t] = num_rows++;
        touched.push_back(t);
        AppendRow(x + t * d, d, wire, bytes);
      }
      er->add_rows((*local)[t]);
    }
  }
  for (int64_t t : touched) (*local)[t] = -1;
  rows->add_shape(num_rows);
  rows->add_shape(d);
  rows->set_dtype(wire == common::WireType::kBFloat16 ? v1::BFLOAT16 : v1::FLOAT32);
  return req;
}

int64_t MaxBatchAssignments(const ShardClient& shard, int64_t d_model, int64_t max_bytes) {
  const int64_t limit =
      shard.max_batch_rows() > 0 ? shard.max_batch_rows() : kDefaultShardBatchRows;
  if (shard.max_message_bytes() > 0) max_bytes = std::min(max_bytes, shard.max_message_bytes() / 4);
  const int64_t row_bytes = std::max<int64_t>(1, d_model) * static_cast<int64_t>(sizeof(float));
  return std::max<int64_t>(1, std::min(limit, max_bytes / row_bytes));
}

std::vector<std::map<int, std::vector<int64_t>>> SplitShardPlan(
    std::map<int, std::vector<int64_t>> plan, int64_t max_rows) {
  int64_t total = 0;
  for (const auto& [e, pos] : plan) total += static_cast<int64_t>(pos.size());
  std::vector<std::map<int, std::vector<int64_t>>> parts;
  if (total <= max_rows) {
    if (total > 0) parts.push_back(std::move(plan));
    return parts;
  }
  int64_t room = 0;
  for (const auto& [e, pos] : plan) {
    for (size_t i = 0; i < pos.size();) {
      if (room == 0) {
        parts.emplace_back();
        room = max_rows;
      }
      const size_t take = std::min(pos.size() - i, static_cast<size_t>(room));
      auto& dst = parts.back()[e];
      dst.insert(dst.end(), pos.begin() + static_cast<int64_t>(i),
                 pos.begin() + static_cast<int64_t>(i + take));
      i += take;
      room -= static_cast<int64_t>(take);
    }
  }
  return parts;
}

std::vector<ShardBatch> CutIntoBatches(std::vector<std::map<int, std::vector<int64_t>>> plan,
                                       const std::vector<std::shared_ptr<ShardClient>>& shards,
                                       int64_t d_model, int64_t max_bytes) {
  std::vector<ShardBatch> batches;
  for (size_t s = 0; s < plan.size(); ++s) {
    if (plan[s].empty()) continue;
    const int64_t max_rows = MaxBatchAssignments(*shards[s], d_model, max_bytes);
    for (auto& part : SplitShardPlan(std::move(plan[s]), max_rows)) {
      batches.push_back(ShardBatch{static_cast<int>(s), std::move(part)});
    }
  }
  return batches;
}

absl::Status CheckShardAnswer(const google::protobuf::RepeatedPtrField<v1::ExpertOutput>& outputs,
                              const std::map<int, std::vector<int64_t>>& plan, int64_t d,
                              const std::string& shard) {
  std::vector<int> seen;
  for (const v1::ExpertOutput& out : outputs) {
    auto it = plan.find(out.expert());
    absl::StatusOr<common::TensorView> v = common::DecodeMatrix(out.output(), "output", d);
    if (it == plan.end() || !v.ok() || v->dim(0) != static_cast<int64_t>(it->second.size()) ||
        std::find(seen.begin(), seen.end(), out.expert()) != seen.end()) {
      return absl::InternalError(absl::StrCat("shard ", shard, " answered with a malformed output",
                                              " for expert ", out.expert()));
    }
    seen.push_back(out.expert());
  }
  if (seen.size() != plan.size()) {
    return absl::InternalError(absl::StrCat("shard ", shard, " left experts unanswered"));
  }
  return absl::OkStatus();
}

struct Dispatcher::Shared {
  common::ModelConfig config;
  DispatcherOptions options;
  // Calls not yet finished, held here (shard callbacks only hold weak references, so a shard
  // that never answers keeps nothing alive), and the number of Call objects not yet destroyed.
  std::mutex mu;
  std::condition_variable idle;
  std::map<uint64_t, std::shared_ptr<Call>> unfinished;
  std::atomic<uint64_t> next_call{0};
  int64_t alive = 0;
  bool stopping = false;
};

// Counts a Call from its construction to the end of its destruction (declared before the
// members that hold shard clients, so it is destroyed after them).
class Dispatcher::Token {
 public:
  explicit Token(Shared* shared) : shared_(shared) {
    std::lock_guard<std::mutex> lock(shared_->mu);
    ++shared_->alive;
  }
  ~Token() {
    std::lock_guard<std::mutex> lock(shared_->mu);
    if (--shared_->alive == 0) shared_->idle.notify_all();
  }

 private:
  Shared* shared_;
};

// One batch in flight. Sending a round and completing it never overlap: the round's answers are
// counted down from the number of shards sent to plus one, and the sender drops its one only
// after the last send, so whoever reaches zero (a shard callback or the sender) owns the round's
// state from there on. `mu_` guards the answers, the count and `finished_`; the deadline timer
// may finish the call at any time, after which answers are ignored. The Call is held by
// Shared::unfinished until it finishes, and otherwise only while one of its methods runs.
class Dispatcher::Call : public std::enable_shared_from_this<Dispatcher::Call> {
 public:
  Call(std::shared_ptr<Shared> shared, uint64_t id, std::shared_ptr<const RoutingTable> table,
       std::vector<float> x, int64_t n, GatingResult gating, absl::Time deadline, Done done)
      : shared_(std::move(shared)),
        token_(shared_.get()),
        id_(id),
        table_(std::move(table)),
        x_(std::move(x)),
        n_(n),
        gating_(std::move(gating)),
        deadline_(deadline),
        done_(std::move(done)) {}

  void Begin() {
    const int E = shared_->config.num_experts;
    const int S = static_cast<int>(table_->shards.size());
    groups_ = GroupByExpert(gating_);
    eo_.resize(groups_.assignment.size() * shared_->config.d_model);
    remaining_.resize(E);
    for (int e = 0; e < E; ++e) {
      for (int64_t p = groups_.offsets[e]; p < groups_.offsets[e + 1]; ++p) {
        remaining_[e].push_back(p);
      }
    }
    excluded_.assign(S, false);
    excluded_by_.assign(S, absl::OkStatus());
    missing_.assign(S, {});
    missing_by_.assign(S, absl::OkStatus());
    if (common::MonotonicNow() >= deadline_) {
      Finish(absl::DeadlineExceededError("deadline passed before the batch reached the shards"));
      return;
    }
    std::weak_ptr<Call> weak = weak_from_this();
    const uint64_t timer = common::DeadlineTimer::Process().Schedule(deadline_, [weak] {
      if (std::shared_ptr<Call> call = weak.lock()) call->Expire();
    });
    {
      std::lock_guard<std::mutex> lock(mu_);
      timer_id_ = timer;
    }
    SendRound();
  }

 private:
  void Expire() {
    std::set<int> waiting;  // shards with a batch not answered (a shard may have several)
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& [id, s] : unanswered_) waiting.insert(s);
    }
    Finish(absl::DeadlineExceededError(
        absl::StrCat("deadline passed waiting for ", waiting.size(), " shard(s) to answer")));
  }

  // Plans what is left over the healthy replicas and sends one batch per shard.
  void SendRound() {
    const int k = shared_->config.top_k, E = shared_->config.num_experts;
    const int64_t d = shared_->config.d_model;
    const RoutingTable& table = *table_;
    const int S = static_cast<int>(table.shards.size());
    bool any = false;
    bool stopping = false;
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      stopping = shared_->stopping;
    }
    if (stopping) {
      Finish(absl::UnavailableError("router is shutting down"));
      return;
    }
    for (const auto& r : remaining_) any |= !r.empty();
    if (!any) {
      Finish(CombineOutputs(gating_, groups_, eo_.data(), d));
      return;
    }
    // Rounds that only found experts missing on shards do not count: each took a (shard,
    // expert) pair out for good, so there are at most shards x experts of them.
    if (round_ - lack_rounds_ >= shared_->options.max_rounds) {
      for (int e = 0; e < E; ++e) {
        if (!remaining_[e].empty()) {
          Finish(absl::UnavailableError(absl::StrCat("expert ", e, " could not be computed after ",
                                                     shared_->options.max_rounds, " attempts")));
          return;
        }
      }
    }
    ++round_;
    // Plan: each expert's rows over its healthy replicas, evening out outstanding rows.
    std::vector<std::map<int, std::vector<int64_t>>> plan(S);
    std::vector<int64_t> planned(S, 0);
    for (int s = 0; s < S; ++s) {
      if (table.shards[s]) planned[s] = table.shards[s]->outstanding_rows();
    }
    // Ties (an idle router sees no outstanding work) go to the expert's home replica, a fixed
    // one per expert (and per piece of a large batch): a replica that serves an expert again
    // finds its weights still in cache, where going round the replicas made every copy of the
    // expert cold (at 1 row, 12 MiB of weights read from memory instead of cache). The homes of
    // different experts spread over the replicas; outstanding work still breaks every non-tie.
    for (int e = 0; e < E; ++e) {
      const std::vector<int64_t>& pos = remaining_[e];
      if (pos.empty()) continue;
      std::vector<int> cands, unhealthy;
      for (int s : table.placement.replicas[e]) {
        if (s >= S || !table.shards[s] || excluded_[s] || missing_[s].count(e) != 0 ||
            table.shards[s]->serves_other_model()) {
          continue;
        }
        (table.shards[s]->healthy() ? cands : unhealthy).push_back(s);
      }
      // With no replica in rotation, still try the ones out of it that this batch has not seen
      // fail: a health check may have been slow, and a dead shard fails fast anyway.
      if (cands.empty()) cands = unhealthy;
      if (cands.empty()) {
        std::vector<std::string> where;
        std::vector<std::string> errors;
        // Every replica (there is at least one) refused the rows for a full queue.
        bool all_full = !table.placement.replicas[e].empty();
        for (int s : table.placement.replicas[e]) {
          const bool known = s < S && table.shards[s];
          where.push_back(known ? table.shards[s]->address() : "?");
          const bool lacks = known && !excluded_[s] && missing_[s].count(e) != 0;
          if (known && (excluded_[s] || lacks)) {
            // Named once: most shard errors name their shard already.
            const absl::string_view why = (lacks ? missing_by_ : excluded_by_)[s].message();
            errors.push_back(absl::StrContains(why, table.shards[s]->address())
                                 ? std::string(why)
                                 : absl::StrCat(table.shards[s]->address(), ": ", why));
          }
          all_full = all_full && known && excluded_[s] &&
                     excluded_by_[s].code() == absl::StatusCode::kResourceExhausted;
        }
        if (all_full) {
          // Busy, not down: the client should slow down and retry, not look for a dead shard.
          Finish(absl::ResourceExhaustedError(absl::StrCat(
              "expert ", e, ": every replica's queue is full (", absl::StrJoin(errors, "; "),
              "); retry later or send smaller batches")));
          return;
        }
        Finish(absl::UnavailableError(absl::StrCat(
            "expert ", e, " has no healthy replica (placement version ", table.placement.version,
            ", hosted on ", absl::StrJoin(where, ", "), ")",
            errors.empty() ? "" : absl::StrCat(": ", absl::StrJoin(errors, "; ")))));
        return;
      }
      const int64_t chunk =
          std::max<int64_t>({int64_t{1}, shared_->options.min_split_rows,
                             static_cast<int64_t>(pos.size() / (4 * cands.size()))});
      for (size_t i = 0; i < pos.size(); i += chunk) {
        const size_t first =
            static_cast<size_t>((static_cast<size_t>(e) + i / static_cast<size_t>(chunk)) %
                                cands.size());
        int best = cands[first];
        for (size_t j = 1; j < cands.size(); ++j) {
          const int s = cands[(first + j) % cands.size()];
          if (planned[s] < planned[best]) best = s;
        }
        const size_t end = std::min(pos.size(), i + static_cast<size_t>(chunk));
        auto& dst = plan[best][e];
        dst.insert(dst.end(), pos.begin() + static_cast<int64_t>(i),
                   pos.begin() + static_cast<int64_t>(end));
        planned[best] += static_cast<int64_t>(end - i);
      }
    }
    for (auto& r : remaining_) r.clear();
    const absl::Duration left = deadline_ - common::MonotonicNow();
    if (left <= absl::ZeroDuration()) {
      Finish(absl::DeadlineExceededError("deadline passed before the batch reached the shards"));
      return;
    }
    const uint32_t timeout_ms = static_cast<uint32_t>(
        std::clamp<int64_t>(absl::ToInt64Milliseconds(left), 1, int64_t{1} << 31));
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      results_.clear();
      waiting_ = 1;  // the sender's own count, dropped after the last send
    }
    // One batch per shard (more where its share passes the batch limits); a token row used by
    // several of a batch's experts travels once.
    parts_ = CutIntoBatches(std::move(plan), table.shards, d, shared_->options.max_batch_bytes);
    std::vector<int32_t> local(n_, -1);
    std::weak_ptr<Call> weak = weak_from_this();
    for (int b = 0; b < static_cast<int>(parts_.size()); ++b) {
      const ShardBatch& part = parts_[b];
      auto req =
          BuildShardRequest(part.plan, groups_, k, x_.data(), d, shared_->options.wire, &local);
      req->set_timeout_ms(timeout_ms);
      req->set_placement_version(table.placement.version);
      int64_t total = 0;
      for (const auto& [e, pos] : part.plan) total += static_cast<int64_t>(pos.size());
      {
        std::lock_guard<std::mutex> lock(mu_);
        // Finished meanwhile (deadline, cancellation, shutdown): Finish has cancelled what was
        // sent, and nothing more goes out.
        if (finished_) return;
        ++waiting_;
        ++stats_.shard_batches;
        unanswered_[req->batch_id()] = part.shard;
      }
      table.shards[part.shard]->Dispatch(
          req, total, [weak, b, id = req->batch_id()](absl::StatusOr<v1::DispatchResponse> r) {
            if (std::shared_ptr<Call> self = weak.lock()) self->Answer(b, id, std::move(r));
          });
      // Ended between the registration above and this send (the client's cancellation, the
      // deadline): Finish's cancellation reached the shard client before the batch did, and a
      // stream cancels only the batches it has. Cancelled again, now that it has it (a second
      // cancellation of a batch, or one of a batch answered, changes nothing).
      bool ended = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        ended = finished_;
      }
      if (ended) table.shards[part.shard]->CancelBatch(req->batch_id());
    }
    Answer(-1, 0, absl::StatusOr<v1::DispatchResponse>());  // the sender's count
  }

  // One answer of the round, to batch `id` of part `b` (part -1: the sender is done sending).
  void Answer(int b, uint64_t id, absl::StatusOr<v1::DispatchResponse> r) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (b >= 0) {
        unanswered_.erase(id);
        results_.emplace_back(b, std::move(r));
      }
      if (--waiting_ > 0 || finished_) return;
    }
    const DispatcherOptions& o = shared_->options;
    if (o.offload && static_cast<int64_t>(groups_.assignment.size()) > o.inline_assignments) {
      std::shared_ptr<Call> self = shared_from_this();
      if (o.offload([self] { self->RoundDone(); })) return;
    }
    RoundDone();
  }

  // Every answer of the round is in: copy the outputs into place, fail over what failed, and
  // either send the next round or finish.
  void RoundDone() {
    const int64_t d = shared_->config.d_model;
    const RoutingTable& table = *table_;
    std::vector<std::pair<int, absl::StatusOr<v1::DispatchResponse>>> results;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      results.swap(results_);
    }
    bool lacks = false;   // a shard said it lacks an expert
    bool failed = false;  // a shard failed otherwise
    for (auto& [b, result] : results) {
      const int s = parts_[b].shard;
      const std::map<int, std::vector<int64_t>>& plan = parts_[b].plan;
      absl::Status err = result.ok() ? absl::Status(static_cast<absl::StatusCode>(result->code()),
                                                    result->message())
                                     : result.status();
      if (err.ok()) {
        err = CheckShardAnswer(result->outputs(), plan, d, table.shards[s]->address());
        if (err.ok()) {
          for (const v1::ExpertOutput& out : result->outputs()) {
            const std::vector<int64_t>& pos = plan.at(out.expert());  // CheckShardAnswer
            const common::TensorView v = *common::DecodeMatrix(out.output(), "output", d);
            // FP32 rows are copied straight from the message; BF16 ones are decoded first.
            std::vector<float> decoded;
            const char* src = v.bytes.data();
            if (v.type != common::WireType::kFloat32) {
              decoded = common::ViewToFloat(v);
              src = reinterpret_cast<const char*>(decoded.data());
            }
            for (size_t i = 0; i < pos.size(); ++i) {
              std::memcpy(&eo_[pos[i] * d], src + i * d * sizeof(float), sizeof(float) * d);
            }
          }
          continue;
        }
      }
      if (err.code() == absl::StatusCode::kDeadlineExceeded) {
        Finish(absl::DeadlineExceededError(absl::StrCat(
            "deadline passed on shard ", table.shards[s]->address(), ": ", err.message())));
        return;
      }
      if (!Retryable(err.code())) {
        Finish(absl::Status(err.code(), absl::StrCat("shard ", table.shards[s]->address(), ": ",
                                                     err.message())));
        return;
      }
      // The shard lacks some of the batch's experts (this router's placement is older than
      // what the shard was last given, or a load failed there): only those leave it for the
      // rest of the request; the batch's other experts may go back to it.
      if (LacksOnly(result, plan, s, err)) {
        lacks = true;
        for (const auto& [e, pos] : plan) {
          remaining_[e].insert(remaining_[e].end(), pos.begin(), pos.end());
        }
        continue;
      }
      failed = true;
      // Fail over: this shard is out for the rest of the batch; its rows go elsewhere. One
      // failover per shard, however many of its batches the failure took down.
      if (!excluded_[s]) {
        std::lock_guard<std::mutex> lock(mu_);
        ++stats_.failovers;
      }
      excluded_[s] = true;
      excluded_by_[s] = err;
      for (const auto& [e, pos] : plan) {
        remaining_[e].insert(remaining_[e].end(), pos.begin(), pos.end());
      }
    }
    if (lacks && !failed) ++lack_rounds_;
    SendRound();
  }

  // A FAILED_PRECONDITION naming experts of the batch that shard `s` does not hold
  // (DispatchResponse.missing_experts): records them against `s` and returns true. False for
  // any other failure, or a list naming none of the batch's experts (the shard then leaves the
  // request, as for any other failure). The same expert may be named by several batches of a
  // round (a shard's share cut into batches).
  bool LacksOnly(const absl::StatusOr<v1::DispatchResponse>& result,
                 const std::map<int, std::vector<int64_t>>& plan, int s, const absl::Status& err) {
    if (!result.ok() || !absl::IsFailedPrecondition(err)) return false;
    bool any = false;
    for (int e : result->missing_experts()) {
      if (plan.count(e) == 0) continue;
      missing_[s].insert(e);
      any = true;
    }
    if (any) missing_by_[s] = err;
    return any;
  }

  void Finish(absl::StatusOr<std::vector<float>> y) {
    uint64_t timer = 0;
    DispatchStats stats;
    std::map<uint64_t, int> unanswered;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
      timer = timer_id_;
      stats = stats_;
      unanswered.swap(unanswered_);
    }
    if (timer != 0) common::DeadlineTimer::Process().Cancel(timer);
    // Ended before every shard answered (the deadline, a failure elsewhere, the client's
    // cancellation, shutdown): the shards drop what they have not begun of it. A shard that
    // was stalled would otherwise compute it once it runs again, for nobody.
    for (const auto& [id, s] : unanswered) table_->shards[s]->CancelBatch(id);
    Done done = std::move(done_);
    done(std::move(y), gating_, stats);
    // No longer held for its answers: it goes once the method that finished it returns.
    std::shared_ptr<Call> self;
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      auto it = shared_->unfinished.find(id_);
      if (it != shared_->unfinished.end()) {
        self = std::move(it->second);
        shared_->unfinished.erase(it);
      }
    }
  }

 public:
  // Dispatcher::Cancel and Shutdown: fails the call now.
  void End(absl::Status why) { Finish(std::move(why)); }

 private:
  const std::shared_ptr<Shared> shared_;
  const Token token_;  // destroyed after the members below (table_ holds the shard clients)
  const uint64_t id_;  // its key in Shared::unfinished
  const std::shared_ptr<const RoutingTable> table_;
  const std::vector<float> x_;
  const int64_t n_;
  const GatingResult gating_;
  const absl::Time deadline_;
  Done done_;

  // The round's state, owned by the thread that sends or completes it (see above).
  ExpertGroups groups_;
  std::vector<float> eo_;
  std::vector<std::vector<int64_t>> remaining_;  // positions still to compute, per expert
  std::vector<bool> excluded_;
  std::vector<absl::Status> excluded_by_;  // the error that took each excluded shard out
  std::vector<std::set<int>> missing_;     // per shard, the experts it said it does not hold
  std::vector<absl::Status> missing_by_;   // the error that said so last
  std::vector<ShardBatch> parts_;          // the round's batches
  int round_ = 0;
  int lack_rounds_ = 0;  // rounds whose only failures were experts missing on shards
  DispatchStats stats_;

  std::mutex mu_;
  int waiting_ = 0;
  bool finished_ = false;
  uint64_t timer_id_ = 0;
  std::vector<std::pair<int, absl::StatusOr<v1::DispatchResponse>>> results_;
  std::map<uint64_t, int> unanswered_;  // batches sent and not answered: id -> shard
};

Dispatcher::Dispatcher(const common::ModelConfig& config, DispatcherOptions options)
    : shared_(std::make_shared<Shared>()) {
  shared_->config = config;
  shared_->options = std::move(options);
}

Dispatcher::~Dispatcher() { Shutdown(); }

uint64_t Dispatcher::Start(std::shared_ptr<const RoutingTable> table, std::vector<float> x,
                           int64_t n, GatingResult gating, absl::Time deadline, Done done) {
  const uint64_t id = ++shared_->next_call;
  auto call = std::make_shared<Call>(shared_, id, std::move(table), std::move(x), n,
                                     std::move(gating), deadline, std::move(done));
  {
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->unfinished[id] = call;
  }
  call->Begin();
  return id;
}

void Dispatcher::Cancel(uint64_t id, absl::Status why) {
  std::shared_ptr<Call> call;
  {
    std::lock_guard<std::mutex> lock(shared_->mu);
    auto it = shared_->unfinished.find(id);
    if (it == shared_->unfinished.end()) return;
    call = it->second;
  }
  call->End(std::move(why));
}

void Dispatcher::Shutdown() {
  std::vector<std::shared_ptr<Call>> calls;
  {
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->stopping = true;
    for (auto& [id, call] : shared_->unfinished) calls.push_back(call);
  }
  for (auto& call : calls) call->End(absl::UnavailableError("router is shutting down"));
  calls.clear();
  std::unique_lock<std::mutex> lock(shared_->mu);
  shared_->idle.wait(lock, [this] { return shared_->alive == 0; });
}

absl::StatusOr<std::vector<float>> Dispatcher::Run(const RoutingTable& table, const float* x,
                                                   int64_t n, const GatingResult& gating,
                                                   absl::Time deadline, DispatchStats* stats) {
  common::Notification answered;
  absl::StatusOr<std::vector<float>> out;
  Start(std::make_shared<const RoutingTable>(table),
        std::vector<float>(x, x + n * shared_->config.d_model), n, gating, deadline,
        [&](absl::StatusOr<std::vector<float>> y, const GatingResult&, const DispatchStats& st) {
          out = std::move(y);
          if (stats) *stats = st;
          answered.Notify();
        });
  answered.WaitForNotification();
  return out;
}

}  // namespace moe::router
