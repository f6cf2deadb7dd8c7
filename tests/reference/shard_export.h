#ifndef MOE_TESTS_REFERENCE_SHARD_EXPORT_H_
#define MOE_TESTS_REFERENCE_SHARD_EXPORT_H_

// Tests read a shard's current weights of an expert the way a peer copies them: ExportExpert.

#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "services/common/checkpoint.h"

namespace moe::testing {

// Expert `e`'s weights as the shard behind `stub` exports them, or the call's or the parse's
// error.
inline absl::StatusOr<common::ExpertWeights> ExportedWeights(v1::ExpertShard::Stub* stub,
                                                             const common::ModelConfig& config,
                                                             int e) {
  grpc::ClientContext ctx;
  v1::ExportExpertRequest req;
  req.set_expert(e);
  auto reader = stub->ExportExpert(&ctx, req);
  std::string bytes;
  v1::ExpertChunk chunk;
  while (reader->Read(&chunk)) bytes += chunk.data();
  const grpc::Status st = reader->Finish();
  if (!st.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
  }
  return common::ParseExpert(bytes, config, e);
}

}  // namespace moe::testing

#endif  // MOE_TESTS_REFERENCE_SHARD_EXPORT_H_
