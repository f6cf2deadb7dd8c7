#include "router/kept_gate.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "services/common/server_util.h"
#include "tests/reference/test_util.h"

namespace moe::router {
namespace {

common::SafetensorsWriter GateOfStep(uint64_t step) {
  common::SafetensorsWriter w;
  w.SetMetadata("train_step", absl::StrCat(step));
  const std::vector<float> weight(8, static_cast<float>(step));
  EXPECT_TRUE(w.AddF32("gate.weight", {2, 4}, weight).ok());
  return w;
}

// The training step of the gate kept at `path`; 0 when none can be read.
uint64_t KeptStep(const std::string& path) {
  auto r = common::SafetensorsReader::Open(path);
  uint64_t step = 0;
  if (!r.ok()) return 0;
  const auto it = (*r)->metadata().find("train_step");
  return it != (*r)->metadata().end() && absl::SimpleAtoi(it->second, &step) ? step : 0;
}

std::string FreshDir(const std::string& name) {
  const std::string dir = ::moe::testing::TempPath(name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// A router writes its gate over one kept under its own lease epoch or an earlier one, never over
// one kept under a later epoch (a router that took the lease over while this one stalled).
// Without a coordinator (epoch 0) there is no lease to fence with: the gate is written.
TEST(KeptGate, AGateKeptUnderALaterLeaseEpochIsNotWrittenOver) {
  const std::string dir = FreshDir("kept_gate_epochs");
  const std::string path = dir + "/gate.safetensors";
  uint64_t kept = 0;
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(1), 9, absl::Seconds(1), &kept).ok());
  EXPECT_EQ(KeptGateEpoch(path), 9u);
  EXPECT_EQ(KeptStep(path), 1u);

  const absl::Status older = WriteKeptGate(path, GateOfStep(2), 5, absl::Seconds(1), &kept);
  EXPECT_EQ(older.code(), absl::StatusCode::kFailedPrecondition) << older;
  EXPECT_NE(older.message().find("kept under placement lease epoch 9, later than this router's 5"),
            std::string::npos)
      << older;
  EXPECT_EQ(kept, 9u);
  EXPECT_EQ(KeptStep(path), 1u) << "written over";
  EXPECT_EQ(KeptGateEpoch(path), 9u);

  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(3), 9, absl::Seconds(1), &kept).ok());
  EXPECT_EQ(KeptStep(path), 3u);
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(4), 12, absl::Seconds(1), &kept).ok());
  EXPECT_EQ(KeptStep(path), 4u);
  EXPECT_EQ(KeptGateEpoch(path), 12u);
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(5), 0, absl::Seconds(1), &kept).ok());
  EXPECT_EQ(KeptStep(path), 5u);
  EXPECT_EQ(KeptGateEpoch(path), 0u);

  // An epoch no coordinator grants (a shard would refuse it) fences nothing.
  common::SafetensorsWriter odd = GateOfStep(6);
  odd.SetMetadata(kKeptGateEpochKey, absl::StrCat(common::kMaxLeaseEpoch));
  ASSERT_TRUE(odd.Write(path).ok());
  EXPECT_EQ(KeptGateEpoch(path), 0u);
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(7), 3, absl::Seconds(1), &kept).ok());
  EXPECT_EQ(KeptStep(path), 7u);
  std::filesystem::remove_all(dir);
}

// The check and the write are made under DIR/gate.lock: a write waits while another process
// holds it (here the test, through a descriptor of its own), and gives up, writing nothing, once
// it has waited its time.
TEST(KeptGate, AWriteWaitsWhileAnotherHoldsTheLock) {
  const std::string dir = FreshDir("kept_gate_lock");
  const std::string path = dir + "/gate.safetensors";
  uint64_t kept = 0;
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(1), 4, absl::Seconds(1), &kept).ok());
  const int fd = open((dir + "/gate.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(flock(fd, LOCK_EX | LOCK_NB), 0);

  const absl::Status waited = WriteKeptGate(path, GateOfStep(2), 4, absl::Milliseconds(200), &kept);
  EXPECT_EQ(waited.code(), absl::StatusCode::kDeadlineExceeded) << waited;
  EXPECT_NE(waited.message().find("gate.lock is held by another process"), std::string::npos)
      << waited;
  EXPECT_EQ(KeptStep(path), 1u) << "written without the lock";

  // Released while a write waits: it goes on then.
  std::thread release([fd] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    close(fd);
  });
  const absl::Status after = WriteKeptGate(path, GateOfStep(3), 4, absl::Seconds(30), &kept);
  release.join();
  EXPECT_TRUE(after.ok()) << after;
  EXPECT_EQ(KeptStep(path), 3u);
  std::filesystem::remove_all(dir);
}

// A router's start removes the temporary files of gate writes that did not finish, under the
// lock: while another process holds it (a router sharing the directory, mid-write, whose pid in
// its own container names no process here), its file stays.
TEST(KeptGate, UnfinishedWritesAreRemovedOnlyUnderTheLock) {
  const std::string dir = FreshDir("kept_gate_unfinished");
  // A pid above any pid_max (2^22): no process here has it.
  const std::string unfinished = dir + "/gate.safetensors.tmp.999999999.0";
  ASSERT_TRUE(GateOfStep(1).Write(unfinished).ok());
  const int fd = open((dir + "/gate.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(flock(fd, LOCK_EX | LOCK_NB), 0);
  EXPECT_EQ(RemoveUnfinishedGateWrites(dir, absl::Milliseconds(100)), 0);
  EXPECT_TRUE(std::filesystem::exists(unfinished)) << "removed while another held the lock";
  close(fd);
  EXPECT_EQ(RemoveUnfinishedGateWrites(dir, absl::Milliseconds(100)), 1);
  EXPECT_FALSE(std::filesystem::exists(unfinished));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe::router
