// Its own test binary: it replaces the global operator new to see allocations in a forked child.

#include "services/common/subprocess.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include <gtest/gtest.h>

// The replacements below pair malloc with free throughout; GCC, seeing a `new` expression end
// in free() once they are inlined, would warn on every delete in this file.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

namespace {

// While set, an allocation through operator new in any other process (a child forked by this
// one) ends that process with status 99.
std::atomic<pid_t> g_parent{0};

}  // namespace

void* operator new(std::size_t n) {
  const pid_t parent = g_parent.load(std::memory_order_relaxed);
  if (parent != 0 && getpid() != parent) _exit(99);
  if (void* p = std::malloc(n != 0 ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace moe::common {
namespace {

TEST(Subprocess, ReadsTheLineAndTheExitStatus) {
  auto p = Subprocess::Spawn({"/bin/sh", "-c", "echo starting; echo 'x listening on h:4321'; exit 3"});
  ASSERT_TRUE(p.ok()) << p.status();
  auto port = p->ReadListeningPort(absl::Seconds(10));
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_EQ(*port, 4321);
  auto st = p->Wait(absl::Seconds(10));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(DescribeWaitStatus(*st), "exited with status 3");
}

// Between fork and exec the child of a multi-threaded parent may only make async-signal-safe
// calls: an allocation there can wait for ever on an allocator lock that another thread held at
// the fork (seen under ASan: a restarted shard that never started, gdb on the stuck child in
// SizeClassAllocator64::GetFromAllocator). The child allocates nothing, also when exec fails.
TEST(Subprocess, TheChildAllocatesNothingBeforeExec) {
  std::vector<std::string> argv = {"/bin/true"};
  for (int i = 0; i < 100; ++i) argv.push_back("argument-" + std::to_string(i));
  struct Case {
    std::vector<std::string> argv;
    const char* want;
  };
  for (const Case& c : {Case{argv, "exited with status 0"},
                        Case{{"/nonexistent/moe-binary"}, "exited with status 127"}}) {
    g_parent = getpid();
    auto p = Subprocess::Spawn(c.argv);
    g_parent = 0;
    ASSERT_TRUE(p.ok()) << p.status();
    auto st = p->Wait(absl::Seconds(10));
    ASSERT_TRUE(st.ok()) << st.status();
    EXPECT_EQ(DescribeWaitStatus(*st), c.want)
        << c.argv[0] << " (status 99: the child allocated before exec)";
  }
}

TEST(Subprocess, AProgramThatIsNotThereClosesItsOutput) {
  auto p = Subprocess::Spawn({"/nonexistent/moe-binary"});
  ASSERT_TRUE(p.ok()) << p.status();
  auto line = p->ReadLineWith("listening on", absl::Seconds(10));
  EXPECT_EQ(line.status().code(), absl::StatusCode::kUnavailable) << line.status();
  EXPECT_NE(line.status().message().find("closed its output"), std::string::npos)
      << line.status();
}

}  // namespace
}  // namespace moe::common
