// TLS, mutual TLS and bearer tokens on a real cluster: every wrong way in is refused.

#include <unistd.h>

#include <fstream>
#include <sstream>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "client/local_cluster.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "moe/v1/router.grpc.pb.h"
#include "services/common/random_checkpoint.h"
#include "services/common/security.h"
#include "services/common/server_util.h"
#include "tests/reference/test_util.h"

namespace moe {
namespace {

std::string Read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Scrape(int port) { return moe::testing::ScrapeMetrics(port); }

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(moe::testing::TempPath("certs"));
    other_ = new std::string(moe::testing::TempPath("other_certs"));
    for (const std::string* d : {dir_, other_}) {
      const std::string cmd =
          absl::StrCat("bash ", MOE_SOURCE_DIR, "/scripts/make-certs.sh ", *d, " >/dev/null");
      ASSERT_EQ(std::system(cmd.c_str()), 0);
    }
    common::ModelConfig c;
    c.num_experts = 4;
    c.d_model = 16;
    c.d_ff = 24;
    c.top_k = 2;
    const std::string ck = moe::testing::TempPath("sec.safetensors");
    ASSERT_TRUE(common::SaveCheckpoint(ck, common::MakeRandomCheckpoint({c, false, 1})).ok());
    // This process is a client of the cluster: trusted CA and the cluster's client certificate.
    ASSERT_TRUE(common::ConfigureTls({*dir_ + "/client.crt", *dir_ + "/client.key",
                                      *dir_ + "/ca.crt", false})
                    .ok());
    metrics_ = testing::FreePortBlock(4);
    client::LocalClusterOptions o;
    o.bin_dir = MOE_BIN_DIR;
    o.checkpoint = ck;
    o.shards = 2;
    o.metrics_port = metrics_;
    o.common_args = {"--tls-cert", *dir_ + "/server.crt", "--tls-key", *dir_ + "/server.key",
                     "--tls-ca", *dir_ + "/ca.crt", "--require-client-cert"};
    o.router_args = {"--auth-token-file", *dir_ + "/token"};
    auto cl = client::LocalCluster::Start(o);
    ASSERT_TRUE(cl.ok()) << cl.status();
    cluster_ = cl->release();
    token_ = new std::string(Read(*dir_ + "/token"));
    while (!token_->empty() && std::isspace(static_cast<unsigned char>(token_->back()))) {
      token_->pop_back();
    }
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }

  // A channel to `address` with the given CA and (optionally) client certificate; "" CA means
  // plaintext.
  static std::shared_ptr<grpc::Channel> Channel(const std::string& address, const std::string& ca,
                                                const std::string& cert_dir) {
    if (ca.empty()) return grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
    grpc::SslCredentialsOptions opts;
    opts.pem_root_certs = Read(ca);
    if (!cert_dir.empty()) {
      opts.pem_cert_chain = Read(cert_dir + "/client.crt");
      opts.pem_private_key = Read(cert_dir + "/client.key");
    }
    return grpc::CreateChannel(address, grpc::SslCredentials(opts));
  }

  static grpc::Status Info(const std::shared_ptr<grpc::Channel>& ch, const std::string& token) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    v1::ClusterInfo info;
    return v1::Router::NewStub(ch)->GetClusterInfo(&ctx, v1::GetClusterInfoRequest(), &info);
  }

  static std::string* dir_;
  static std::string* other_;
  static std::string* token_;
  static client::LocalCluster* cluster_;
  static int metrics_;
};

std::string* SecurityTest::dir_ = nullptr;
std::string* SecurityTest::other_ = nullptr;
std::string* SecurityTest::token_ = nullptr;
client::LocalCluster* SecurityTest::cluster_ = nullptr;
int SecurityTest::metrics_ = 0;

TEST_F(SecurityTest, TheRightCertificateAndTokenGetIn) {
  ASSERT_NE(cluster_, nullptr);
  auto ch = Channel(cluster_->router_address(), *dir_ + "/ca.crt", *dir_);
  grpc::Status st = Info(ch, *token_);
  EXPECT_TRUE(st.ok()) << st.error_message();
}

