#include "router/dispatcher.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "router/moe_layer.h"
#include "services/common/bf16.h"

namespace moe::router {
namespace {

// The answers of one send round, shared with the shard callbacks (which may outlive the round).
struct Round {
  std::mutex mu;
  std::condition_variable cv;
  int waiting = 0;
  std::vector<std::pair<int, absl::StatusOr<v1::DispatchResponse>>> results;
};

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
  auto req = std::make_shared<v1::DispatchRequest>();
  req->set_output_dtype(wire == common::WireType::kBFloat16 ? v1::BFLOAT16 : v1::FLOAT32);
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

Dispatcher::Dispatcher(const common::ModelConfig& config, DispatcherOptions options)
    : config_(config), options_(options) {}

absl::StatusOr<std::vector<float>> Dispatcher::Run(const RoutingTable& table, const float* x,
                                                   int64_t n, const GatingResult& gating,
                                                   absl::Time deadline, DispatchStats* stats) {
  const int k = config_.top_k, E = config_.num_experts;
  const int64_t d = config_.d_model;
  const int S = static_cast<int>(table.shards.size());
  const ExpertGroups groups = GroupByExpert(gating);
  std::vector<float> eo(groups.assignment.size() * d);
  // Positions (into groups.assignment) still to compute, per expert.
  std::vector<std::vector<int64_t>> remaining(E);
  for (int e = 0; e < E; ++e) {
    for (int64_t p = groups.offsets[e]; p < groups.offsets[e + 1]; ++p) remaining[e].push_back(p);
  }
  std::vector<bool> excluded(S, false);
  for (int round = 0; round < options_.max_rounds; ++round) {
    bool any = false;
    for (const auto& r : remaining) any |= !r.empty();
    if (!any) break;
    // Plan: each expert's rows over its healthy replicas, evening out outstanding rows.
    std::vector<std::map<int, std::vector<int64_t>>> plan(S);
    std::vector<int64_t> planned(S, 0);
    for (int s = 0; s < S; ++s) {
      if (table.shards[s]) planned[s] = table.shards[s]->outstanding_rows();
    }
    for (int e = 0; e < E; ++e) {
      const std::vector<int64_t>& pos = remaining[e];
      if (pos.empty()) continue;
      std::vector<int> cands, unhealthy;
      for (int s : table.placement.replicas[e]) {
        if (s >= S || !table.shards[s] || excluded[s]) continue;
        (table.shards[s]->healthy() ? cands : unhealthy).push_back(s);
      }
      // With no replica in rotation, still try the ones out of it that this batch has not seen
      // fail: a health check may have been slow, and a dead shard fails fast anyway.
      if (cands.empty()) cands = unhealthy;
      if (cands.empty()) {
        std::vector<std::string> where;
        for (int s : table.placement.replicas[e]) {
          where.push_back(s < S && table.shards[s] ? table.shards[s]->address() : "?");
        }
        return absl::UnavailableError(absl::StrCat(
            "expert ", e, " has no healthy replica (placement version ",
            table.placement.version, ", hosted on ", absl::StrJoin(where, ", "), ")"));
      }
      const int64_t chunk =
          std::max<int64_t>(1, static_cast<int64_t>(pos.size()) / (4 * cands.size()));
      for (size_t i = 0; i < pos.size(); i += chunk) {
        int best = cands[0];
        for (int s : cands) {
          if (planned[s] < planned[best]) best = s;
        }
        const size_t end = std::min(pos.size(), i + static_cast<size_t>(chunk));
        auto& dst = plan[best][e];
        dst.insert(dst.end(), pos.begin() + static_cast<int64_t>(i),
                   pos.begin() + static_cast<int64_t>(end));
        planned[best] += static_cast<int64_t>(end - i);
      }
    }
    for (auto& r : remaining) r.clear();
    // Send one batch per shard; a token row used by several of its experts travels once.
    auto rd = std::make_shared<Round>();
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError("deadline passed before the batch reached the shards");
    }
    const uint32_t timeout_ms = static_cast<uint32_t>(
        std::clamp<int64_t>(absl::ToInt64Milliseconds(left), 1, int64_t{1} << 31));
    std::vector<int32_t> local(n, -1);
    for (int s = 0; s < S; ++s) {
      if (plan[s].empty()) continue;
      auto req = BuildShardRequest(plan[s], groups, k, x, d, options_.wire, &local);
      req->set_batch_id(next_batch_id_.fetch_add(1));
      req->set_timeout_ms(timeout_ms);
      req->set_placement_version(table.placement.version);
      int64_t total = 0;
      for (const auto& [e, pos] : plan[s]) total += static_cast<int64_t>(pos.size());
      {
        std::lock_guard<std::mutex> lock(rd->mu);
        ++rd->waiting;
      }
      if (stats) ++stats->shard_batches;
      table.shards[s]->Dispatch(req, total, [rd, s](absl::StatusOr<v1::DispatchResponse> r) {
        std::lock_guard<std::mutex> lock(rd->mu);
        rd->results.emplace_back(s, std::move(r));
        --rd->waiting;
        rd->cv.notify_all();
      });
    }
    std::vector<std::pair<int, absl::StatusOr<v1::DispatchResponse>>> results;
    {
      std::unique_lock<std::mutex> lock(rd->mu);
      const bool all = rd->cv.wait_until(lock, absl::ToChronoTime(deadline),
                                         [&] { return rd->waiting == 0; });
      if (!all) {
        return absl::DeadlineExceededError(absl::StrCat(
            "deadline passed waiting for ", rd->waiting, " shard(s) to answer"));
      }
      results.swap(rd->results);
    }
    for (auto& [s, result] : results) {
      absl::Status err = result.ok() ? absl::Status(static_cast<absl::StatusCode>(result->code()),
                                                    result->message())
                                     : result.status();
      if (err.ok()) {
        // Copy each expert's rows back to their positions, checking the shapes.
        for (const v1::ExpertOutput& out : result->outputs()) {
          auto it = plan[s].find(out.expert());
          absl::StatusOr<common::TensorView> v = common::DecodeMatrix(out.output(), "output", d);
          if (it == plan[s].end() || !v.ok() ||
              v->dim(0) != static_cast<int64_t>(it->second.size())) {
            err = absl::InternalError(absl::StrCat("shard ", table.shards[s]->address(),
                                                   " answered with a malformed output"));
            break;
          }
        }
        if (err.ok() && result->outputs_size() != static_cast<int>(plan[s].size())) {
          err = absl::InternalError(absl::StrCat("shard ", table.shards[s]->address(),
                                                 " left experts unanswered"));
        }
        if (err.ok()) {
          for (const v1::ExpertOutput& out : result->outputs()) {
            const std::vector<int64_t>& pos = plan[s][out.expert()];
            const common::TensorView v = *common::DecodeMatrix(out.output(), "output", d);
            std::vector<float> vals = common::ViewToFloat(v);
            for (size_t i = 0; i < pos.size(); ++i) {
              std::memcpy(&eo[pos[i] * d], &vals[i * d], sizeof(float) * d);
            }
          }
          continue;
        }
      }
      if (err.code() == absl::StatusCode::kDeadlineExceeded) {
        return absl::DeadlineExceededError(absl::StrCat(
            "deadline passed on shard ", table.shards[s]->address(), ": ", err.message()));
      }
      if (!Retryable(err.code())) {
        return absl::Status(err.code(), absl::StrCat("shard ", table.shards[s]->address(), ": ",
                                                     err.message()));
      }
      // Fail over: this shard is out for the rest of the batch; its rows go elsewhere.
      excluded[s] = true;
      if (stats) ++stats->failovers;
      for (const auto& [e, pos] : plan[s]) {
        remaining[e].insert(remaining[e].end(), pos.begin(), pos.end());
      }
    }
  }
  for (int e = 0; e < E; ++e) {
    if (!remaining[e].empty()) {
      return absl::UnavailableError(absl::StrCat("expert ", e, " could not be computed after ",
                                                 options_.max_rounds, " attempts"));
    }
  }
  std::vector<float> y = CombineOutputs(gating, groups, eo.data(), d);
  return y;
}

}  // namespace moe::router
