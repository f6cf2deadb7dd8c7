#ifndef MOE_SERVICES_COMMON_SIGNALS_H_
#define MOE_SERVICES_COMMON_SIGNALS_H_

// SIGTERM/SIGINT handling for the service binaries: block the signals in every thread (call
// first in main), then wait for one on a dedicated thread.

namespace moe::common {

void BlockTerminationSignals();

// Keeps large transient buffers (MiB-sized batches and chunks) on the heap instead of a fresh
// mmap, munmap and page faults for each one. Call first in main.
void TuneAllocatorForLargeBuffers();
// Returns the signal received (SIGTERM or SIGINT), or 0 after WakeSignalWaiter().
int WaitForTerminationSignal();
// Makes a pending WaitForTerminationSignal() return 0 (when the server stopped by itself).
void WakeSignalWaiter();

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_SIGNALS_H_
