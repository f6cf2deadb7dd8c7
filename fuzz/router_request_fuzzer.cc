// Structure-aware fuzzing of the public API: moe.v1.InferRequest messages, mutated through
// reflection (fuzz/proto_mutator.h), sent to a real router over gRPC in this process, with two
// in-process expert shards behind it. Any answer is fine except a crash, a sanitizer report, or
// a hang: every call must come back with a status before its deadline.

#include <cstdlib>

#include <grpcpp/grpcpp.h>

#include "fuzz/fuzz_servers.h"
#include "fuzz/proto_mutator.h"
#include "moe/v1/router.grpc.pb.h"

MOE_PROTO_FUZZER(moe::v1::InferRequest)

namespace {
moe::v1::Router::Stub* Stub() {
  static moe::v1::Router::Stub* stub = [] {
    static auto* a = moe::fuzz::StartShard();
    static auto* b = moe::fuzz::StartShard();
    static auto* router = moe::fuzz::StartRouter({a->address(), b->address()});
    return moe::v1::Router::NewStub(grpc::CreateChannel(router->address(),
                                                        grpc::InsecureChannelCredentials()))
        .release();
  }();
  return stub;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::v1::InferRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  moe::v1::InferResponse resp;
  grpc::Status st = Stub()->Infer(&ctx, req, &resp);
  if (st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
      st.error_code() == grpc::StatusCode::UNAVAILABLE) {
    std::fprintf(stderr, "the router did not answer properly: %d %s\n", st.error_code(),
                 st.error_message().c_str());
    std::abort();
  }
  return 0;
}
