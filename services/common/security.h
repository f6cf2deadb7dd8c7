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

// The PEM contents of a TlsOptions' files.
struct TlsFiles {
  std::string cert, key, ca;
};

// Reads the files and checks them before gRPC sees them (gRPC logs several internal lines
// instead, then fails a server's start as if its port were in use, or a client's first call
// with "empty address list"). INVALID_ARGUMENT in one line naming the flag and file when the CA
// or the certificate holds no PEM certificate, the key no PEM private key (or one protected by
// a passphrase), the key is not the certificate's, or the certificate has expired; a usage
// error for flags that do not go together (require_client_cert without cert_file would serve
// plaintext).
absl::StatusOr<TlsFiles> ReadTlsFiles(const TlsOptions& options);

// ReadTlsFiles, then makes the files the process-wide configuration (none when no file is
// given: plaintext).
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
