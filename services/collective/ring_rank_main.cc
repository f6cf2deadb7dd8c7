// moe-ring-rank: one rank of a ring all-reduce over gRPC, as a process. Used by the
// multi-process collective tests and the all-reduce benchmark.
//
// It serves moe.v1.Collective on --host (default 127.0.0.1), port 0, and prints "listening on
// HOST:PORT", waits for
// --peers-file to list every rank's address (one per line), all-reduces --length integer-valued
// floats --repeat times, each over a stream of its own (as a training step does), checks the sums
// and prints
// "RESULT code=CODE ms=MS correct=0|1 seconds_per_op=S". With --persistent, every collective
// shares one stream to the next rank (warm-up collectives until --warm-mib MiB crossed each link,
// at least one; then --repeat timed back to back, one checked).
// --piece-bytes sets the largest piece on the wire (default 1 MiB), to measure that trade-off.
// --wire bf16 and --op avg are checked too: the expected value is the exact sum, divided by the
// world for avg, rounded to BF16 for bf16 (the inputs are small integers, exact in BF16).


#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "services/collective/grpc_transport.h"
#include "services/collective/ring_allreduce.h"
#include "services/common/bf16.h"
#include "services/common/clock.h"
#include "services/common/security.h"
#include "services/common/flags.h"
#include "services/common/server_util.h"
#include "services/common/signals.h"
#include "services/common/status_macros.h"

namespace {

constexpr char kUsage[] = R"(moe-ring-rank: one rank of a ring all-reduce over gRPC (tests and benchmarks).

usage: moe-ring-rank --rank R --world N --peers-file F [flags]

  Serves moe.v1.Collective on --host, port 0, and prints "listening on HOST:PORT"; waits for
  F to list every rank's address (one per line, rank order); all-reduces --length
  integer-valued floats --repeat times, checks the result and prints
  "RESULT code=CODE ms=MS correct=0|1 seconds_per_op=S".

  --rank R, --world N        this rank and the number of ranks (defaults 0 and 1)
  --peers-file F             the ranks' addresses, written by whoever starts them
  --length N                 floats to reduce (default 1000)
  --repeat N                 collectives to run (default 1), each on a stream of its own
  --persistent               all on one stream to the next rank, after a warm-up (timing)
  --warm-mib N               with --persistent, warm up until N MiB crossed each link
                             (default 0: one collective), as a peer benchmark warms its own
  --deadline-ms N            each collective's deadline (default 10000)
  --piece-bytes N            largest piece on the wire (default 1 MiB)
  --wire fp32|bf16           wire format (default fp32)
  --op sum|avg               reduction (default sum)
  --host H                   address to bind (default 127.0.0.1)
)";

float Init(int rank, int64_t i) { return static_cast<float>((rank + 1) * 3 + (i % 11) - 5); }

