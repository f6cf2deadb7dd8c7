#include "expert_server/compute_pool.h"

#include <gtest/gtest.h>

#include "services/common/notification.h"
#include "services/common/random_checkpoint.h"

namespace moe::expert {
namespace {

common::ModelConfig Config() {
  common::ModelConfig c;
  c.num_experts = 2;
  c.d_model = 8;
  c.d_ff = 16;
  c.top_k = 1;
  c.activation = common::Activation::kGelu;
  return c;
}

struct Fixture {
  Fixture()
      : ck(common::MakeRandomCheckpoint({Config(), true, 5})),
        store(Config(), [this](int e) { return absl::StatusOr<LoadedExpert>({ck.experts[e], 0}); },
              nullptr) {
    common::Notification n;
    EXPECT_TRUE(store.Load({0, 1}, 0, "", [&](absl::Status) { n.Notify(); }).ok());
    n.WaitForNotification();
  }

  std::shared_ptr<DispatchTask> Task(int expert, int64_t rows, common::Notification* done,
                                     absl::Status* result) {
    auto t = std::make_shared<DispatchTask>();
    t->num_rows = rows;
    t->rows = common::RandomMatrix(rows, 8, rows);
    DispatchTask::Part p;
    p.expert = expert;
    p.lease = std::move(*store.Acquire(expert, rows));
    for (int i = 0; i < rows; ++i) p.row_index.push_back(static_cast<int32_t>(rows - 1 - i));
    t->parts.push_back(std::move(p));
    t->done = [done, result](DispatchTask&, const absl::Status& st) {
      *result = st;
      done->Notify();
    };
    return t;
  }

  common::Checkpoint ck;
  ExpertStore store;
};

TEST(ComputePool, ComputesRowsInTheRequestedOrder) {
  Fixture fx;
  ComputePool pool(8, ComputePoolOptions{}, nullptr);
  common::Notification done;
  absl::Status result;
  auto task = fx.Task(1, 5, &done, &result);
  ASSERT_TRUE(pool.Submit(task).ok());
  done.WaitForNotification();
  ASSERT_TRUE(result.ok()) << result;
  // Row i of the output is the expert applied to input row 4 - i.
  auto ffn = ExpertFfn::Create(Config(), fx.ck.experts[1]);
  for (int i = 0; i < 5; ++i) {
    std::vector<float> y(8);
    ASSERT_TRUE((*ffn)->Forward(&task->rows[(4 - i) * 8], 1, y.data()).ok());
    for (int j = 0; j < 8; ++j) EXPECT_NEAR(task->parts[0].output[i * 8 + j], y[j], 1e-6);
  }
}

TEST(ComputePool, QueueLimitAndShutdown) {
  Fixture fx;
  ComputePoolOptions o;
  o.batch_delay = absl::Seconds(10);  // nothing gets computed before Shutdown
  o.max_queue_rows = 10;
  ComputePool pool(8, o, nullptr);
  common::Notification d1, d2, d3;
  absl::Status r1, r2, r3;
  ASSERT_TRUE(pool.Submit(fx.Task(0, 6, &d1, &r1)).ok());
  EXPECT_EQ(pool.queued_rows(), 6);
  EXPECT_EQ(pool.Submit(fx.Task(0, 5, &d2, &r2)).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(pool.Submit(fx.Task(1, 4, &d3, &r3)).ok());
  EXPECT_EQ(pool.queued_rows(), 10);
  EXPECT_EQ(pool.queued_batches(), 2);
  pool.Shutdown();
  d1.WaitForNotification();
  d3.WaitForNotification();
  EXPECT_EQ(r1.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(r3.code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(d2.HasBeenNotified());
  EXPECT_EQ(pool.Submit(fx.Task(0, 1, &d2, &r2)).code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace moe::expert
