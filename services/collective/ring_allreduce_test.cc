#include "services/collective/ring_allreduce.h"

#include <chrono>
#include <thread>

#include <gtest/gtest.h>

#include "services/collective/in_memory_transport.h"
#include "services/common/clock.h"

namespace moe::collective {
namespace {

// Runs `world` ranks as threads; rank r's buffer starts as init(r, i).
std::vector<std::vector<float>> RunRing(int world, int64_t length, const AllReduceOptions& opts,
                                        float (*init)(int, int64_t),
                                        std::vector<absl::Status>* status,
                                        InMemoryRing* ring = nullptr, uint64_t generation = 1) {
  std::unique_ptr<InMemoryRing> own;
  if (ring == nullptr) {
    own = std::make_unique<InMemoryRing>(world);
    ring = own.get();
  }
  std::vector<std::vector<float>> data(world, std::vector<float>(length));
  for (int r = 0; r < world; ++r) {
    for (int64_t i = 0; i < length; ++i) data[r][i] = init(r, i);
  }
  status->assign(world, absl::OkStatus());
  std::vector<std::thread> threads;
  const absl::Time deadline = common::MonotonicNow() + absl::Seconds(30);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      (*status)[r] = RingAllReduce(absl::MakeSpan(data[r]), r, world, generation, deadline,
                                   ring->transport(r), opts);
    });
  }
  for (auto& t : threads) t.join();
  return data;
}

float IntegerInit(int r, int64_t i) { return static_cast<float>((r + 1) * 3 + (i % 11) - 5); }

// A one-float chunk of collective `generation`, its four bytes all `fill`, as a peer would send.
Chunk OneElementChunk(uint64_t generation, char fill) {
  Chunk c;
  c.generation = generation;
  c.count = 1;
  c.payload = Payload::Copy(std::string(4, fill));
  return c;
}

class RingTest : public ::testing::TestWithParam<int> {};

TEST_P(RingTest, SumIsExactForEveryLength) {
  const int world = GetParam();
  for (int64_t length : {0L, 1L, static_cast<int64_t>(world - 1), static_cast<int64_t>(world + 1),
                         1000L, 40001L}) {
    AllReduceOptions opts;
    opts.max_piece_bytes = 4096;  // many pieces per segment
    std::vector<absl::Status> st;
    auto out = RunRing(world, length, opts, IntegerInit, &st);
    for (int r = 0; r < world; ++r) {
      ASSERT_TRUE(st[r].ok()) << st[r];
      for (int64_t i = 0; i < length; ++i) {
        float want = 0;
        for (int q = 0; q < world; ++q) want += IntegerInit(q, i);
        ASSERT_EQ(out[r][i], want) << "world " << world << " length " << length << " rank " << r
                                   << " i " << i;
      }
    }
  }
}