absl::Status Run(int argc, char** argv) {
  moe::common::TuneServiceProcess();
  using moe::common::Flags;
  ASSIGN_OR_RETURN(Flags f, Flags::Parse(argc, argv, 1,
                                         {{"rank", true}, {"world", true}, {"peers-file", true},
                                          {"length", true}, {"deadline-ms", true},
                                          {"repeat", true}, {"wire", true}, {"host", true},
                                          {"persistent", false}, {"piece-bytes", true},
                                          {"op", true}, {"warm-mib", true}}));
  ASSIGN_OR_RETURN(int64_t rank, f.GetInt("rank", 0));
  ASSIGN_OR_RETURN(int64_t world, f.GetInt("world", 1));
  ASSIGN_OR_RETURN(std::string peers_file, f.Require("peers-file"));
  ASSIGN_OR_RETURN(int64_t length, f.GetInt("length", 1000));
  ASSIGN_OR_RETURN(int64_t deadline_ms, f.GetInt("deadline-ms", 10000));
  ASSIGN_OR_RETURN(int64_t repeat, f.GetInt("repeat", 1));
  const bool persistent = f.Has("persistent");
  ASSIGN_OR_RETURN(int64_t warm_mib, f.GetInt("warm-mib", 0));
  moe::collective::AllReduceOptions opts;
  if (f.Get("wire", "fp32") == "bf16") opts.wire = moe::collective::WireFormat::kBFloat16;
  const std::string op = f.Get("op", "sum");
  if (op != "sum" && op != "avg") return moe::common::UsageError("--op must be sum or avg");
  if (op == "avg") opts.op = moe::collective::ReduceOp::kAvg;
  ASSIGN_OR_RETURN(opts.max_piece_bytes, f.GetInt("piece-bytes", opts.max_piece_bytes));

  moe::collective::CollectiveHub hub;
  moe::collective::CollectiveService service(&hub);
  grpc::ServerBuilder builder;
  moe::common::ConfigureServerBuilder(&builder, moe::common::RpcLimits{});
  int port = 0;
  const std::string host = f.Get("host", "127.0.0.1");
  builder.AddListeningPort(host + ":0", moe::common::ServerCredentials(), &port);
  builder.RegisterService(&service);
  auto server = builder.BuildAndStart();
  if (!server) return absl::UnavailableError("cannot listen");
  std::printf("listening on %s:%d\n", host.c_str(), port);
  std::fflush(stdout);

  std::vector<std::string> peers;
  for (int i = 0; i < 3000 && static_cast<int64_t>(peers.size()) < world; ++i) {
    peers.clear();
    std::ifstream in(peers_file);
    std::string line;
    while (std::getline(in, line)) {
      if (!line.empty()) peers.push_back(line);
    }
    if (static_cast<int64_t>(peers.size()) < world) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  if (static_cast<int64_t>(peers.size()) < world) return absl::DeadlineExceededError("no peers file");
  auto next = grpc::CreateCustomChannel(peers[(rank + 1) % world], moe::common::ChannelCredentials(),
                                        moe::common::ClientChannelArgs());
  // Owned by a shared pointer so the transport may send straight from it (AllReduceOptions).
  auto owned = std::make_shared<std::vector<float>>(static_cast<size_t>(length));
  std::vector<float>& data = *owned;
  opts.keepalive = owned;
  auto fresh_inputs = [&] {
    for (int64_t i = 0; i < length; ++i) data[i] = Init(static_cast<int>(rank), i);
  };
  absl::Status st;
  double total = 0;
  double ms = 0;  // the last collective, from setting its deadline to its transport's teardown
  if (persistent) {
    // Like a training loop on established links (and like Gloo's benchmark): one stream to the
    // next rank for every collective, a warm-up one, then `repeat` back to back, timed; the
    // values are checked on one more collective from fresh inputs.
    const absl::Time deadline = moe::common::MonotonicNow() + absl::Milliseconds(deadline_ms);
    moe::collective::GrpcPeerTransport transport(&hub, "bench", static_cast<int>(rank), next,
                                                 deadline);
    uint64_t g = 1;
    auto reduce = [&] {
      return moe::collective::RingAllReduce(absl::MakeSpan(data), static_cast<int>(rank),
                                            static_cast<int>(world), g++, deadline, &transport,
                                            opts);
    };
    // Each collective sends 2 (N-1)/N of the buffer over each link.
    const double link_bytes = 2.0 * static_cast<double>((world - 1) * length) * sizeof(float) /
                              static_cast<double>(world);
    fresh_inputs();
    st = reduce();
    const double warm_bytes = static_cast<double>(warm_mib << 20);
    for (double sent = link_bytes; st.ok() && link_bytes > 0 && sent < warm_bytes;
         sent += link_bytes) {
      st = reduce();
    }
    const auto t = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < repeat && st.ok(); ++r) st = reduce();
    total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    fresh_inputs();
    const auto last = std::chrono::steady_clock::now();
    if (st.ok()) st = reduce();
    ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - last).count();
  }
  for (int64_t g = 1; !persistent && g <= repeat && st.ok(); ++g) {
    fresh_inputs();
    const auto start = std::chrono::steady_clock::now();
    const absl::Time deadline = moe::common::MonotonicNow() + absl::Milliseconds(deadline_ms);
    {
      moe::collective::GrpcPeerTransport transport(&hub, "bench", static_cast<int>(rank), next,
                                                   deadline);
      const auto t = std::chrono::steady_clock::now();
      st = moe::collective::RingAllReduce(absl::MakeSpan(data), static_cast<int>(rank),
                                          static_cast<int>(world), static_cast<uint64_t>(g),
                                          deadline, &transport, opts);
      total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    }
    ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }
  bool correct = st.ok();
  for (int64_t i = 0; correct && i < length; ++i) {
    float want = 0;
    for (int q = 0; q < world; ++q) want += Init(q, i);
    if (opts.op == moe::collective::ReduceOp::kAvg) want /= static_cast<float>(world);
    if (opts.wire == moe::collective::WireFormat::kBFloat16) {
      want = moe::common::Bf16ToFloat(moe::common::FloatToBf16(want));
    }
    correct = data[i] == want;
  }
  std::printf("RESULT code=%s ms=%.1f correct=%d seconds_per_op=%.6f\n",
              absl::StatusCodeToString(st.code()).c_str(), ms, correct ? 1 : 0,
              total / static_cast<double>(repeat));
  std::fflush(stdout);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  return moe::common::RunMain(argc, argv, "moe-ring-rank", kUsage, Run);
}
