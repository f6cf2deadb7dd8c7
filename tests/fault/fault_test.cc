// Fault injection on real processes, beyond tests/cluster: a link cut between network namespaces
// (iptables DROP) and healed, a delayed link with a tight deadline (DelayProxy), a rolling
// restart of every shard under load, and a memory-limited shard (cgroup) sent an oversized
// batch. Answers are checked against the in-process layer. Needs root (namespaces, iptables,
// cgroups), as CI and the developers' machines run.

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <sstream>

#include "client/cpu_limit.h"
#include "moe/v1/expert_shard.grpc.pb.h"
#include "services/common/server_util.h"
#include "tests/cluster/cluster_fixture.h"
#include "tests/fault/delay_proxy.h"
#include "tests/reference/naive_moe.h"

namespace moe {
namespace {

using testing::Clock;
using testing::ClusterTest;
using testing::Config;
using testing::ScrapeMetric;
using testing::Since;
using testing::WaitFor;

// /proc/PID/NAME, whole ("" when unreadable).
std::string ProcFile(pid_t pid, const std::string& name) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/" + name);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

int Sh(const std::string& cmd) { return std::system(cmd.c_str()); }

// A network namespace joined to the host by a veth pair: host side 10.231.K.1, namespace side
// 10.231.K.2. Removing the namespace removes the pair.
class NetNs {
 public:
  NetNs() {
    // A /30 no interface uses yet (a run killed earlier may have left one behind).
    int k = 1 + static_cast<int>(getpid() % 250);
    for (int tries = 0; tries < 250; ++tries, k = 1 + k % 250) {
      if (Sh("ip -o addr show to 10.231." + std::to_string(k) + ".0/30 | grep -q .") != 0) break;
    }
    name_ = "moef" + std::to_string(getpid());
    ip_ = "10.231." + std::to_string(k) + ".2";
    host_ip_ = "10.231." + std::to_string(k) + ".1";
    const std::string host_if = "vh" + std::to_string(getpid() % 1000000);
    const std::string ns_if = "vn" + std::to_string(getpid() % 1000000);
    const std::string net = "10.231." + std::to_string(k);
    ok_ = Sh("ip netns add " + name_ + " && ip link add " + host_if + " type veth peer name " +
             ns_if + " && ip link set " + ns_if + " netns " + name_ + " && ip addr add " + net +
             ".1/30 dev " + host_if + " && ip link set " + host_if + " up && " + Exec() +
             "ip addr add " + ip_ + "/30 dev " + ns_if + " && " + Exec() + "ip link set " + ns_if +
             " up && " + Exec() + "ip link set lo up") == 0;
  }
  ~NetNs() { Sh("ip netns del " + name_ + " 2>/dev/null"); }

  bool ok() const { return ok_; }
  const std::string& ip() const { return ip_; }
  const std::string& host_ip() const { return host_ip_; }
  std::vector<std::string> Wrapper() const { return {"ip", "netns", "exec", name_}; }
  // Every packet in or out of the namespace dropped, then let through again.
  bool Cut() { return Sh(Exec() + "iptables -A INPUT -j DROP && " + Exec() + "iptables -A OUTPUT -j DROP") == 0; }
  bool Heal() { return Sh(Exec() + "iptables -F") == 0; }

 private:
  std::string Exec() const { return "ip netns exec " + name_ + " "; }
  std::string name_, ip_, host_ip_;
  bool ok_ = false;
};

class FaultTest : public ClusterTest {
 protected:
  void SetUp() override {
    ClusterTest::SetUp();
    if (geteuid() != 0) GTEST_SKIP() << "fault injection needs root (namespaces, iptables, cgroups)";
  }

  // The router's port, then each shard's.
  static int MetricsBase(int shards) { return testing::FreePortBlock(1 + shards); }

