#include "services/common/signals.h"

#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "services/common/flags.h"
#include "services/common/log.h"

namespace moe::common {

const char kVersion[] = MOE_VERSION;

void TuneServiceProcess() {
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
  // One arena for every thread. glibc otherwise gives threads their own arenas, whose 64 MiB heaps
  // it unmaps (or MADV_DONTNEEDs) as soon as they empty whatever the trim threshold: gRPC's
  // receive buffers then land on fresh pages, and the kernel's copy into them page-faults, which on
  // a paravirtualized guest cost a ring all-reduce half its time (docs/DECISIONS.md). The main
  // arena keeps its pages (trim threshold above); small blocks still come from per-thread caches.
  mallopt(M_ARENA_MAX, 1);
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

void BlockTerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForTerminationSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGUSR1);
  int sig = 0;
  sigwait(&set, &sig);
  return sig == SIGUSR1 ? 0 : sig;
}

int PendingTerminationSignal() {
  sigset_t pending;
  sigemptyset(&pending);
  if (sigpending(&pending) != 0) return 0;
  if (sigismember(&pending, SIGINT)) return SIGINT;
  if (sigismember(&pending, SIGTERM)) return SIGTERM;
  return 0;
}

void WakeSignalWaiter() { kill(getpid(), SIGUSR1); }

void ServeUntilSignal(const char* name, const std::function<void()>& shutdown,
                      const std::function<void()>& wait) {
  std::thread waiter([&] {
    const int sig = WaitForTerminationSignal();
    if (sig != 0) {
      Log("%s: signal %d, shutting down\n", name, sig);
      shutdown();
    }
  });
  wait();
  WakeSignalWaiter();
  waiter.join();
}

void SetGrpcProcessDefaults() {
  // Read once, by the process's first grpc_init.
  setenv("GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS", "100", /*overwrite=*/0);
}

int RunMain(int argc, char** argv, const char* name, const char* usage,
            absl::Status (*run)(int, char**)) {
  SetGrpcProcessDefaults();
  if (argc > 1 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
    std::fputs(usage, stdout);
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "--version") {
    std::printf("%s %s\n", name, kVersion);
    return 0;
  }
  const absl::Status st = run(argc, argv);
  if (!st.ok()) {
    // Only a bad command line is helped by the usage text; it exits 2, as getopt's users do.
    const bool usage_error = IsUsageError(st);
    std::fprintf(stderr, "%s: %s%s\n", name, std::string(st.message()).c_str(),
                 usage_error ? " (see --help)" : "");
    return usage_error ? 2 : 1;
  }
  return 0;
}

}  // namespace moe::common
