// The ring all-reduce over real gRPC between processes (moe-ring-rank), with a rank killed,
// stalled, or gone before the first message.

#include <signal.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/collective/grpc_transport.h"
#include "services/common/clock.h"
#include "services/common/subprocess.h"
#include "tests/reference/test_util.h"

namespace moe {
namespace {

// A serialized message as gRPC hands it over: in slices of `cut` bytes.
grpc::ByteBuffer Sliced(const std::string& bytes, size_t cut) {
  std::vector<grpc::Slice> slices;
  for (size_t at = 0; at < bytes.size(); at += cut) {
    slices.emplace_back(bytes.data() + at, std::min(cut, bytes.size() - at));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

TEST(ChunkWire, RoundTripsThroughAnySlicingAndRefusesMalformedMessages) {
  collective::Chunk c;
  c.generation = 7;
  c.step = 2;
  c.piece = 1;
  c.offset = 40;
  c.count = 5;
  c.payload = collective::Payload::Copy(std::string("0123456789abcdefghij"));
  grpc::ByteBuffer wire = collective::ChunkToWire("g", 3, c);
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(wire.Dump(&slices).ok());
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // What protobuf makes of the same bytes.
  v1::CollectiveChunk proto;
  ASSERT_TRUE(proto.ParseFromString(bytes));
  EXPECT_EQ(proto.group(), "g");
  EXPECT_EQ(proto.from_rank(), 3);
  EXPECT_EQ(proto.payload(), "0123456789abcdefghij");
  for (size_t cut : {1, 3, 7, 1000}) {
    std::string group;
    auto got = collective::ChunkFromWire(Sliced(bytes, cut), &group);
    ASSERT_TRUE(got.ok()) << got.status();
    std::string payload;
    for (absl::string_view p : got->payload.pieces) payload.append(p.data(), p.size());
    EXPECT_EQ(group, "g");
    EXPECT_EQ(payload, "0123456789abcdefghij") << cut;
    EXPECT_EQ(got->generation, 7u);
    EXPECT_EQ(got->step, 2);
    EXPECT_EQ(got->piece, 1);
    EXPECT_EQ(got->offset, 40);
    EXPECT_EQ(got->count, 5);
  }
  // A payload length past 32 bits (protobuf refuses it too), and a payload cut short.
  const std::string overlong = std::string("\x4a\x85\x80\x80\x80\x10", 6) + "abcde";
  std::string group;
  EXPECT_EQ(collective::ChunkFromWire(Sliced(overlong, 2), &group).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(proto.ParseFromString(overlong));
  EXPECT_EQ(collective::ChunkFromWire(Sliced(bytes.substr(0, bytes.size() - 3), 4), &group)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// A collective forgotten on a rank (finished, or refused before its ring ran) leaves nothing
// behind: its late chunks and the break of its stream are dropped instead of opening a mailbox
// that nobody would take from (a training step's group names are used once).
TEST(CollectiveHub, LateChunksAndBreaksOfAForgottenCollectiveLeaveNoMailbox) {
  collective::CollectiveHub hub;
  collective::Chunk c;
  c.generation = 3;
  c.payload = collective::Payload::Copy("abcd");
  hub.Deliver("step9-group0", c);
  EXPECT_EQ(hub.mailboxes(), 1u);
  hub.Forget("step9-group0", 3);
  EXPECT_EQ(hub.mailboxes(), 0u);
  hub.Deliver("step9-group0", c);  // late
  hub.Break("step9-group0", 3);    // the sender's stream ends after the rank is done
  EXPECT_EQ(hub.mailboxes(), 0u);
  EXPECT_EQ(hub.refused(), 1);
  // A newer generation of the same group is delivered as usual.
  c.generation = 4;
  hub.Deliver("step9-group0", c);
  auto got = hub.Take("step9-group0", 4, common::MonotonicNow() + absl::Seconds(1));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->generation, 4u);
}

// The hub's own generation filter (the ring tests run on an in-memory transport with its own):
// a chunk of an older, abandoned collective is dropped when a newer one takes from the mailbox;
// one of a newer collective, whose sender has moved on, waits there for its own Take.
TEST(CollectiveHub, TakeDropsOlderGenerationsAndKeepsNewerOnesForTheirCollective) {
  collective::CollectiveHub hub;
  collective::Chunk c;
  for (const uint64_t generation : {uint64_t{4}, uint64_t{6}, uint64_t{5}}) {
    c.generation = generation;
    c.payload = collective::Payload::Copy(absl::StrCat("gen", generation));
    hub.Deliver("ring", c);
  }
  auto got = hub.Take("ring", 5, common::MonotonicNow() + absl::Seconds(1));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->generation, 5u);
  ASSERT_EQ(got->payload.pieces.size(), 1u);
  EXPECT_EQ(got->payload.pieces[0], "gen5");
  EXPECT_EQ(hub.refused(), 1) << "generation 4 was not dropped";
  // Generation 6's chunk is not generation 5's: a second Take of 5 finds nothing.
  auto none = hub.Take("ring", 5, common::MonotonicNow() + absl::Milliseconds(50));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kDeadlineExceeded) << none.status();
  EXPECT_NE(none.status().message().find("nothing from the previous rank before the deadline"),
            std::string::npos)
      << none.status();
  got = hub.Take("ring", 6, common::MonotonicNow() + absl::Seconds(1));
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->payload.pieces.size(), 1u);
  EXPECT_EQ(got->payload.pieces[0], "gen6");
  EXPECT_EQ(hub.refused(), 1);
}

// A rank that never joins its collective (its part of an aborted step never ran) leaves its
// mailbox unclaimed: it is dropped once older than the hub's ttl, with what it held, and what
// arrives for it later is refused. A mailbox a rank waits on is never dropped.
TEST(CollectiveHub, AMailboxNobodyClaimsIsDroppedAfterItsTtl) {
  const absl::Time start = common::MonotonicNow();
  std::atomic<int64_t> elapsed_s{0};  // the hub's clock, moved by the test (read by the taker)
  collective::CollectiveHub hub(absl::Seconds(150),
                                [&] { return start + absl::Seconds(elapsed_s.load()); });
  collective::Chunk c;
  c.generation = 3;
  c.payload = collective::Payload::Copy(std::string(1 << 20, 'x'));
  hub.Deliver("step9-group0", c);
  hub.Break("step9-group0", 3);  // the sender gave up: this rank never ran its part
  elapsed_s += 100;
  c.generation = 4;
  hub.Deliver("step10-group0", c);  // within the ttl: nothing dropped
  EXPECT_EQ(hub.mailboxes(), 2u);
  EXPECT_EQ(hub.swept(), 0);

  // A rank waits on a third group across the ttl.
  c.generation = 5;
  std::atomic<bool> waiting{false};
  absl::StatusOr<collective::Chunk> taken;
  std::thread taker([&] {
    waiting = true;
    taken = hub.Take("step11-group0", 5, common::MonotonicNow() + absl::Seconds(20));
  });
  while (!waiting.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // inside Take, waiting
  elapsed_s += 200;  // step9 is 300 s old, step10 200 s, step11's wait 200 s
  hub.Deliver("step12-group0", c);  // triggers the sweep
  EXPECT_EQ(hub.swept(), 2);  // step9 and step10; step11 has a taker
  hub.Deliver("step11-group0", c);
  taker.join();
  ASSERT_TRUE(taken.ok()) << taken.status();
  EXPECT_EQ(taken->generation, 5u);
  hub.Forget("step11-group0", 5);
  EXPECT_EQ(hub.mailboxes(), 1u);  // step12's
  // Late chunks of a dropped collective are refused, not kept.
  const int64_t refused = hub.refused();
  c.generation = 3;
  hub.Deliver("step9-group0", c);
  EXPECT_EQ(hub.refused(), refused + 1);
  EXPECT_EQ(hub.mailboxes(), 1u);
  // A rank polls in short Takes (GrpcPeerTransport::Recv: 50 ms each): the ttl counts from the
  // last one, not from when the mailbox opened.
  c.generation = 6;
  hub.Deliver("step13-group0", c);
  elapsed_s += 100;
  EXPECT_EQ(
      hub.Take("step13-group0", 7, common::MonotonicNow() + absl::Milliseconds(10)).status().code(),
      absl::StatusCode::kDeadlineExceeded);
  elapsed_s += 100;  // 200 s since it opened, 100 s since it was last claimed
  hub.Deliver("step14-group0", c);  // triggers the sweep: step12 goes, step13 stays
  EXPECT_EQ(hub.swept(), 3);
  EXPECT_EQ(hub.mailboxes(), 2u);
}

struct Ring {
  std::vector<common::Subprocess> ranks;
  std::string peers_file;
};

// Starts `world` ranks; the peers file is written once all have ports (or, with `skip`, that
// rank's address is one nobody listens on).
Ring StartRing(int world, int64_t length, int64_t deadline_ms, int skip = -1,
               const std::string& name = "ring", std::vector<std::string> extra = {}) {
  Ring ring;
  ring.peers_file = moe::testing::TempPath(name + ".peers");
  std::remove(ring.peers_file.c_str());
  std::vector<std::string> addrs;
  for (int r = 0; r < world; ++r) {
    if (r == skip) {
      addrs.push_back("127.0.0.1:1");  // nothing listens there
      continue;
    }
    std::vector<std::string> args = {
        MOE_BIN_DIR "/moe-ring-rank", "--rank", std::to_string(r), "--world",
        std::to_string(world), "--peers-file", ring.peers_file, "--length",
        std::to_string(length), "--deadline-ms", std::to_string(deadline_ms)};
    args.insert(args.end(), extra.begin(), extra.end());
    auto p = common::Subprocess::Spawn(args);
    EXPECT_TRUE(p.ok());
    auto port = p->ReadListeningPort(absl::Seconds(20));
    EXPECT_TRUE(port.ok()) << port.status();
    addrs.push_back(absl::StrCat("127.0.0.1:", port.ok() ? *port : 0));
    ring.ranks.push_back(std::move(*p));
  }
  const std::string tmp = ring.peers_file + ".tmp";
  {
    std::ofstream out(tmp);
    for (const auto& a : addrs) out << a << "\n";
  }
  std::rename(tmp.c_str(), ring.peers_file.c_str());
  return ring;
}

struct Result {
  std::string code;
  double ms = 0;
  bool correct = false;
};

Result ReadResult(common::Subprocess& p, absl::Duration timeout) {
  Result r;
  auto line = p.ReadLineWith("RESULT", timeout);
  if (!line.ok()) {
    r.code = "NO_RESULT";
    return r;
  }
  const size_t c = line->find("code="), m = line->find("ms="), k = line->find("correct=");
  r.code = line->substr(c + 5, line->find(' ', c) - c - 5);
  r.ms = std::atof(line->c_str() + m + 3);
  r.correct = line->at(k + 8) == '1';
  return r;
}

TEST(GrpcRing, ExactSumsAcrossProcesses) {
  for (int world : {1, 2, 3, 4, 7}) {
    // Empty, shorter than the ring, not divisible by it, and several 1 MiB pieces per segment.
    for (int64_t length : {0L, 1L, 7L, 300001L}) {
      Ring ring = StartRing(world, length, 20000, -1, absl::StrCat("ok", world, "_", length));
      for (auto& p : ring.ranks) {
        Result r = ReadResult(p, absl::Seconds(30));
        EXPECT_EQ(r.code, "OK") << "world " << world << " length " << length;
        EXPECT_TRUE(r.correct) << "world " << world << " length " << length;
      }
    }
  }
}

TEST(GrpcRing, AverageAndBf16OnTheWireAcrossProcesses) {
  for (const std::vector<std::string>& extra :
       std::vector<std::vector<std::string>>{{"--op", "avg"},
                                             {"--wire", "bf16"},
                                             {"--op", "avg", "--wire", "bf16"}}) {
    const std::string what = absl::StrJoin(extra, " ");
    Ring ring = StartRing(3, 300001, 20000, -1, absl::StrCat("opts", what.size()), extra);
    for (auto& p : ring.ranks) {
      Result r = ReadResult(p, absl::Seconds(30));
      EXPECT_EQ(r.code, "OK") << what;
      EXPECT_TRUE(r.correct) << what;
    }
  }
}

// Survivors of a ring with a failing rank 1 must all end with ABORTED or DEADLINE_EXCEEDED
// within the deadline plus 0.5 s.
void ExpectSurvivorsReturn(Ring& ring, const std::vector<int>& survivors, double deadline_ms) {
  for (int r : survivors) {
    Result res = ReadResult(ring.ranks[r], absl::Seconds(20));
    EXPECT_TRUE(res.code == "ABORTED" || res.code == "DEADLINE_EXCEEDED")
        << "rank " << r << ": " << res.code;
    EXPECT_LT(res.ms, deadline_ms + 500) << "rank " << r;
  }
}

TEST(GrpcRing, RankKilledMidway) {
  // 3 ranks, 60 M floats: long enough to kill one in the middle.
  Ring ring = StartRing(3, 60'000'000, 3000, -1, "kill");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ring.ranks[1].Signal(SIGKILL);
  ExpectSurvivorsReturn(ring, {0, 2}, 3000);
}

TEST(GrpcRing, RankStalled) {
  Ring ring = StartRing(3, 60'000'000, 3000, -1, "stall");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ring.ranks[1].Signal(SIGSTOP);
  ExpectSurvivorsReturn(ring, {0, 2}, 3000);
  ring.ranks[1].Signal(SIGCONT);
}

TEST(GrpcRing, RankGoneBeforeTheFirstMessage) {
  // Rank 1 never starts: ranks 0 and 2 run with an address nobody listens on.
  Ring ring = StartRing(3, 1000, 1500, /*skip=*/1, "gone");
  ExpectSurvivorsReturn(ring, {0, 1}, 1500);
}

}  // namespace
}  // namespace moe
