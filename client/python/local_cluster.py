"""Starts `moe-cluster` (coordinator, expert shards and router on loopback) for scripts, tests and
benchmarks, and waits until it is ready."""
import random
import socket
import subprocess


def start(bin_dir, checkpoint, *args, stderr=None):
    """Runs `moe-cluster --checkpoint CHECKPOINT --router-port 0 ARGS...` and returns
    (process, router address) once it printed READY; raises RuntimeError if it exits first.
    process.services holds the lines before READY ("shard I addr=HOST:PORT pid=PID", ...); a
    service started again later is reported on stderr with its new pid.
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
    coordinator), from a random start in 10000-32000: below Linux's ephemeral range, where
    outgoing connections take their ports, and apart from the runs that other tests started at
    the same time pick (a start derived from the pid put two tests run together on the same
    ports)."""
    rng = random.Random()  # seeded from the OS
    for _ in range(200):
        base = rng.randrange(10000, 32000 - n)
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
