#include "expert_server/state_dir.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "services/common/random_checkpoint.h"
#include "tests/reference/test_util.h"

namespace moe::expert {
namespace {

common::ModelConfig Config() {
  common::ModelConfig c;
  c.num_experts = 3;
  c.d_model = 8;
  c.d_ff = 16;
  c.top_k = 1;
  c.activation = common::Activation::kSilu;
  c.gated = true;
  return c;
}

// An expert handle holding `w` as trained up to `step`.
std::shared_ptr<const ExpertHandle> Trained(int expert, const common::ExpertWeights& w,
                                            uint64_t step) {
  auto h = std::make_shared<ExpertHandle>();
  h->id = expert;
  h->ffn = *ExpertFfn::Create(Config(), w);
  h->trained_step = step;
  return h;
}

// Weights unlike the checkpoint's, as training would leave them.
common::ExpertWeights Moved(common::ExpertWeights w, float by) {
  for (float& v : w.w1) v += by;
  for (float& v : w.w2) v -= by;
  for (float& v : w.w3) v *= 1 + by;
  return w;
}

class StateDirTest : public ::testing::Test {
 protected:
  StateDirTest() : ck_(common::MakeRandomCheckpoint({Config(), false, 4})) {}

  std::unique_ptr<StateDir> Open(const std::string& dir, const common::Checkpoint& ck) {
    auto s = StateDir::Open(
        dir, Config(), [&ck](int e) { return absl::StatusOr<common::ExpertWeights>(ck.experts[e]); },
        [this](int e, uint64_t step, const absl::Status& st) {
          std::lock_guard<std::mutex> lock(mu_);
          written_.push_back({e, step, st.ok()});
        });
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  struct Written {
    int expert;
    uint64_t step;
    bool ok;
  };
  common::Checkpoint ck_;
  std::mutex mu_;
  std::vector<Written> written_;
};

TEST_F(StateDirTest, AnExpertSavedIsReadBackWithItsStepAfterARestart) {
  const std::string dir = testing::TempPath("state_roundtrip/shard-0");  // parents created too
  const common::ExpertWeights trained = Moved(ck_.experts[1], 0.25f);
  {
    auto state = Open(dir, ck_);
    ASSERT_NE(state, nullptr);
    EXPECT_FALSE(state->Read(1).has_value()) << "nothing saved yet";
    state->Save(Trained(1, trained, 42));
    state->Flush();
  }
  auto again = Open(dir, ck_);  // as a restarted shard does
  ASSERT_NE(again, nullptr);
  std::optional<LoadedExpert> read = again->Read(1);
  ASSERT_TRUE(read.has_value());
  EXPECT_EQ(read->trained_step, 42u);
  EXPECT_EQ(read->weights.w1, trained.w1);
  EXPECT_EQ(read->weights.w2, trained.w2);
  EXPECT_EQ(read->weights.w3, trained.w3);
  EXPECT_FALSE(again->Read(0).has_value()) << "expert 0 was never saved";
  // Installing what was just read writes nothing again.
  again->Save(Trained(1, read->weights, read->trained_step));
  again->Flush();
  std::lock_guard<std::mutex> lock(mu_);
  ASSERT_EQ(written_.size(), 1u);
  EXPECT_EQ(written_[0].expert, 1);
  EXPECT_EQ(written_[0].step, 42u);
  EXPECT_TRUE(written_[0].ok);
}

// A shard killed while writing leaves its temporary file; the next Open, holding the directory's
// lock, removes it, whatever pid it names: a running process's (the directory's writer cannot
// be another process) and this process's own (a container's shard is PID 1 at every start). Not
// any other file. Without the lock, only a dead writer's go.
TEST_F(StateDirTest, TemporaryFilesOfUnfinishedWritesAreRemovedAtOpen) {
  const std::string dir = testing::TempPath("state_unfinished");
  std::filesystem::create_directories(dir);
  auto touch = [&](const std::string& name) {
    std::ofstream(dir + "/" + name) << "partial";
    return dir + "/" + name;
  };
  // Pids are below the kernel's pid_max, at most 2^22: this one never runs.
  const std::string dead = touch("expert-3.safetensors.tmp.4194305.7");
  const std::string live = touch(absl::StrCat("expert-4.safetensors.tmp.", getppid(), ".1"));
  const std::string own = touch(absl::StrCat("expert-5.safetensors.tmp.", getpid(), ".1"));
  const std::string other = touch("notes.tmp.4194305.1");
  // Without the lock: a running process's files, this one's included, are left to them.
  EXPECT_EQ(common::RemoveUnfinishedWrites(dir), 1);
  EXPECT_FALSE(std::filesystem::exists(dead)) << "a dead writer's temporary file stayed";
  EXPECT_TRUE(std::filesystem::exists(live)) << "a running process's write was removed";
  EXPECT_TRUE(std::filesystem::exists(own)) << "this process's write was removed";
  touch("expert-3.safetensors.tmp.4194305.7");
  auto state = Open(dir, ck_);
  ASSERT_NE(state, nullptr);
  EXPECT_FALSE(std::filesystem::exists(dead)) << "a dead writer's temporary file stayed";
  EXPECT_FALSE(std::filesystem::exists(live)) << "an earlier run's file of a live pid stayed";
  EXPECT_FALSE(std::filesystem::exists(own)) << "an earlier run's file of this pid stayed";
  EXPECT_TRUE(std::filesystem::exists(other)) << "a file that is not a write was removed";
  EXPECT_EQ(common::RemoveUnfinishedWrites(dir, /*all=*/true), 0);
}

TEST_F(StateDirTest, OnlyTrainedWeightsAreSavedAndTheLatestWins) {
  const std::string dir = testing::TempPath("state_latest");
  auto state = Open(dir, ck_);
  ASSERT_NE(state, nullptr);
  state->Save(Trained(0, ck_.experts[0], 0));  // the checkpoint's weights: nothing to keep
  state->Flush();
  EXPECT_FALSE(state->Read(0).has_value());
  const common::ExpertWeights later = Moved(ck_.experts[2], 0.5f);
  state->Save(Trained(2, Moved(ck_.experts[2], 0.1f), 5));
  state->Save(Trained(2, later, 9));
  state->Save(Trained(2, Moved(ck_.experts[2], 0.2f), 7));  // older than what is queued or kept
  state->Flush();
  std::optional<LoadedExpert> read = state->Read(2);
  ASSERT_TRUE(read.has_value());
  EXPECT_EQ(read->trained_step, 9u);
  EXPECT_EQ(read->weights.w1, later.w1);
}

TEST_F(StateDirTest, FilesThatDoNotBelongToThisCheckpointAreIgnored) {
  const std::string dir = testing::TempPath("state_other_model");
  {
    auto state = Open(dir, ck_);
    ASSERT_NE(state, nullptr);
    state->Save(Trained(0, Moved(ck_.experts[0], 0.3f), 3));
    state->Flush();
  }
  // The same directory under a checkpoint with other weights: the file is not this model's.
  const common::Checkpoint other = common::MakeRandomCheckpoint({Config(), false, 99});
  auto state = Open(dir, other);
  ASSERT_NE(state, nullptr);
  ::testing::internal::CaptureStderr();
  const bool read_other = state->Read(0).has_value();
  // A damaged file is ignored too, and the expert comes from the checkpoint.
  std::ofstream(state->PathOf(1)) << "not a safetensors file";
  const bool read_damaged = state->Read(1).has_value();
  // Each reason is logged once: read again, or another expert's file of the same model.
  const bool read_again = state->Read(0).has_value();
  std::filesystem::copy_file(state->PathOf(0), state->PathOf(2));
  const bool read_second = state->Read(2).has_value();
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_FALSE(read_other);
  EXPECT_FALSE(read_damaged);
  EXPECT_FALSE(read_again);
  EXPECT_FALSE(read_second);
  const std::vector<std::string> lines = absl::StrSplit(log, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u) << log;
  EXPECT_NE(lines[0].find(absl::StrCat(state->PathOf(0),
                                       " ignored, expert 0 read from the "
                                       "checkpoint: it was trained from other weights")),
            std::string::npos)
      << lines[0];
  EXPECT_NE(lines[1].find(absl::StrCat(state->PathOf(1), " ignored, expert 1")), std::string::npos)
      << lines[1];
}

// Started again from a checkpoint saved from this training (save-checkpoint) with the same
// directory: a file holding the saved weights is the checkpoint's own expert, ignored without a
// line; one trained on after the save is ignored with a line that says its steps are lost.
TEST_F(StateDirTest, FilesOfTheTrainingACheckpointWasSavedFromAreIgnoredQuietly) {
  const std::string dir = testing::TempPath("state_saved_from");
  const common::ExpertWeights saved0 = Moved(ck_.experts[0], 0.3f);
  const common::ExpertWeights saved1 = Moved(ck_.experts[1], 0.3f);
  {
    auto state = Open(dir, ck_);
    ASSERT_NE(state, nullptr);
    state->Save(Trained(0, saved0, 3));
    state->Save(Trained(1, Moved(ck_.experts[1], 0.4f), 4));  // a step after the save
    state->Flush();
  }
  common::Checkpoint saved = ck_;
  saved.experts[0] = saved0;
  saved.experts[1] = saved1;
  auto state = Open(dir, saved);
  ASSERT_NE(state, nullptr);
  ::testing::internal::CaptureStderr();
  const bool read_saved = state->Read(0).has_value();
  const std::string quiet = ::testing::internal::GetCapturedStderr();
  ::testing::internal::CaptureStderr();
  const bool read_later = state->Read(1).has_value();
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_FALSE(read_saved);
  EXPECT_EQ(quiet, "");
  EXPECT_FALSE(read_later);
  EXPECT_NE(log.find(absl::StrCat(state->PathOf(1),
                                  " ignored, expert 1 read from the checkpoint: it was trained "
                                  "from other weights than this checkpoint's (another model's, "
                                  "or steps trained after this checkpoint was saved from it: "
                                  "those are not kept)")),
            std::string::npos)
      << log;
}

TEST_F(StateDirTest, APathThatIsAFileIsRefusedWithItsName) {
  const std::string file = testing::TempPath("state_is_a_file");
  std::ofstream(file) << "x";
  auto state = StateDir::Open(file, Config(), [this](int e) {
    return absl::StatusOr<common::ExpertWeights>(ck_.experts[e]);
  });
  ASSERT_FALSE(state.ok());
  EXPECT_EQ(state.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(state.status().message().find(file), std::string::npos) << state.status();
}

// Two shards given one --state-dir would each read the other's experts as their own at their
// next start: the second is refused, naming the first's pid, until the first has gone.
TEST_F(StateDirTest, ADirectoryInUseByAnotherShardIsRefused) {
  const std::string dir = testing::TempPath("state_shared");
  std::unique_ptr<StateDir> first = Open(dir, ck_);
  ASSERT_NE(first, nullptr);
  auto second = StateDir::Open(dir, Config(), [this](int e) {
    return absl::StatusOr<common::ExpertWeights>(ck_.experts[e]);
  });
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(second.status().message(),
            absl::StrCat("--state-dir ", dir, " is in use by another moe-expert-server (pid ",
                         getpid(), "): give each shard a directory of its own"));
  first.reset();
  EXPECT_NE(Open(dir, ck_), nullptr) << "the lock outlived its StateDir";
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe::expert
