#ifndef MOE_ROUTER_KEPT_GATE_H_
#define MOE_ROUTER_KEPT_GATE_H_

// The trained gate a router keeps in its --state-dir (DIR/gate.safetensors), written so that
// routers sharing the directory (a volume both mount: the holder of the placement lease and a
// spare) do not write over each other's newer gate. Each file says under which placement lease
// epoch it was kept (metadata "lease_epoch"); a router writes only over a file of its own epoch
// or an earlier one, and it checks and writes under DIR/gate.lock (flock), so another router's
// write cannot land between the two. A router whose lease went to another while it stalled
// (between its lease check and its write) so leaves the new holder's gate in place.

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "services/common/safetensors.h"

namespace moe::router {

// The metadata key of a kept gate's lease epoch.
inline constexpr char kKeptGateEpochKey[] = "lease_epoch";

// The lease epoch the gate file at `path` was kept under: 0 when it has none (kept without a
// coordinator, or by an older router), cannot be read, or holds no number below
// common::kMaxLeaseEpoch (a shard would refuse such an epoch too).
uint64_t KeptGateEpoch(const std::string& path);

// Writes `gate` to `path` under lease epoch `epoch` (0: none, no coordinator; then the file is
// written whatever epoch it has). FAILED_PRECONDITION, with the file's epoch in `*kept_epoch`,
// when the file was kept under a later epoch than `epoch`: nothing is written. DEADLINE_EXCEEDED
// when another process holds the lock for `lock_wait` (a router stalled mid-write; nothing is
// written, and the next step's gate is kept instead). A directory whose filesystem takes no
// locks is written without one. Otherwise the write's own status.
absl::Status WriteKeptGate(const std::string& path, common::SafetensorsWriter gate, uint64_t epoch,
                           absl::Duration lock_wait, uint64_t* kept_epoch);

// Removes the temporary files of writes in `dir` whose process has ended
// (common::RemoveUnfinishedWrites), under DIR/gate.lock: a router sharing the directory that is
// writing its gate holds the lock, so its write is not taken for a dead process's (in another
// pid namespace, another container, its pid means nothing here). Returns how many were removed;
// none when another process holds the lock for `lock_wait`.
int RemoveUnfinishedGateWrites(const std::string& dir, absl::Duration lock_wait);

}  // namespace moe::router

#endif  // MOE_ROUTER_KEPT_GATE_H_
