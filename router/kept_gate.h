#ifndef MOE_ROUTER_KEPT_GATE_H_
#define MOE_ROUTER_KEPT_GATE_H_

// The trained gate a router keeps in its --state-dir (DIR/gate.safetensors), written so that
// routers sharing the directory (a volume both mount: the holder of the placement lease and a
// spare) do not write over each other's newer gate. Each file says which router kept it and
// under which placement lease epoch (metadata "kept_by" and "lease_epoch"). A router does not
// write over a file that another router kept under a later epoch than the file it last read or
// wrote itself: that router has held the lease since (this one stalled meanwhile), and this
// router's gate is not the one trained last. The check and the write are made under
// DIR/gate.lock (flock), so another router's write cannot land between the two.

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "services/common/safetensors.h"

namespace moe::router {

// The metadata keys of a kept gate's lease epoch and of the router that kept it.
inline constexpr char kKeptGateEpochKey[] = "lease_epoch";
inline constexpr char kKeptGateByKey[] = "kept_by";

// Who kept the gate file at `path`, and under which lease epoch. An epoch of 0: none (kept
// without a coordinator, or by an older router), a file that cannot be read, or a number at or
// above what a coordinator takes as PlacementLeaseRequest.min_epoch (no lease has such an
// epoch; a file that claimed one would fence every router out).
struct KeptGateMark {
  uint64_t epoch = 0;
  std::string kept_by;  // the router's id (RouterServer's, one per process); empty if none
};
KeptGateMark ReadKeptGateMark(const std::string& path);
// The same, from a gate file's metadata already read.
KeptGateMark KeptGateMarkOf(const std::map<std::string, std::string>& metadata);

// Writes `gate` to `path`, marked as kept by router `router_id` under lease epoch `epoch`.
// `last_seen` is the epoch of the file this router last read or wrote there (0: none). With
// `epoch` 0 (no coordinator: no lease to fence with) the file is written whatever it holds.
// Otherwise, nothing is written, and:
// - ABORTED when another router kept the file under an epoch later than `last_seen`: it has
//   held the lease since this router last looked;
// - FAILED_PRECONDITION, with the file's epoch in `*later`, when the file's epoch is later than
//   `epoch` otherwise (this router's own gate, or the one it read when it took over: its
//   coordinator restarted with its clock behind, and this router may ask for its lease past
//   that epoch and write again);
// - DEADLINE_EXCEEDED when another process holds the lock for `lock_wait` (a router stalled
//   mid-write; the next step's gate is kept instead).
// A directory whose filesystem takes no locks (or whose lock file cannot be opened) is written
// without the lock, said once. Otherwise the write's own status.
absl::Status WriteKeptGate(const std::string& path, common::SafetensorsWriter gate, uint64_t epoch,
                           const std::string& router_id, uint64_t last_seen,
                           absl::Duration lock_wait, uint64_t* later);

// Removes the temporary files of writes in `dir` whose process has ended
// (common::RemoveUnfinishedWrites), under DIR/gate.lock: a router sharing the directory that is
// writing its gate holds the lock, so its write is not taken for a dead process's (in another
// pid namespace, another container, its pid means nothing here). Returns how many were removed;
// none when another process holds the lock for `lock_wait`.
int RemoveUnfinishedGateWrites(const std::string& dir, absl::Duration lock_wait);

}  // namespace moe::router

#endif  // MOE_ROUTER_KEPT_GATE_H_
