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

// A router does not write over a gate that another router kept under a later lease epoch than
// the file this router last read or wrote (that router has held the lease since, while this one
// stalled), whatever this router's own epoch is now. Its own file, or the one it read when it
// took over, under a later epoch than its own is its coordinator's clock gone behind: told
// apart (FAILED_PRECONDITION, with the epoch to ask past). Without a coordinator (epoch 0)
// there is no lease to fence with: the gate is written.
TEST(KeptGate, AGateAnotherRouterKeptSinceIsNotWrittenOver) {
  const std::string dir = FreshDir("kept_gate_epochs");
  const std::string path = dir + "/gate.safetensors";
  uint64_t later = 0;
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(1), 9, "a", 0, absl::Seconds(1), &later).ok());
  EXPECT_EQ(ReadKeptGateMark(path).epoch, 9u);
  EXPECT_EQ(ReadKeptGateMark(path).kept_by, "a");
  EXPECT_EQ(KeptStep(path), 1u);
  // b took over (reading a's file, epoch 9) and trains.
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(2), 12, "b", 9, absl::Seconds(1), &later).ok());
  EXPECT_EQ(ReadKeptGateMark(path).kept_by, "b");

  // a wakes from its stall: under its old epoch, and under a later one it was granted after b
  // gave the lease up. Neither writes over b's gate.
  for (uint64_t epoch : {uint64_t{9}, uint64_t{15}}) {
    const absl::Status stale =
        WriteKeptGate(path, GateOfStep(3), epoch, "a", 9, absl::Seconds(1), &later);
    EXPECT_EQ(stale.code(), absl::StatusCode::kAborted) << stale;
    EXPECT_NE(stale.message().find("router b kept its gate there under placement lease epoch 12, "
                                   "later than the one this router last read or wrote (9)"),
              std::string::npos)
        << stale;
    EXPECT_EQ(KeptStep(path), 2u) << "written over under epoch " << epoch;
  }

  // b's coordinator restarted with its clock behind: b's own file has a later epoch than b's.
  later = 0;
  const absl::Status behind =
      WriteKeptGate(path, GateOfStep(4), 5, "b", 12, absl::Seconds(1), &later);
  EXPECT_EQ(behind.code(), absl::StatusCode::kFailedPrecondition) << behind;
  EXPECT_EQ(later, 12u);
  EXPECT_EQ(KeptStep(path), 2u);
  // Raised past it, b writes; so does a router that read the file (c, taking over from b).
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(5), 13, "b", 12, absl::Seconds(1), &later).ok());
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(6), 20, "c", 13, absl::Seconds(1), &later).ok());
  EXPECT_EQ(KeptStep(path), 6u);
  // No coordinator: written whatever the file holds.
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(7), 0, "d", 0, absl::Seconds(1), &later).ok());
  EXPECT_EQ(KeptStep(path), 7u);
  EXPECT_EQ(ReadKeptGateMark(path).epoch, 0u);

  // An epoch past what a coordinator takes as min_epoch fences nothing: no lease has one.
  common::SafetensorsWriter odd = GateOfStep(8);
  odd.SetMetadata(kKeptGateEpochKey, absl::StrCat(common::kMaxLeaseEpoch - 1));
  odd.SetMetadata(kKeptGateByKey, "e");
  ASSERT_TRUE(odd.Write(path).ok());
  EXPECT_EQ(ReadKeptGateMark(path).epoch, 0u);
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(9), 3, "a", 0, absl::Seconds(1), &later).ok());
  EXPECT_EQ(KeptStep(path), 9u);
  std::filesystem::remove_all(dir);
}

// The check and the write are made under DIR/gate.lock: a write waits while another process
// holds it (here the test, through a descriptor of its own), and gives up, writing nothing, once
// it has waited its time.
TEST(KeptGate, AWriteWaitsWhileAnotherHoldsTheLock) {
  const std::string dir = FreshDir("kept_gate_lock");
  const std::string path = dir + "/gate.safetensors";
  uint64_t kept = 0;
  ASSERT_TRUE(WriteKeptGate(path, GateOfStep(1), 4, "a", 0, absl::Seconds(1), &kept).ok());
  const int fd = open((dir + "/gate.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(flock(fd, LOCK_EX | LOCK_NB), 0);

  const absl::Status waited =
      WriteKeptGate(path, GateOfStep(2), 4, "a", 4, absl::Milliseconds(200), &kept);
  EXPECT_EQ(waited.code(), absl::StatusCode::kDeadlineExceeded) << waited;
  EXPECT_NE(waited.message().find("gate.lock is held by another process"), std::string::npos)
      << waited;
  EXPECT_EQ(KeptStep(path), 1u) << "written without the lock";

  // Released while a write waits: it goes on then.
  std::thread release([fd] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    close(fd);
  });
  const absl::Status after =
      WriteKeptGate(path, GateOfStep(3), 4, "a", 4, absl::Seconds(30), &kept);
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
