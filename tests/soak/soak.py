#!/usr/bin/env python3
"""Soak test (not in CI): N minutes of load against a local cluster while shards are killed,
stalled, drained and restarted at random and training steps run now and then. Ends with a table:
requests by status code, wrong results (must be 0), hangs (must be 0), failovers, rebalances,
p99 latency, and each service's memory at start and end. Exit status 1 if anything was wrong or
hung.

    /usr/bin/python3 tests/soak/soak.py --minutes 10 [--shards 4] [--placement hybrid]
        [--concurrency 4] [--build build] [--seed 1]

With `--placement hybrid` (the default) the cold experts have one replica, so while their shard is
down, requests that need them fail with UNAVAILABLE naming the expert (as designed; failing fast,
they are many); with `--placement replicated` every expert survives any single shard's loss.
Answers are checked against the in-process layer (`moe-client forward --local`) on a fixed set
of token batches. Training steps use learning rate 0: they run the whole path (forward and
backward on the shards, all-reduce of replicated experts, commit) without changing a weight, so
the reference answers stay valid. A hang is a request that did not end within its deadline
(10 s) plus one second, or ended with DEADLINE_EXCEEDED: the cluster always answers in far less.
"""
import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "../.."))
sys.path.insert(0, os.path.join(REPO, "tests/torch"))
sys.path.insert(0, os.path.join(REPO, "client/python"))
import st  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--minutes", type=float, default=5)
ap.add_argument("--shards", type=int, default=4)
ap.add_argument("--placement", default="hybrid")
ap.add_argument("--concurrency", type=int, default=4)
ap.add_argument("--build", default=os.path.join(REPO, "build"))
ap.add_argument("--seed", type=int, default=1)
args = ap.parse_args()
sys.path.insert(0, os.path.join(args.build, "python"))
import grpc  # noqa: E402
import moe_client  # noqa: E402