  static double ShardUp(int router_metrics, const std::string& shard) {
    return ScrapeMetric(router_metrics, "moe_shard_up{shard=\"" + shard + "\"}");
  }
};

// Router-to-shard link cut (iptables DROP inside the shard's namespace) and healed: out of
// rotation within 2 s, back within 2 s of healing (4 s in sanitizer builds: the reconnect and the
// health check that follows run in slowed processes; once 2.78 s under TSan on two cores); the
// replicas answer meanwhile.
TEST_F(FaultTest, CutLinkIsDetectedAndHealed) {
#ifdef MOE_SANITIZED
  constexpr double kBackWithin = 4.0;
#else
  constexpr double kBackWithin = 2.0;
#endif
  NetNs ns;
  ASSERT_TRUE(ns.ok()) << "could not make a network namespace";
  const int metrics = MetricsBase(3);
  client::LocalClusterOptions o;
  o.shards = 3;
  o.placement = "replicated";
  o.coordinator = false;
  o.metrics_port = metrics;
  o.shard_wrappers = {{}, {}, ns.Wrapper()};
  o.shard_hosts = {"127.0.0.1", "127.0.0.1", ns.ip()};
  auto cluster = StartWith(o);
  ASSERT_NE(cluster, nullptr);
  const std::string cut_shard = cluster->shard_addresses()[2];
  // Up before the cut (under TSan a keepalive may have missed once since the start).
  ASSERT_GE(WaitFor([&] { return ShardUp(metrics, cut_shard) == 1; }, 5), 0)
      << "the shard in the namespace never showed up in the router's metrics";

  BackgroundLoad load(cluster->router_address(), 4);
  const LoadResult& result = load.result();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  ASSERT_TRUE(ns.Cut()) << "iptables could not cut the link (scripts/install-deps.sh installs it)";
  const double detected = WaitFor([&] { return ShardUp(metrics, cut_shard) == 0; }, 5);
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  const int ok_while_cut = result.ok.load();
  ASSERT_TRUE(ns.Heal()) << "iptables could not heal the link";
  const double back = WaitFor([&] { return ShardUp(metrics, cut_shard) == 1; }, 5);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  load.Stop();
  EXPECT_GE(detected, 0) << "the cut link was never detected";
  EXPECT_LT(detected, 2.0);
  EXPECT_GE(back, 0) << "the healed shard never came back";
  EXPECT_LT(back, kBackWithin);
  EXPECT_EQ(result.failed.load(), 0) << result.first_error;
  EXPECT_EQ(result.wrong.load(), 0);
  EXPECT_GT(ok_while_cut, 10);
  std::printf("cut detected in %.2f s, back %.2f s after healing; %d requests, none failed\n",
              detected, back, result.ok.load());
}

// A link that delays every byte by 100 ms each way and a client deadline of 150 ms: the client
// gets DEADLINE_EXCEEDED within the deadline + 50 ms (250 ms in sanitizer builds, whose client
// process itself runs several times slower), and the shard drops the work whose deadline passed
// (it holds batches 300 ms before computing) instead of computing it.
TEST_F(FaultTest, DelayedLinkAndTightDeadline) {
#ifdef MOE_SANITIZED
  constexpr double kSlack = 0.250;
#else
  constexpr double kSlack = 0.050;
#endif
  const int metrics = MetricsBase(1);
  std::unique_ptr<testing::DelayProxy> proxy;
  client::LocalClusterOptions o;
  o.shards = 1;
  o.placement = "replicated";
  o.coordinator = false;
  o.metrics_port = metrics;
  o.shard_args = {"--batch-delay-us", "300000"};
  o.route_shard = [&](int, const std::string& addr) {
    proxy = std::make_unique<testing::DelayProxy>(std::atoi(addr.c_str() + addr.rfind(':') + 1),
                                                  std::chrono::milliseconds(100));
    return proxy->address();
  };
  auto cluster = StartWith(o);
  ASSERT_NE(cluster, nullptr);
  ASSERT_NE(proxy->port(), 0);
  auto stub = client::MakeRouterStub(cluster->router_address());
  const std::vector<float> x = common::RandomMatrix(6, Config().d_model, 61);

  // With time to spare the delayed link answers, and correctly.
  v1::InferResponse resp;
  ASSERT_TRUE(Infer(stub.get(), Request(x, 6, "slow-ok"), &resp, 5000).ok());
  EXPECT_TRUE(Matches(x, 6, resp, *layer_));
  const double tokens_before = ShardTokens(metrics + 1);
  EXPECT_GT(tokens_before, 0) << "the shard's token counter did not see the answered request";

  // One at a time: each request's batch is dropped before the next one arrives (back to back,
  // a later batch would be coalesced with and computed after an expired one's wait): by the
  // shard's deadline, or by the router's cancellation, which the deadline sets off.
  auto dropped = [&] {
    return ScrapeMetric(metrics + 1, "moe_shard_rejected_batches_total{reason=\"deadline\"}") +
           ScrapeMetric(metrics + 1, "moe_shard_rejected_batches_total{reason=\"cancelled\"}");
  };
  double worst = 0;
  for (int i = 0; i < 3; ++i) {
    const auto start = Clock::now();
    grpc::Status st = Infer(stub.get(), Request(x, 6, "tight"), &resp, 150);
    worst = std::max(worst, Since(start));
    EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
    EXPECT_GE(WaitFor([&] { return dropped() >= i + 1; }, 3), 0)
        << "the shard did not drop the expired work of request " << i;
  }
  EXPECT_LT(worst, 0.150 + kSlack);
  const double tokens_after = ShardTokens(metrics + 1);
  EXPECT_EQ(tokens_after, tokens_before) << "the shard computed work nobody waited for";
  std::printf("DEADLINE_EXCEEDED after at most %.0f ms (deadline 150 ms, link 2 x 100 ms)\n",
              worst * 1e3);
}

// Every shard drained, stopped and restarted in turn under load, experts replicated: at least
// 99.9 % of requests succeed (none is expected to fail), none is wrong, and every restarted
// shard serves again.
TEST_F(FaultTest, RollingRestartOfEveryShard) {
  const int metrics = MetricsBase(3);
  client::LocalClusterOptions o;
  o.shards = 3;
  o.placement = "replicated";
  o.coordinator = false;
  o.metrics_port = metrics;
  auto cluster = StartWith(o);
  ASSERT_NE(cluster, nullptr);
  BackgroundLoad load(cluster->router_address(), 4);
  const LoadResult& result = load.result();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (int i = 0; i < 3; ++i) {
    const std::string addr = cluster->shard_addresses()[i];
    auto shard = v1::ExpertShard::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    v1::DrainRequest req;
    req.set_timeout_ms(5000);
    v1::DrainResponse drained;
    ASSERT_TRUE(shard->Drain(&ctx, req, &drained).ok());
    EXPECT_TRUE(drained.drained()) << addr;
    cluster->shard(i).Signal(SIGTERM);
    ASSERT_TRUE(cluster->shard(i).Wait(absl::Seconds(5)).ok()) << addr << " did not stop";
    const absl::Status restarted = cluster->RestartShard(i);
    ASSERT_TRUE(restarted.ok()) << restarted;
    // Back in rotation with its experts reloaded by the router, and computing again.
    const double back = WaitFor([&] {
      return ShardUp(metrics, addr) == 1 &&
             ScrapeMetric(metrics + 1 + i, "moe_shard_experts_loaded") == Config().num_experts;
    }, 10);
    EXPECT_GE(back, 0) << addr << " did not come back";
    std::printf("shard %d restarted, serving again after %.2f s\n", i, back);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  load.Stop();
  const int total = result.ok.load() + result.failed.load() + result.wrong.load();
  EXPECT_GE(result.ok.load(), 0.999 * total) << result.first_error;
  EXPECT_EQ(result.wrong.load(), 0);
  EXPECT_GT(total, 50);
  for (int i = 0; i < 3; ++i) {
    EXPECT_GT(ShardTokens(metrics + 1 + i), 0) << "restarted shard " << i << " computed nothing";
  }
  std::printf("rolling restart: %d of %d requests succeeded\n", result.ok.load(), total);
}

// moe-cluster --shard-cpus: a process started through a CPU limit's wrapper is in its cgroup and
// gets no more CPU time than its quota, however busy it is; the cgroup goes with the limit.
TEST_F(FaultTest, CpuLimitHoldsABusyProcessToItsQuota) {
  auto limits = client::CpuLimits::Create(1, 0.25);
  ASSERT_TRUE(limits.ok()) << limits.status();
  std::vector<std::string> argv = limits->Wrapper(0);
  const std::string dir = argv.back();
  argv.insert(argv.end(), {"/bin/sh", "-c", "while :; do :; done"});
  auto busy = common::Subprocess::Spawn(argv);
  ASSERT_TRUE(busy.ok()) << busy.status();
  const std::string name = dir.substr(dir.rfind('/'));
  std::string groups = ProcFile(busy->pid(), "cgroup");
  for (const absl::Time until = absl::Now() + absl::Seconds(5);
       groups.find(name) == std::string::npos && absl::Now() < until;) {
    absl::SleepFor(absl::Milliseconds(20));  // the wrapper moves itself, then execs
    groups = ProcFile(busy->pid(), "cgroup");
  }
  ASSERT_NE(groups.find(name), std::string::npos)
      << "not in the CPU cgroup " << dir << ": " << groups;
  auto cpu_seconds = [&] {
    const std::string stat = ProcFile(busy->pid(), "stat");
    std::istringstream fields(stat.substr(stat.rfind(')') + 2));
    std::string f;
    long long utime = 0, stime = 0;
    for (int i = 3; i <= 15 && fields >> f; ++i) {
      if (i == 14) utime = std::atoll(f.c_str());
      if (i == 15) stime = std::atoll(f.c_str());
    }
    return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
  };
  const double before = cpu_seconds();
  const absl::Time t0 = absl::Now();
  absl::SleepFor(absl::Seconds(2));
  const double used = cpu_seconds() - before;
  const double wall = absl::ToDoubleSeconds(absl::Now() - t0);
  busy->Signal(SIGKILL);
  ASSERT_TRUE(busy->Wait(absl::Seconds(5)).ok());
  EXPECT_LE(used, 0.25 * wall + 0.1) << "a 0.25-CPU limit let a busy loop use " << used << " s";
  EXPECT_GE(used, 0.25 * wall * 0.3) << "the busy loop hardly ran (" << used << " s)";
  std::printf("a busy loop limited to 0.25 CPUs used %.2f s of CPU in %.2f s\n", used, wall);
  *limits = client::CpuLimits();  // removes the cgroup
  EXPECT_NE(access(dir.c_str(), F_OK), 0) << dir << " was left behind";
}

// A shard in a memory cgroup of 96 MiB (768 MiB in sanitizer builds) sent a batch that would need
// gigabytes to compute: it is
// refused with RESOURCE_EXHAUSTED before anything is allocated for it, the shard is not
// OOM-killed, its memory stays under the limit, and the next normal batch is computed.
TEST_F(FaultTest, MemoryLimitedShardRefusesAnOversizedBatch) {
  const std::string cg = "/sys/fs/cgroup/memory/moe-fault-" + std::to_string(getpid());
  ASSERT_EQ(mkdir(cg.c_str(), 0755), 0) << "no cgroup v1 memory controller at /sys/fs/cgroup/memory";
#ifdef MOE_SANITIZED
  constexpr int64_t kLimit = 768ll << 20;  // still far below what the batch would need
#else
  constexpr int64_t kLimit = 96ll << 20;
#endif
  std::ofstream(cg + "/memory.limit_in_bytes") << kLimit;
  int64_t limit_read = 0;
  std::ifstream(cg + "/memory.limit_in_bytes") >> limit_read;
  ASSERT_EQ(limit_read, kLimit) << "the memory limit did not take";
  client::LocalClusterOptions o;
  o.shards = 1;
  o.placement = "replicated";
  o.coordinator = false;
  o.shard_args = {"--max-message-mb", "32"};
  o.shard_wrappers = {client::CgroupWrapper(cg)};
  auto cluster = StartWith(o);
  ASSERT_NE(cluster, nullptr);
  {
    const std::string groups = ProcFile(cluster->shard(0).pid(), "cgroup");
    ASSERT_NE(groups.find("moe-fault-" + std::to_string(getpid())), std::string::npos)
        << "the shard is not in the memory cgroup: " << groups;
  }
  auto shard = v1::ExpertShard::NewStub(grpc::CreateCustomChannel(
      cluster->shard_addresses()[0], grpc::InsecureChannelCredentials(),
      common::ClientChannelArgs()));
  grpc::ClientContext ctx;
  auto stream = shard->Dispatch(&ctx);
  // 200k rows of d_model 32 (25 MB on the wire, within the message limit), each assigned to all 8
  // experts: computing it would take gigabytes.
  const int64_t rows = 200000;
  v1::DispatchRequest big;
  big.set_batch_id(1);
  common::EncodeTensor(std::vector<float>(rows * Config().d_model, 1.0f), {rows, Config().d_model},
                       common::WireType::kFloat32, big.mutable_rows());
  for (int e = 0; e < Config().num_experts; ++e) {
    v1::ExpertRows* er = big.add_experts();
    er->set_expert(e);
    for (int64_t r = 0; r < rows; ++r) er->add_rows(static_cast<int32_t>(r));
  }
  ASSERT_TRUE(stream->Write(big));
  v1::DispatchResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  // Refused by the shard's row limits while decoding, before any buffer is made for it.
  EXPECT_EQ(resp.code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED)) << resp.message();
  EXPECT_NE(resp.message().find("has more than"), std::string::npos) << resp.message();

  // A normal batch on the same stream is computed, and matches the reference expert.
  const std::vector<float> x = common::RandomMatrix(3, Config().d_model, 5);
  v1::DispatchRequest small;
  small.set_batch_id(2);
  common::EncodeTensor(x, {3, Config().d_model}, common::WireType::kFloat32, small.mutable_rows());
  v1::ExpertRows* er = small.add_experts();
  er->set_expert(0);
  for (int r = 0; r < 3; ++r) er->add_rows(r);
  ASSERT_TRUE(stream->Write(small));
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_EQ(resp.code(), 0) << resp.message();
  EXPECT_EQ(resp.batch_id(), 2u);
  ASSERT_EQ(resp.outputs_size(), 1);
  EXPECT_EQ(resp.outputs(0).expert(), 0);
  auto y = common::DecodeMatrix(resp.outputs(0).output(), "output", Config().d_model);
  ASSERT_TRUE(y.ok()) << y.status();
  const std::vector<float> got = common::ViewToFloat(*y);
  const std::vector<double> want = testing::NaiveExpertForward(Config(), ck_->experts[0], x, 3);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-4) << "value " << i;
  stream->WritesDone();
  stream->Finish().IgnoreError();

