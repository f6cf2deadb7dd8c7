#ifndef MOE_TESTS_REFERENCE_LOOPBACK_SERVER_H_
#define MOE_TESTS_REFERENCE_LOOPBACK_SERVER_H_

// Serves a test's fake gRPC service (a shard that holds a call, say) on a loopback port that the
// kernel picks, until destroyed.

#include <chrono>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

namespace moe::testing {

class LoopbackServer {
 public:
  // `service` must outlive this server. A handler still blocked when the server is destroyed
  // holds the destructor (gRPC waits for its sync handlers): release it first.
  explicit LoopbackServer(grpc::Service* service,
                          std::shared_ptr<grpc::ServerCredentials> credentials =
                              grpc::InsecureServerCredentials()) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", std::move(credentials), &port_);
    builder.RegisterService(service);
    server_ = builder.BuildAndStart();
  }
  // Calls still in progress are cancelled at once.
  ~LoopbackServer() {
    if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
  }
  LoopbackServer(const LoopbackServer&) = delete;
  LoopbackServer& operator=(const LoopbackServer&) = delete;

  bool ok() const { return server_ != nullptr; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  grpc::Server* server() const { return server_.get(); }  // its health service, for one

 private:
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

}  // namespace moe::testing

#endif  // MOE_TESTS_REFERENCE_LOOPBACK_SERVER_H_