TEST_F(SecurityTest, EveryWrongWayInIsRefused) {
  ASSERT_NE(cluster_, nullptr);
  const std::string& router = cluster_->router_address();
  // No client certificate (mutual TLS is required).
  EXPECT_EQ(Info(Channel(router, *dir_ + "/ca.crt", ""), *token_).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // A certificate from another CA, trusting another CA.
  EXPECT_EQ(Info(Channel(router, *other_ + "/ca.crt", *other_), *token_).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // Our client certificate, but not trusting the server's CA.
  EXPECT_EQ(Info(Channel(router, *other_ + "/ca.crt", *dir_), *token_).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // Plaintext.
  EXPECT_EQ(Info(Channel(router, "", ""), *token_).error_code(), grpc::StatusCode::UNAVAILABLE);
  // Missing and wrong tokens over good TLS.
  auto good = Channel(router, *dir_ + "/ca.crt", *dir_);
  grpc::Status missing = Info(good, "");
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_NE(missing.error_message().find("bearer token"), std::string::npos);
  EXPECT_EQ(Info(good, *token_ + "x").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Info(good, "short").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // The refusals are counted.
  const std::string body = Scrape(metrics_);
  auto count = [&](const std::string& series) {
    const size_t at = body.find(series);
    return at == std::string::npos ? -1.0 : std::atof(body.c_str() + at + series.size());
  };
  EXPECT_GE(count("moe_router_auth_refused_total{reason=\"missing_token\"} "), 1);
  EXPECT_GE(count("moe_router_auth_refused_total{reason=\"wrong_token\"} "), 2);
  EXPECT_GE(
      count("moe_router_requests_total{code=\"UNAUTHENTICATED\",method=\"GetClusterInfo\"} "),
      3);
  // Health checks need no token.
  auto h = common::CheckHealth(good.get(), absl::Seconds(5));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(*h, common::HealthState::kServing);
}

TEST_F(SecurityTest, InternalServicesRefuseCallersWithoutTheClusterCertificate) {
  ASSERT_NE(cluster_, nullptr);
  const std::string& shard = cluster_->shard_addresses()[0];
  auto status = [&](const std::shared_ptr<grpc::Channel>& ch) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::ShardStatus s;
    return v1::ExpertShard::NewStub(ch)->GetStatus(&ctx, v1::GetShardStatusRequest(), &s);
  };
  EXPECT_TRUE(status(Channel(shard, *dir_ + "/ca.crt", *dir_)).ok());
  EXPECT_EQ(status(Channel(shard, *dir_ + "/ca.crt", "")).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(status(Channel(shard, "", "")).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(status(Channel(shard, *other_ + "/ca.crt", *other_)).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

// TLS files gRPC cannot use are told in one line naming the flag and file, before gRPC is given
// them: it logged several internal lines, then failed a server's start as if its port were in
// use, and a client's first call with "empty address list". The good files read.
TEST_F(SecurityTest, TlsFilesThatCannotBeUsedAreToldByFlagAndFile) {
  const std::string& d = *dir_;
  auto error = [](const common::TlsOptions& o) {
    return std::string(common::ReadTlsFiles(o).status().message());
  };
  EXPECT_TRUE(
      common::ReadTlsFiles({d + "/server.crt", d + "/server.key", d + "/ca.crt", true}).ok());
  EXPECT_TRUE(common::ReadTlsFiles({"", "", d + "/ca.crt", false}).ok());  // a client, no mTLS
  EXPECT_EQ(error({"", "", d + "/token", false}),
            "--tls-ca " + d + "/token holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")");
  EXPECT_EQ(error({d + "/server.key", d + "/server.key", d + "/ca.crt", false}),
            "--tls-cert " + d +
                "/server.key holds no PEM certificate "
                "(\"-----BEGIN CERTIFICATE-----\")");
  EXPECT_EQ(error({d + "/client.crt", d + "/token", d + "/ca.crt", false}),
            "--tls-key " + d +
                "/token holds no PEM private key (or one protected by a "
                "passphrase, which is not supported)");
  EXPECT_EQ(error({d + "/client.crt", d + "/server.key", d + "/ca.crt", false}),
            "--tls-key " + d + "/server.key is not the key of --tls-cert " + d +
                "/client.crt: give the pair made together");
  // A certificate that expired yesterday.
  const std::string old = moe::testing::TempPath("expired");
  const std::string cmd =
      absl::StrCat("openssl req -newkey rsa:2048 -nodes -subj /CN=old -keyout ", old, ".key -out ",
                   old, ".csr 2>/dev/null && openssl x509 -req -in ", old, ".csr -signkey ", old,
                   ".key -days -1 -out ", old, ".crt 2>/dev/null");
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const std::string expired = error({old + ".crt", old + ".key", d + "/ca.crt", false});
  EXPECT_EQ(expired.rfind("--tls-cert " + old + ".crt expired on ", 0), 0u) << expired;
  EXPECT_NE(expired.find(": make new certificates (scripts/make-certs.sh DIR)"), std::string::npos)
      << expired;
}

TEST_F(SecurityTest, MetricsExposeNoSecrets) {
  ASSERT_NE(cluster_, nullptr);
  for (int port : {metrics_, metrics_ + 1, metrics_ + 2, metrics_ + 3}) {
    const std::string body = Scrape(port);
    EXPECT_FALSE(body.empty()) << "port " << port;
    EXPECT_EQ(body.find(*token_), std::string::npos) << "port " << port;
    EXPECT_EQ(body.find("PRIVATE KEY"), std::string::npos) << "port " << port;
  }
}

}  // namespace
}  // namespace moe

