#!/usr/bin/env python3
"""All-reduce bus bandwidth (2 (N-1)/N * bytes / time) of our gRPC ring (moe-ring-rank) beside
Gloo's ring all-reduce over TCP and Open MPI's MPI_Allreduce (over loopback TCP, and over shared
memory as the upper bound), at 1, 16 and 64 MiB and 2 and 4 ranks, all in this one run.
Ours and Gloo, whose ratio is the target, run in ROUNDS alternating pairs (ours first, then Gloo
first, ...): this VM's speed drifts by tens of percent between runs, so each is reported as its
median and the ratio as the median of the pairs' ratios. Prints a table and writes JSON lines to
the file given as the first argument.

usage: allreduce_bench.py OUT.jsonl BIN_DIR
"""
import json
import os
import statistics
import re
import shutil
import subprocess
import sys
import tempfile
import time

out_path, bin_dir = sys.argv[1], sys.argv[2]
SIZES = [1, 16, 64]
WORLDS = [2, 4]
REPEAT = {1: 50, 16: 20, 64: 10}  # timed collectives per run, after the warm-up
ROUNDS = 3
# Before timing, each side's links carry 32 MiB: gloo_allreduce warms every pair with one 32 MiB
# message (Gloo sizes SO_SNDBUF from it), moe-ring-rank --persistent runs warm-up collectives
# until as much crossed each link. ours_stream_per_op sets up a new stream for each collective.
WARM_MIB = 32


def seconds(text):
    vals = [float(v) for v in re.findall(r"seconds_per_op=([0-9.e+-]+)", text)]
    return max(vals) if vals else None


def ours(world, elements, repeat, persistent):
    tmp = tempfile.mkdtemp()
    peers = os.path.join(tmp, "peers")
    procs, addrs = [], []
    for r in range(world):
        p = subprocess.Popen([f"{bin_dir}/moe-ring-rank", "--rank", str(r), "--world", str(world),
                              "--peers-file", peers, "--length", str(elements), "--repeat",
                              str(repeat), "--deadline-ms", "120000"]
                             + (["--persistent", "--warm-mib", str(WARM_MIB)] if persistent
                                else []),
                             stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        addrs.append(line.strip().split("listening on ")[1])
        procs.append(p)
    with open(peers + ".tmp", "w") as f:
        f.write("\n".join(addrs) + "\n")
    os.rename(peers + ".tmp", peers)
    text = "".join(p.communicate(timeout=300)[0] for p in procs)
    shutil.rmtree(tmp)
    if "correct=1" not in text:
        return None
    return seconds(text)


def gloo(world, elements, repeat):
    exe = f"{bin_dir}/gloo_allreduce"
    if not os.path.exists(exe):
        return None
    store = tempfile.mkdtemp()
    procs = [subprocess.Popen([exe, str(r), str(world), store, str(elements), str(repeat)],
                              stdout=subprocess.PIPE, text=True) for r in range(world)]
    text = "".join(p.communicate(timeout=300)[0] for p in procs)
    shutil.rmtree(store)
    return seconds(text)


def mpi(world, elements, repeat, tcp):
    exe = f"{bin_dir}/mpi_allreduce"
    if not os.path.exists(exe) or not shutil.which("mpirun"):
        return None
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(world)]
    if tcp:
        cmd += ["--mca", "pml", "ob1", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include",
                "lo"]
    r = subprocess.run(cmd + [exe, str(elements), str(repeat)], capture_output=True, text=True,
                       timeout=300)
    return seconds(r.stdout)


for peer, package in (("gloo_allreduce", "libgloo-dev"), ("mpi_allreduce", "libopenmpi-dev")):
    if not os.path.exists(f"{bin_dir}/{peer}"):
        print(f"allreduce_bench: {peer} was not built ({package} was missing when CMake "
              f"configured), so its column stays empty; `make bench` installs it and configures "
              f"again", file=sys.stderr)

rows = []
with open(out_path, "w") as out:
    for world in WORLDS:
        for mib in SIZES:
            elements = mib * (1 << 20) // 4
            nbytes = elements * 4
            res = {"ranks": world, "MiB": mib}
            busbw = lambda t: None if t is None else 2 * (world - 1) / world * nbytes / t / 1e9
            # The target's pair, alternating which goes first.
            pair = {"ours": lambda: ours(world, elements, REPEAT[mib], True),
                    "gloo": lambda: gloo(world, elements, REPEAT[mib])}
            pairs = []
            for r in range(ROUNDS):
                got = {name: busbw(pair[name]())
                       for name in (("ours", "gloo") if r % 2 == 0 else ("gloo", "ours"))}
                pairs.append((got["ours"], got["gloo"]))
            got = [o for o, _ in pairs if o]
            res["ours"] = statistics.median(got) if got else None
            got = [g for _, g in pairs if g]
            res["gloo"] = statistics.median(got) if got else None
            ratios = [o / g for o, g in pairs if o and g]
            res["ours_vs_gloo"] = statistics.median(ratios) if ratios else None
            res["rounds"] = [{"ours": o, "gloo": g} for o, g in pairs]
            for name, fn in [("ours_stream_per_op",
                              lambda: ours(world, elements, REPEAT[mib], False)),
                             ("mpi_tcp", lambda: mpi(world, elements, REPEAT[mib], True)),
                             ("mpi_shm", lambda: mpi(world, elements, REPEAT[mib], False))]:
                res[name] = busbw(fn())
            out.write(json.dumps(res) + "\n")
            rows.append(res)
            print(f"ranks {world} {mib:3d} MiB: " + "  ".join(
                f"{k} {res[k]:.2f} GB/s" if res[k] else f"{k} -"
                for k in ("ours", "ours_stream_per_op", "gloo", "mpi_tcp", "mpi_shm")),
                file=sys.stderr, flush=True)
