#ifndef MOE_SERVICES_COMMON_LOG_H_
#define MOE_SERVICES_COMMON_LOG_H_

// The services' log lines (stderr). Each begins with the UTC time it was written, to the
// millisecond ("2026-12-07T23:35:01.123Z moe-router: shard ... left rotation ..."): the services
// of a local cluster share one terminal, and what happened in a failover is read from the order
// and the spacing of their lines. Under Kubernetes or Docker the runtime's own timestamps come
// in addition. A command-line tool's messages to its user (usage errors, progress) carry none.

namespace moe::common {

// Writes the time, a space, then `format` with its arguments as std::fprintf(stderr, ...) would,
// in one write(2), so that the lines of several threads or processes sharing stderr do not
// interleave (on a pipe, up to PIPE_BUF: 4096 bytes). `format` ends with its own newline.
void Log(const char* format, ...) __attribute__((format(printf, 1, 2)));

}  // namespace moe::common

#endif  // MOE_SERVICES_COMMON_LOG_H_
