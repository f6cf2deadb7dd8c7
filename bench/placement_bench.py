#!/usr/bin/env python3
"""Hybrid against dynamic placement under Zipf-skewed load: 4 shards, each with an equal cgroup CPU
quota (like separate machines), moe-client load with expert popularity Zipf(1.2); a warm-up
lets dynamic placement see the load and rebalance, then tokens/s and p99 are measured. Three
popularity orders: by expert id (expert 0 the most popular: the hot experts are exactly the ones
hybrid replicates everywhere, hybrid's best case), a seeded shuffle (which experts are hot is
not known in advance, what dynamic placement is for), and reversed (the hot experts are the ones
hybrid does not replicate, its worst case). Prints a line per run and writes JSON
lines to the file given as the first argument.

usage: placement_bench.py OUT.jsonl BIN_DIR [SECONDS]
"""
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../client/python"))
import local_cluster  # noqa: E402

out_path, bin_dir = sys.argv[1], sys.argv[2]
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
work = tempfile.mkdtemp()
ck = os.path.join(work, "zipf.safetensors")
subprocess.run([f"{bin_dir}/moe-client", "init-checkpoint", "--out", ck, "--experts", "16",
                "--d-model", "512", "--d-ff", "2048", "--top-k", "2", "--activation", "silu",
                "--gated", "--seed", "1"], check=True, stdout=subprocess.DEVNULL)


def load(router, duration, hot_order):
    r = subprocess.run([f"{bin_dir}/moe-client", "load", "--router", router, "--checkpoint", ck,
                        "--zipf", "1.2", "--hot-order", str(hot_order), "--concurrency", "4",
                        "--batch-size", "64", "--duration", str(duration)],
                       capture_output=True, text=True, check=True)
    tps = float(re.search(r"tokens/s\s+([0-9.]+)", r.stdout).group(1))
    p99 = float(re.search(r"p99 latency \(ms\)\s+([0-9.]+)", r.stdout).group(1))
    errors = int(re.search(r"errors\s+([0-9]+)", r.stdout).group(1))
    return tps, p99, errors


# Each shard gets an equal CPU quota (a cgroup each): like a machine of its own, it cannot borrow
# a neighbour's idle time, as shards pinned two to a core could. 80 % of the cores go to the
# shards; the rest is left to the router and the load generator.
SHARD_CPUS = round(0.8 * os.cpu_count() / 4, 2)
SHARD_LIMIT = ["--shard-cpus", str(SHARD_CPUS)]


def cpu_quota_possible():
    if os.geteuid() != 0:
        return False
    if os.path.exists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        return True
    try:
        return "cpu" in open("/sys/fs/cgroup/cgroup.controllers").read().split()
    except OSError:
        return False


if not cpu_quota_possible():
    print("placement_bench: no cgroup CPU quota here (needs root and a cpu controller); shards "
          "pinned two to a core instead, where a busy shard can borrow its neighbour's idle time",
          file=sys.stderr)
    SHARD_CPUS = "pinned"
    SHARD_LIMIT = ["--pin-shards"]
ORDERS = [("by_id", 0), ("shuffled", 7), ("reversed", -1)]
results = {}
with open(out_path, "w") as out:
    for order, hot_order in ORDERS:
        for placement in ("hybrid", "dynamic"):
            cluster, router = local_cluster.start(
                bin_dir, ck, "--shards", "4", "--placement", placement, *SHARD_LIMIT,
                "--router-args", "--rebalance-cooldown-s 1 --imbalance-threshold 0.2",
                stderr=subprocess.DEVNULL)
            try:
                # Warm-up: dynamic placement sees the skew and rebalances.
                load(router, max(3.0, seconds / 2), hot_order)
                tps, p99, errors = load(router, seconds, hot_order)
                placement_out = subprocess.run([f"{bin_dir}/moe-client", "placement", "--router",
                                                router], capture_output=True, text=True).stdout
                version = int(re.search(r"version (\d+)", placement_out).group(1))
            finally:
                cluster.terminate()
                cluster.wait(timeout=30)
            results[(order, placement)] = tps
            row = {"order": order, "placement": placement, "tokens_per_s": tps, "p99_ms": p99,
                   "errors": errors, "placement_version": version, "shard_cpus": SHARD_CPUS}
            out.write(json.dumps(row) + "\n")
            print(f"{order:8s} {placement:8s}: {tps:8.0f} tokens/s, p99 {p99:.1f} ms, "
                  f"{errors} errors, placement version {version}", file=sys.stderr, flush=True)
for order, _ in ORDERS:
    print(f"{order}: dynamic / hybrid {results[(order, 'dynamic')] / results[(order, 'hybrid')]:.2f}x",
          file=sys.stderr)
