#ifndef MOE_SERVICES_COMMON_SECURITY_H_
#define MOE_SERVICES_COMMON_SECURITY_H_

// TLS for every gRPC port and channel of a process, and bearer tokens for the client API.
// One process-wide configuration, set once in main from the --tls-* flags before any server or
// channel is made; without it everything is plaintext.

#include <map>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "services/common/flags.h"

namespace moe::common {

struct TlsOptions {
  std::string cert_file;  // this process's certificate (server, and client for mTLS)
  std::string key_file;
  std::string ca_file;    // verifies peers
  bool require_client_cert = false;  // servers refuse callers without a certificate from ca_file
};

// Reads the files (errors name the file) and makes them the process-wide configuration.
// require_client_cert without cert_file is a usage error (it would serve plaintext).
absl::Status ConfigureTls(const TlsOptions& options);
bool TlsEnabled();

// Credentials for servers and channels under that configuration.
std::shared_ptr<grpc::ServerCredentials> ServerCredentials();
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials();

// `known` plus the flags --tls-cert --tls-key --tls-ca --require-client-cert, for Flags::Parse.
std::map<std::string, bool> WithTlsFlags(std::map<std::string, bool> known);
absl::Status ConfigureTlsFromFlags(const Flags& flags);

// The token in a file (surrounding whitespace dropped); INVALID_ARGUMENT when empty.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// Constant-time comparison of the request's "authorization: Bearer <token>" with `token`.
enum class AuthResult { kOk, kMissing, kWrong };
AuthResult CheckBearer(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                       const std::string& token);

// A channel whose every call carries "authorization: Bearer <token>" (none when token is empty).
std::shared_ptr<grpc::Channel> CreateAuthorizedChannel(const std::string& address,
                                                       const grpc::ChannelArguments& args,
                                                       const std::string& token);

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_SECURITY_H_