  EXPECT_FALSE(cluster->shard(0).Exited()) << "the shard died (OOM-killed?)";
  int64_t peak = -1, failcnt = -1;
  std::ifstream(cg + "/memory.max_usage_in_bytes") >> peak;
  std::ifstream(cg + "/memory.failcnt") >> failcnt;
  EXPECT_GT(peak, 0) << "no peak memory reading";
  EXPECT_LT(peak, kLimit);
  EXPECT_EQ(failcnt, 0) << "the shard hit its memory limit";
  std::printf("oversized batch refused; shard peak memory %.1f MiB of %.0f MiB, limit hits %lld\n",
              peak / 1048576.0, kLimit / 1048576.0, static_cast<long long>(failcnt));
  const absl::Status stopped = cluster->Stop();
  EXPECT_TRUE(stopped.ok()) << stopped;
  cluster.reset();  // every process of the group reaped before the group goes
  rmdir(cg.c_str());
}

// A ring of 3 rank processes with rank 2 in its own namespace; its links are cut (iptables DROP)
// mid all-reduce: the surviving ranks return ABORTED or DEADLINE_EXCEEDED within their
// deadline + 0.5 s (1.5 s in sanitizer builds: a TSan rank, holding a 240 MB buffer and its
// shadow, once took 0.5 s to tear its transport down after failing on time, against 20-60 ms
// usually and 1-2 ms unsanitized).
TEST_F(FaultTest, RingRankCutOffMidAllReduce) {
#ifdef MOE_SANITIZED
  constexpr int kSlackMs = 1500;
#else
  constexpr int kSlackMs = 500;
#endif
  NetNs ns;
  ASSERT_TRUE(ns.ok()) << "could not make a network namespace";
  const std::string peers = ::moe::testing::TempPath("cut.peers");
  std::remove(peers.c_str());
  constexpr int kDeadlineMs = 3000;
  std::vector<common::Subprocess> ranks;
  std::vector<std::string> addrs;
  for (int r = 0; r < 3; ++r) {
    std::vector<std::string> argv;
    if (r == 2) argv = ns.Wrapper();
    argv.insert(argv.end(), {std::string(MOE_BIN_DIR) + "/moe-ring-rank", "--rank", std::to_string(r),
                             "--world", "3", "--peers-file", peers, "--length", "60000000",
                             "--deadline-ms", std::to_string(kDeadlineMs), "--host",
                             r == 2 ? ns.ip() : ns.host_ip()});
    auto p = common::Subprocess::Spawn(argv);
    ASSERT_TRUE(p.ok()) << p.status();
    auto port = p->ReadListeningPort(absl::Seconds(20));
    ASSERT_TRUE(port.ok()) << port.status();
    addrs.push_back((r == 2 ? ns.ip() : ns.host_ip()) + ":" + std::to_string(*port));
    ranks.push_back(std::move(*p));
  }
  {
    std::ofstream out(peers + ".tmp");
    for (const auto& a : addrs) out << a << "\n";
  }
  std::rename((peers + ".tmp").c_str(), peers.c_str());
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  ASSERT_TRUE(ns.Cut()) << "iptables could not cut the link (scripts/install-deps.sh installs iptables)";
  for (int r : {0, 1}) {
    auto line = ranks[r].ReadLineWith("RESULT", absl::Seconds(20));
    ASSERT_TRUE(line.ok()) << "rank " << r << ": " << line.status();
    const bool failed = line->find("code=ABORTED") != std::string::npos ||
                        line->find("code=DEADLINE_EXCEEDED") != std::string::npos;
    EXPECT_TRUE(failed) << "rank " << r << ": " << *line;
    ASSERT_NE(line->find("ms="), std::string::npos) << *line;
    const double ms = std::atof(line->c_str() + line->find("ms=") + 3);
    EXPECT_LT(ms, kDeadlineMs + kSlackMs) << "rank " << r << ": " << *line;
    std::printf("rank %d: %s\n", r, line->c_str());
  }
  ns.Heal();
}

}  // namespace
}  // namespace moe