BIN = os.path.join(args.build, "bin")
work = tempfile.mkdtemp(prefix="moe-soak-")
rng = random.Random(args.seed)
DEADLINE = 10.0


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def spawn(argv):
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        m = re.search(r"listening on [^ ]*:(\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p, int(m.group(1))
    raise SystemExit(f"soak: {argv[0]} did not start")


# The cluster: coordinator, shards (restartable on their ports), router.
ck = os.path.join(work, "model.safetensors")
subprocess.run([f"{BIN}/moe-client", "init-checkpoint", "--out", ck, "--experts", "8", "--d-model",
                "64", "--d-ff", "128", "--top-k", "2", "--activation", "silu", "--gated",
                "--seed", str(args.seed)], check=True, stdout=subprocess.DEVNULL)
coord, cport = spawn([f"{BIN}/moe-coordinator", "--host", "127.0.0.1", "--port", "0"])
shards, ports = [], []


def start_shard(port):
    return spawn([f"{BIN}/moe-expert-server", "--checkpoint", ck, "--host", "127.0.0.1", "--port",
                  str(port), "--experts", "none", "--coordinator", f"127.0.0.1:{cport}"])


for i in range(args.shards):
    p, port = start_shard(0)
    shards.append(p)
    ports.append(port)
addrs = [f"127.0.0.1:{p}" for p in ports]
router, rport = spawn([f"{BIN}/moe-router", "--checkpoint", ck, "--host", "127.0.0.1", "--port", "0",
                       "--metrics-port", "0", "--shards", ",".join(addrs), "--placement",
                       args.placement, "--coordinator", f"127.0.0.1:{cport}"])
ROUTER = f"127.0.0.1:{rport}"
stub = moe_client.connect(ROUTER)
for _ in range(600):
    try:
        moe_client.infer(stub, np.zeros((1, 64), np.float32), timeout=2)
        break
    except grpc.RpcError:
        time.sleep(0.1)
mem_start = {"coordinator": rss_mib(coord.pid), "router": rss_mib(router.pid)}
mem_start.update({f"shard {i}": rss_mib(p.pid) for i, p in enumerate(shards)})

# Reference answers for a fixed set of batches.
batches = []
for b in range(24):
    n = rng.choice([1, 3, 8, 17, 32, 64])
    x = np.random.default_rng(args.seed * 1000 + b).standard_normal((n, 64)).astype(np.float32)
    inp, out = os.path.join(work, f"in{b}.safetensors"), os.path.join(work, f"ref{b}.safetensors")
    st.save(inp, {"tokens": x})
    subprocess.run([f"{BIN}/moe-client", "forward", "--local", "--checkpoint", ck, "--input", inp,
                    "--output", out], check=True, stdout=subprocess.DEVNULL)
    batches.append((x, st.load(out)[0]["output"]))
log(f"cluster up: router {ROUTER}, {args.shards} shards ({args.placement}); "
    f"{len(batches)} reference batches; {args.minutes} min of load and faults")

codes, latencies, wrong, hangs = {}, [], [0], [0]
last_error = {}
error_seconds = set()  # wall-clock seconds in which some request failed
lock = threading.Lock()
stop = threading.Event()


def client(cid):
    s = moe_client.connect(ROUTER)
    r = random.Random(cid)
    while not stop.is_set():
        x, ref = batches[r.randrange(len(batches))]
        t = time.time()
        try:
            y, _, _, _ = moe_client.infer(s, x, request_id=f"soak{cid}", timeout=DEADLINE)
            code = "OK"
            bad = not np.all(np.abs(y - ref) <= 1e-5 * (1 + np.abs(ref)))
        except grpc.RpcError as e:
            code, bad = e.code().name, False
            last_error[code] = e.details()
            error_seconds.add(int(time.time()))
        el = time.time() - t
        with lock:
            codes[code] = codes.get(code, 0) + 1
            latencies.append(el)
            wrong[0] += bad
            hangs[0] += code == "DEADLINE_EXCEEDED" or el > DEADLINE + 1


threads = [threading.Thread(target=client, args=(c,)) for c in range(args.concurrency)]
for t in threads:
    t.start()

actions = {"kill": 0, "stall": 0, "drain+restart": 0, "train ok": 0, "train refused": 0, "rebalance": 0}


def restart(i):
    shards[i], _ = start_shard(ports[i])


end = time.time() + args.minutes * 60
last_report = time.time()
total_before = errs_before = 0
while time.time() < end:
    time.sleep(rng.uniform(2, 5))
    i = rng.randrange(args.shards)
    what = rng.choice(["kill", "stall", "drain", "train", "train", "rebalance"])
    if what == "kill":
        shards[i].kill()
        shards[i].wait()
        time.sleep(rng.uniform(1, 3))
        restart(i)
        actions["kill"] += 1
    elif what == "stall":
        shards[i].send_signal(signal.SIGSTOP)
        time.sleep(rng.uniform(1, 3))
        shards[i].send_signal(signal.SIGCONT)
        actions["stall"] += 1
    elif what == "drain":
        subprocess.run([f"{BIN}/moe-client", "drain", "--addr", addrs[i], "--timeout-ms", "5000"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shards[i].send_signal(signal.SIGTERM)
        shards[i].wait()
        restart(i)
        actions["drain+restart"] += 1
    elif what == "train":
        r = subprocess.run([f"{BIN}/moe-client", "train", "--router", ROUTER, "--synthetic",
                            "--batch-size", "16", "--steps", "1", "--learning-rate", "0"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        actions["train ok" if r.returncode == 0 else "train refused"] += 1
    else:
        # Back and forth between the chosen strategy and `replicated` (a placement change under
        # load and faults), never to one with fewer replicas than asked for.
        strategy = rng.choice(["replicated", args.placement])
        subprocess.run([f"{BIN}/moe-client", "placement", "--router", ROUTER, "--rebalance", strategy],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        actions["rebalance"] += 1
    with lock:
        total_now, errs_now = sum(codes.values()), sum(codes.values()) - codes.get("OK", 0)
    if os.environ.get("SOAK_VERBOSE"):
        log(f"{what} shard {i}: {errs_now - errs_before} errors of {total_now - total_before} since the last action")
        if errs_now - errs_before > (total_now - total_before) / 2:
            log(f"  last errors: {last_error}")
            log(subprocess.run([f"{BIN}/moe-client", "info", "--router", ROUTER], capture_output=True, text=True).stdout)
    total_before, errs_before = total_now, errs_now
    if time.time() - last_report > 10:
        last_report = time.time()
        with lock:
            total = sum(codes.values())
            errs = total - codes.get("OK", 0)
        left = max(0, end - time.time())
        log(f"{total} requests, {errs} errors, {wrong[0]} wrong, {hangs[0]} hangs; "
            f"actions {sum(actions.values())}; {left:.0f} s left")

stop.set()
for t in threads:
    t.join()
time.sleep(1)
mem_end = {"coordinator": rss_mib(coord.pid), "router": rss_mib(router.pid)}
mem_end.update({f"shard {i}": rss_mib(p.pid) for i, p in enumerate(shards)})
metrics_port = None
try:
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if f"pid={router.pid}," in line and f":{rport} " not in line:
            metrics_port = int(line.split()[3].rsplit(":", 1)[1])
except (OSError, ValueError, IndexError):
    pass
failovers = rebalances = "?"
if metrics_port:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith("moe_router_failovers_total"):
            failovers = int(float(line.split()[-1]))
        if line.startswith("moe_router_rebalances_total"):
            rebalances = int(float(line.split()[-1]))

for p in [router] + shards + [coord]:
    p.send_signal(signal.SIGTERM)
for p in [router] + shards + [coord]:
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()

lat = sorted(latencies)
p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else 0
rows = [("requests", sum(codes.values()))] + [(f"  {c}", n) for c, n in sorted(codes.items())]
rows += [("seconds with a failed request", f"{len(error_seconds)} of {args.minutes * 60:.0f}"),
         ("wrong results (must be 0)", wrong[0]), ("hangs (must be 0)", hangs[0]),
         ("failovers", failovers), ("rebalances", rebalances), ("p99 latency (ms)", f"{p99:.1f}")]
rows += [(f"action: {a}", n) for a, n in actions.items()]
rows += [(f"memory MiB {k} (start -> end)", f"{mem_start[k]:.0f} -> {mem_end[k]:.0f}") for k in mem_start]
w = max(len(r[0]) for r in rows)
print()
for k, v in rows:
    print(f"{k.ljust(w)}  {v}")
print("\n(a restarted shard's memory is its new process's)")
sys.exit(1 if wrong[0] or hangs[0] else 0)