TEST_P(RingTest, AverageAndBf16WireAreIdenticalOnEveryRank) {
  const int world = GetParam();
  const int64_t length = 5003;
  for (WireFormat wire : {WireFormat::kFloat32, WireFormat::kBFloat16}) {
    AllReduceOptions opts;
    opts.op = ReduceOp::kAvg;
    opts.wire = wire;
    opts.max_piece_bytes = 1000;
    std::vector<absl::Status> st;
    // Every rank holds the same integers times (rank + 1): the mean is exact.
    auto out = RunRing(world, length, opts,
                       [](int r, int64_t i) { return static_cast<float>((r + 1) * (i % 5)); },
                       &st);
    const float scale = (world + 1) / 2.0f;
    for (int r = 0; r < world; ++r) {
      ASSERT_TRUE(st[r].ok()) << st[r];
      EXPECT_EQ(out[r], out[0]) << "rank " << r << " differs";
      for (int64_t i = 0; i < length; ++i) ASSERT_EQ(out[r][i], scale * (i % 5)) << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Worlds, RingTest, ::testing::Values(1, 2, 3, 4, 7));

TEST(Ring, SegmentsCoverTheBuffer) {
  for (int world : {1, 3, 7}) {
    for (int64_t length : {0L, 2L, 10L, 13L}) {
      int64_t next = 0;
      for (int i = 0; i < world; ++i) {
        auto [b, e] = Segment(length, world, i);
        EXPECT_EQ(b, next);
        EXPECT_LE(e - b, length / world + 1);
        next = e;
      }
      EXPECT_EQ(next, length);
    }
  }
}

TEST(Ring, FusedTensorsComeBackReduced) {
  const int world = 3;
  InMemoryRing ring(world);
  std::vector<std::vector<float>> a(world, std::vector<float>(7)), b(world, std::vector<float>(2));
  std::vector<std::thread> threads;
  std::vector<absl::Status> st(world);
  for (int r = 0; r < world; ++r) {
    for (int i = 0; i < 7; ++i) a[r][i] = static_cast<float>(r + i);
    for (int i = 0; i < 2; ++i) b[r][i] = static_cast<float>(10 * r - i);
    threads.emplace_back([&, r] {
      st[r] = RingAllReduceFused({absl::MakeSpan(a[r]), absl::MakeSpan(b[r])}, r, world, 1,
                                 common::MonotonicNow() + absl::Seconds(10), ring.transport(r));
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r) {
    ASSERT_TRUE(st[r].ok());
    for (int i = 0; i < 7; ++i) EXPECT_EQ(a[r][i], 3.f + 3 * i);
    for (int i = 0; i < 2; ++i) EXPECT_EQ(b[r][i], 30.f - 3 * i);
  }
}

// Like the gRPC transport: borrows the sender's memory, copies the bytes when it "writes" them
// (Send), and lets go of the borrowed owner only later, from another thread.
class LateReleasingTransport final : public PeerTransport {
 public:
  explicit LateReleasingTransport(PeerTransport* inner) : inner_(inner) {}
  ~LateReleasingTransport() override {
    for (auto& t : releasers_) t.join();
  }
  absl::Status Send(Chunk chunk) override {
    std::string bytes;
    for (absl::string_view p : chunk.payload.pieces) bytes.append(p.data(), p.size());
    borrowed_ += chunk.payload.owner != nullptr ? 1 : 0;
    releasers_.emplace_back([owner = std::move(chunk.payload.owner)]() mutable {
      std::this_thread::sleep_for(std::chrono::milliseconds(40));
      owner.reset();
    });
    chunk.payload = Payload::Take(std::move(bytes));
    return inner_->Send(std::move(chunk));
  }
  absl::StatusOr<Chunk> Recv(uint64_t generation, absl::Time deadline) override {
    return inner_->Recv(generation, deadline);
  }
  bool CanBorrow() const override { return true; }
  int borrowed_ = 0;

 private:
  PeerTransport* inner_;
  std::vector<std::thread> releasers_;
};

TEST(Ring, BorrowedSendsAreWaitedForBeforeReturning) {
  const int world = 3;
  const int64_t length = 1000;
  InMemoryRing ring(world);
  std::vector<std::shared_ptr<std::vector<float>>> data;
  std::vector<std::unique_ptr<LateReleasingTransport>> transports;
  for (int r = 0; r < world; ++r) {
    data.push_back(std::make_shared<std::vector<float>>(length));
    for (int64_t i = 0; i < length; ++i) (*data[r])[i] = IntegerInit(r, i);
    transports.push_back(std::make_unique<LateReleasingTransport>(ring.transport(r)));
  }
  std::vector<absl::Status> st(world);
  std::vector<absl::Duration> took(world);
  std::vector<char> exact(world, 1);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      AllReduceOptions o;
      o.max_piece_bytes = 400;  // several pieces per segment
      o.keepalive = data[r];
      const absl::Time start = common::MonotonicNow();
      st[r] = RingAllReduce(absl::MakeSpan(*data[r]), r, world, 1,
                            common::MonotonicNow() + absl::Seconds(10), transports[r].get(), o);
      took[r] = common::MonotonicNow() - start;
      for (int64_t i = 0; i < length; ++i) {
        float want = 0;
        for (int q = 0; q < world; ++q) want += IntegerInit(q, i);
        exact[r] = exact[r] && (*data[r])[i] == want;
      }
      // The collective returned: nothing holds the buffer's loan any more, so the caller may
      // change it at once (a transport still reading it would trip ASan or the sums above).
      for (float& v : *data[r]) v = -1;
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r) {
    ASSERT_TRUE(st[r].ok()) << st[r];
    EXPECT_GT(transports[r]->borrowed_, 0);
    EXPECT_TRUE(exact[r]) << "rank " << r;
    // It waited for the late releases of its last pieces.
    EXPECT_GE(took[r], absl::Milliseconds(40));
  }
}

// The ring asks its transport for its own generation's chunks, and completes with a stray chunk
// of another collective in its mailbox. The filter itself is the transport's: the in-memory
// one's here, the gRPC hub's in CollectiveHub.TakeDropsOlderGenerationsAndKeepsNewerOnes...
// (tests/collective/grpc_ring_test.cc).
TEST(Ring, OlderGenerationMessagesAreRefused) {
  const int world = 3;
  InMemoryRing ring(world);
  ring.Inject(0, OneElementChunk(/*generation=*/4, '\0'));
  std::vector<absl::Status> st;
  auto out = RunRing(world, 100, AllReduceOptions{}, IntegerInit, &st, &ring, /*generation=*/5);
  for (int r = 0; r < world; ++r) ASSERT_TRUE(st[r].ok()) << st[r];
  EXPECT_EQ(ring.refused(), 1);
  float want = 0;
  for (int q = 0; q < world; ++q) want += IntegerInit(q, 7);
  EXPECT_EQ(out[1][7], want);
}

// A chunk of a newer collective that arrives early (its sender has moved on) is neither taken
// for the running collective nor dropped: it waits for its own generation.
TEST(Ring, NewerGenerationMessagesWaitForTheirCollective) {
  const int world = 3;
  InMemoryRing ring(world);
  ring.Inject(0, OneElementChunk(/*generation=*/6, '\x7f'));
  std::vector<absl::Status> st;
  auto out = RunRing(world, 100, AllReduceOptions{}, IntegerInit, &st, &ring, /*generation=*/5);
  for (int r = 0; r < world; ++r) ASSERT_TRUE(st[r].ok()) << st[r];
  for (int r = 0; r < world; ++r) {
    for (int64_t i = 0; i < 100; ++i) {
      float want = 0;
      for (int q = 0; q < world; ++q) want += IntegerInit(q, i);
      ASSERT_EQ(out[r][i], want) << "rank " << r << " element " << i;
    }
  }
  EXPECT_EQ(ring.refused(), 0);
  // Generation 7 finds it stale and drops it.
  RunRing(world, 10, AllReduceOptions{}, IntegerInit, &st, &ring, /*generation=*/7);
  for (int r = 0; r < world; ++r) ASSERT_TRUE(st[r].ok()) << st[r];
  EXPECT_EQ(ring.refused(), 1);
}

// A transport that breaks the ring after `sends` sends of its rank (the rank dies mid-way).
class DyingTransport : public PeerTransport {
 public:
  DyingTransport(InMemoryRing* ring, int rank, int sends)
      : ring_(ring), rank_(rank), left_(sends) {}
  absl::Status Send(Chunk c) override {
    if (left_-- <= 0) {
      ring_->Kill(rank_);
      return absl::AbortedError("killed");
    }
    return ring_->transport(rank_)->Send(std::move(c));
  }
  absl::StatusOr<Chunk> Recv(uint64_t g, absl::Time d) override {
    return ring_->transport(rank_)->Recv(g, d);
  }

 private:
  InMemoryRing* ring_;
  int rank_;
  int left_;
};

// Runs 4 ranks where rank 2 misbehaves as `victim` says; returns each survivor's status and how
// long it took relative to the deadline.
void RunWithVictim(const std::function<void(InMemoryRing&, std::vector<float>&, absl::Time)>& victim) {
  const int world = 4;
  InMemoryRing ring(world);
  const absl::Duration timeout = absl::Milliseconds(400);
  const absl::Time deadline = common::MonotonicNow() + timeout;
  std::vector<std::vector<float>> data(world, std::vector<float>(100000, 1.f));
  std::vector<absl::Status> st(world);
  std::vector<absl::Time> ended(world);
  AllReduceOptions opts;
  opts.max_piece_bytes = 8192;
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      if (r == 2) {
        victim(ring, data[r], deadline);
        return;
      }
      st[r] = RingAllReduce(absl::MakeSpan(data[r]), r, world, 1, deadline, ring.transport(r),
                            opts);
      ended[r] = common::MonotonicNow();
    });
  }
  for (auto& t : threads) t.join();
  for (int r : {0, 1, 3}) {
    EXPECT_TRUE(st[r].code() == absl::StatusCode::kAborted ||
                st[r].code() == absl::StatusCode::kDeadlineExceeded)
        << "rank " << r << ": " << st[r];
    EXPECT_LT(ended[r] - deadline, absl::Milliseconds(500)) << "rank " << r;
  }
}

TEST(Ring, SurvivorsReturnWhenARankDiesMidway) {
  RunWithVictim([](InMemoryRing& ring, std::vector<float>& data, absl::Time deadline) {
    DyingTransport dying(&ring, 2, 5);
    AllReduceOptions opts;
    opts.max_piece_bytes = 8192;
    EXPECT_EQ(RingAllReduce(absl::MakeSpan(data), 2, 4, 1, deadline, &dying, opts).code(),
              absl::StatusCode::kAborted);
  });
}

TEST(Ring, SurvivorsReturnWhenARankStalls) {
  RunWithVictim([](InMemoryRing&, std::vector<float>&, absl::Time deadline) {
    std::this_thread::sleep_for(common::TimeLeft(deadline) + std::chrono::milliseconds(600));
  });
}

TEST(Ring, SurvivorsReturnWhenARankIsGoneBeforeTheFirstMessage) {
  RunWithVictim([](InMemoryRing& ring, std::vector<float>&, absl::Time) { ring.Kill(2); });
}

}  // namespace
}  // namespace moe::collective
