#ifndef MOE_SERVICES_COMMON_SIGNALS_H_
#define MOE_SERVICES_COMMON_SIGNALS_H_

// SIGTERM/SIGINT handling for the service binaries: block the signals in every thread (call
// first in main), then wait for one on a dedicated thread.

#include <functional>

#include "absl/status/status.h"

namespace moe::common {

void BlockTerminationSignals();

// Settings for a service process (moe-router, moe-expert-server, moe-coordinator,
// moe-ring-rank); call first in main, before threads.
// - Keeps large transient buffers (MiB-sized batches and chunks) on one heap that is never given
//   back, instead of a fresh mmap, munmap and page faults for each one: no mmap below 256 MiB, no
//   trim below 512 MiB free, one malloc arena for all threads.
// - Turns off Abseil's mutex deadlock detection, which Debian's Abseil runs on every
//   absl::Mutex (gRPC's included): each lock of a mutex went through a process-wide lock and a
//   graph lookup (about 1 % of a loaded cluster's CPU). Servers run inside a test binary keep
//   it; the service binaries that the cluster and fault tests launch do not.
void TuneServiceProcess();
// Returns the signal received (SIGTERM or SIGINT), or 0 after WakeSignalWaiter().
int WaitForTerminationSignal();
// SIGTERM or SIGINT when one is pending (blocked by BlockTerminationSignals and not yet waited
// for), else 0. It stays pending.
int PendingTerminationSignal();
// Makes a pending WaitForTerminationSignal() return 0 (when the server stopped by itself).
void WakeSignalWaiter();

// Serves until SIGTERM/SIGINT (then runs `shutdown`, logging the signal as `name`) or until
// `wait` returns by itself. Call after BlockTerminationSignals().
void ServeUntilSignal(const char* name, const std::function<void()>& shutdown,
                      const std::function<void()>& wait);

// This build's version (the project's, from CMake), printed by --version.
extern const char kVersion[];

// Process-wide gRPC settings; call before the process's first gRPC object (RunMain and
// moe-client do). gRPC sees that a client channel's connection attempt has ended only while some
// thread polls for it. A process that serves always has such a thread, but one that only calls
// (moe-client, a user's client) has none between fail-fast calls: the end of an attempt was
// seen by gRPC's backup poller alone, every 5 s by default, and the attempt's own timer
// meanwhile took it for timed out. A channel whose server had restarted came back 4-5 s after
// the server did. Sets that poller's interval (GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS) to
// 100 ms, unless the environment sets it.
void SetGrpcProcessDefaults();

// A binary's main: --help/-h prints `usage`, --version "NAME VERSION"; an error from `run`
// prints "NAME: message" and exits 1, or, for a UsageError, "NAME: message (see --help)" and
// exits 2. Calls SetGrpcProcessDefaults first.
int RunMain(int argc, char** argv, const char* name, const char* usage,
            absl::Status (*run)(int, char**));

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_SIGNALS_H_
