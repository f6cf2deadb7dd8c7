#include "services/common/security.h"

#include <grpcpp/support/client_interceptor.h>
#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <fstream>
#include <mutex>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "services/common/flags.h"
#include "services/common/status_macros.h"

namespace moe::common {
namespace {

struct TlsState {
  std::mutex mu;
  bool enabled = false;
  bool require_client_cert = false;
  std::string cert, key, ca;
};

TlsState& State() {
  static TlsState* s = new TlsState();
  return *s;
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat(what, " ", path, " cannot be read"));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

template <typename T>
using Owned = std::unique_ptr<T, void (*)(T*)>;

int NoPassphrase(char*, int, int, void*) { return 0; }

// The first certificate of `pem`, or INVALID_ARGUMENT naming `flag` and `path`.
absl::StatusOr<Owned<X509>> ReadCertificate(const std::string& pem, const char* flag,
                                            const std::string& path) {
  auto* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  if (bio == nullptr) return absl::ResourceExhaustedError("out of memory reading a certificate");
  // _AUX, as gRPC reads them: "TRUSTED CERTIFICATE" blocks too.
  Owned<X509> cert(PEM_read_bio_X509_AUX(bio, nullptr, NoPassphrase, nullptr), X509_free);
  BIO_free(bio);
  ERR_clear_error();
  if (cert == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, " ", path, " holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")"));
  }
  return cert;
}

// An ASN1 time as OpenSSL prints it ("Dec  4 14:27:55 2026 GMT").
std::string TimeText(const ASN1_TIME* t) {
  BIO* bio = BIO_new(BIO_s_mem());
  ASN1_TIME_print(bio, t);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  std::string out(data, static_cast<size_t>(n));
  BIO_free(bio);
  return out;
}

class BearerInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit BearerInterceptor(const std::string* header) : header_(header) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({"authorization", *header_});
    }
    methods->Proceed();
  }

 private:
  const std::string* header_;
};

class BearerInterceptorFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerInterceptorFactory(std::string token) : header_("Bearer " + token) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo*) override {
    return new BearerInterceptor(&header_);
  }

 private:
  const std::string header_;  // lives as long as the channel (the factory is owned by it)
};

}  // namespace

absl::StatusOr<TlsFiles> ReadTlsFiles(const TlsOptions& o) {
  if (o.require_client_cert && o.cert_file.empty()) {
    // Without a certificate of its own a server serves plaintext and asks no caller for one.
    return UsageError("--require-client-cert needs --tls-cert, --tls-key and --tls-ca");
  }
  TlsFiles f;
  if (o.cert_file.empty() && o.key_file.empty() && o.ca_file.empty()) return f;
  if (o.ca_file.empty()) return UsageError("--tls-ca is required for TLS");
  if (o.cert_file.empty() != o.key_file.empty()) {
    return UsageError("--tls-cert and --tls-key go together");
  }
  ASSIGN_OR_RETURN(f.ca, ReadFile(o.ca_file, "--tls-ca"));
  RETURN_IF_ERROR(ReadCertificate(f.ca, "--tls-ca", o.ca_file).status());
  if (!o.cert_file.empty()) {
    ASSIGN_OR_RETURN(f.cert, ReadFile(o.cert_file, "--tls-cert"));
    ASSIGN_OR_RETURN(f.key, ReadFile(o.key_file, "--tls-key"));
    ASSIGN_OR_RETURN(Owned<X509> cert, ReadCertificate(f.cert, "--tls-cert", o.cert_file));
    if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tls-cert ", o.cert_file, " expired on ", TimeText(X509_get0_notAfter(cert.get())),
          ": make new certificates (scripts/make-certs.sh DIR)"));
    }
    auto* bio = BIO_new_mem_buf(f.key.data(), static_cast<int>(f.key.size()));
    if (bio == nullptr) return absl::ResourceExhaustedError("out of memory reading a key");
    // No passphrase is asked (gRPC takes none): a protected key reads as no key.
    Owned<EVP_PKEY> key(PEM_read_bio_PrivateKey(bio, nullptr, NoPassphrase, nullptr),
                        EVP_PKEY_free);
    BIO_free(bio);
    ERR_clear_error();
    if (key == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tls-key ", o.key_file,
          " holds no PEM private key (or one protected by a passphrase, which is not supported)"));
    }
    if (X509_check_private_key(cert.get(), key.get()) != 1) {
      ERR_clear_error();
      return absl::InvalidArgumentError(absl::StrCat("--tls-key ", o.key_file,
                                                     " is not the key of --tls-cert ", o.cert_file,
                                                     ": give the pair made together"));
    }
  }
  return f;
}

absl::Status ConfigureTls(const TlsOptions& o) {
  TlsState& s = State();
  std::lock_guard<std::mutex> lock(s.mu);
  s.enabled = false;
  ASSIGN_OR_RETURN(TlsFiles f, ReadTlsFiles(o));
  if (f.ca.empty()) return absl::OkStatus();
  s.ca = std::move(f.ca);
  s.cert = std::move(f.cert);
  s.key = std::move(f.key);
  s.require_client_cert = o.require_client_cert;
  s.enabled = true;
  return absl::OkStatus();
}

bool TlsEnabled() {
  TlsState& s = State();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.enabled;
}

std::shared_ptr<grpc::ServerCredentials> ServerCredentials() {
  TlsState& s = State();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.enabled || s.cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions opts(
      s.require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                            : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  opts.pem_root_certs = s.ca;
  opts.pem_key_cert_pairs.push_back({s.key, s.cert});
  return grpc::SslServerCredentials(opts);
}

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials() {
  TlsState& s = State();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.enabled) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions opts;
  opts.pem_root_certs = s.ca;
  opts.pem_private_key = s.key;   // presented for mutual TLS when set
  opts.pem_cert_chain = s.cert;
  return grpc::SslCredentials(opts);
}

std::map<std::string, bool> WithTlsFlags(std::map<std::string, bool> known) {
  known.insert({{"tls-cert", true}, {"tls-key", true}, {"tls-ca", true},
                {"require-client-cert", false}});
  return known;
}

absl::Status ConfigureTlsFromFlags(const Flags& f) {
  return ConfigureTls(TlsOptions{f.Get("tls-cert"), f.Get("tls-key"), f.Get("tls-ca"),
                                 f.Has("require-client-cert")});
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path, "--auth-token-file"));
  std::string token(absl::StripAsciiWhitespace(text));
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--auth-token-file ", path, " is empty"));
  }
  return token;
}

AuthResult CheckBearer(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                       const std::string& token) {
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return AuthResult::kMissing;
  const std::string got(it->second.data(), it->second.size());
  const std::string want = "Bearer " + token;
  // Compare every byte whatever the lengths, so timing says nothing about the token.
  unsigned char diff = got.size() == want.size() ? 0 : 1;
  for (size_t i = 0; i < want.size(); ++i) {
    diff |= static_cast<unsigned char>(want[i] ^ (i < got.size() ? got[i] : 0));
  }
  return diff == 0 ? AuthResult::kOk : AuthResult::kWrong;
}

std::shared_ptr<grpc::Channel> CreateAuthorizedChannel(const std::string& address,
                                                       const grpc::ChannelArguments& args,
                                                       const std::string& token) {
  if (token.empty()) return grpc::CreateCustomChannel(address, ChannelCredentials(), args);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
  factories.push_back(std::make_unique<BearerInterceptorFactory>(token));
  return grpc::experimental::CreateCustomChannelWithInterceptors(address, ChannelCredentials(),
                                                                 args, std::move(factories));
}

}  // namespace moe::common
