// One rank of Gloo's ring all-reduce over TCP on loopback (the peer in the all-reduce benchmark).
// usage: gloo_allreduce RANK WORLD STORE_DIR ELEMENTS REPEAT
// Prints "seconds_per_op=S". Every connection is warmed with a 32 MiB message first: Gloo sizes
// SO_SNDBUF from the first message on each pair (BENCHMARKING.md).

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include <gloo/allreduce.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/transport/tcp/device.h>

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: gloo_allreduce RANK WORLD STORE_DIR ELEMENTS REPEAT\n");
    return 2;
  }
  const int rank = std::atoi(argv[1]), world = std::atoi(argv[2]);
  const size_t n = std::strtoull(argv[4], nullptr, 10);
  const int repeat = std::atoi(argv[5]);
  gloo::transport::tcp::attr attr;
  attr.hostname = "127.0.0.1";
  auto dev = gloo::transport::tcp::CreateDevice(attr);
  gloo::rendezvous::FileStore store(argv[3]);
  auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, world);
  ctx->connectFullMesh(store, dev);
  // Warm every pair with one large message each way.
  std::vector<char> warm(32 << 20), sink(32 << 20);
  for (int p = 0; p < world; ++p) {
    if (p == rank) continue;
    auto out = ctx->createUnboundBuffer(warm.data(), warm.size());
    auto in = ctx->createUnboundBuffer(sink.data(), sink.size());
    out->send(p, 7);
    in->recv(p, 7);
    out->waitSend();
    in->waitRecv();
  }
  std::vector<float> data(n, 1.0f);
  auto run = [&] {
    gloo::AllreduceOptions opts(ctx);
    opts.setOutput(data.data(), n);
    opts.setAlgorithm(gloo::AllreduceOptions::Algorithm::RING);
    opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(
        &gloo::sum<float>));
    gloo::allreduce(opts);
  };
  run();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < repeat; ++i) run();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("seconds_per_op=%.6f\n", s / repeat);
  return 0;
}
