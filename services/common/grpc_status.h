#ifndef MOE_SERVICES_COMMON_GRPC_STATUS_H_
#define MOE_SERVICES_COMMON_GRPC_STATUS_H_

// The single absl::Status <-> grpc::Status converter. Codes map one to one.

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace moe::common {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_GRPC_STATUS_H_
