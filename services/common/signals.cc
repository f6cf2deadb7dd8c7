#include "services/common/signals.h"

#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

namespace moe::common {

void TuneAllocatorForLargeBuffers() {
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
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

void WakeSignalWaiter() { kill(getpid(), SIGUSR1); }

}  // namespace moe::common
