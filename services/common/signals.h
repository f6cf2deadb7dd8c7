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

// A binary's main: --help/-h prints `usage`, --version "NAME VERSION"; an error from `run`
// prints "NAME: message" and exits 1, or, for a UsageError, "NAME: message (see --help)" and
// exits 2.
int RunMain(int argc, char** argv, const char* name, const char* usage,
            absl::Status (*run)(int, char**));

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_SIGNALS_H_
