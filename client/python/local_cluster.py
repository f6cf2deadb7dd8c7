"""Starts `moe-cluster` (coordinator, expert shards and router on loopback) for scripts, tests and
benchmarks, and waits until it is ready."""
import os
import socket
import subprocess


def start(bin_dir, checkpoint, *args, stderr=None):
    """Runs `moe-cluster --checkpoint CHECKPOINT --router-port 0 ARGS...` and returns
    (process, router address) once it printed READY; raises RuntimeError if it exits first.
    process.services holds the lines before READY ("shard I addr=HOST:PORT pid=PID", ...).
    Stop it with process.terminate() (SIGTERM stops every service)."""
    p = subprocess.Popen([f"{bin_dir}/moe-cluster", "--checkpoint", checkpoint,
                          "--router-port", "0", *args],
                         stdout=subprocess.PIPE, stderr=stderr, text=True)
    p.services = []
    for line in p.stdout:
        p.services.append(line.strip())
        if line.startswith("READY router="):
            return p, line.strip().split("=", 1)[1]
    p.wait()
    raise RuntimeError(f"moe-cluster exited ({p.returncode}) before it was ready")


def free_port_run(n):
    """The first of n consecutive free loopback ports (for --metrics-port: router, shards,
    coordinator)."""
    for base in range(20000 + os.getpid() % 20000, 60000, 7):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")
