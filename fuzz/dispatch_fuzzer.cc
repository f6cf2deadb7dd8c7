// Structure-aware fuzzing of the shard's Dispatch stream: moe.v1.DispatchRequest messages,
// mutated through reflection, written to one long-lived stream of an in-process expert shard.
// Every batch must get its answer (an error code for a bad one) and the stream must stay open:
// a stream that ends, or a missing answer, aborts. A cancellation (DispatchRequest.cancel) gets
// no answer of its own: it is written, and the next batch must still be answered.

#include <cstdlib>

#include <grpcpp/grpcpp.h>

#include "fuzz/fuzz_servers.h"
#include "fuzz/proto_mutator.h"
#include "moe/v1/expert_shard.grpc.pb.h"

MOE_PROTO_FUZZER(moe::v1::DispatchRequest)

namespace {
struct Stream {
  std::unique_ptr<moe::v1::ExpertShard::Stub> stub;
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReaderWriter<moe::v1::DispatchRequest, moe::v1::DispatchResponse>> rw;
};

Stream* GetStream() {
  static Stream* s = [] {
    static auto* shard = moe::fuzz::StartShard();
    auto* st = new Stream();
    st->stub = moe::v1::ExpertShard::NewStub(
        grpc::CreateChannel(shard->address(), grpc::InsecureChannelCredentials()));
    st->rw = st->stub->Dispatch(&st->ctx);
    return st;
  }();
  return s;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::v1::DispatchRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;
  req.set_train_step(0);  // training forwards are kept until their step ends: not fuzzed here
  Stream* s = GetStream();
  if (!s->rw->Write(req)) {
    std::fprintf(stderr, "the shard closed the Dispatch stream\n");
    std::abort();
  }
  if (req.cancel()) return 0;  // of a batch answered already (each is, before the next input)
  moe::v1::DispatchResponse resp;
  if (!s->rw->Read(&resp)) {
    std::fprintf(stderr, "the shard ended the Dispatch stream: %s\n",
                 s->rw->Finish().error_message().c_str());
    std::abort();
  }
  if (resp.batch_id() != req.batch_id()) {
    std::fprintf(stderr, "answer for batch %llu, expected %llu\n",
                 static_cast<unsigned long long>(resp.batch_id()),
                 static_cast<unsigned long long>(req.batch_id()));
    std::abort();
  }
  return 0;
}
