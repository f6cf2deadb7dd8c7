#!/usr/bin/env python3
"""Two routers sharing a --state-dir, the holder stalled (SIGSTOP) for longer than a lease: the
router standing by takes the placement lease over, trains and keeps its gate, and stops (giving
the lease up). The first router, continued, is granted the lease again under a new epoch.
The second router places `sharded` where the first placed `hybrid`: it unloads the replicas
the first one's table still lists.

Until 2026-12-06 it went on serving the gate it had before its stall, with experts the other
router had trained since (answers neither router would give), and its next training step
found the other router's gate kept under a later epoch, after the step had changed the
shards: the router stopped, and the step's gate was lost. Its table still listed replicas the
other router had unloaded, and the shards refused their rows ("expert E is not loaded on this
shard"). Now it catches up as at a takeover: it reads the kept gate again and applies its
placement again starting from what the shards hold.

Both routers follow the coordinator's membership (no --shards list), and the first one trains
a step before its stall. Checked: once continued, the first router answers as the second one
did before it stopped (the kept gate read again, its placement applied again over what the
shards hold); a training step through it succeeds, is counted after the other's (the steps
since the checkpoint: its own are not counted twice), and it still serves after it (no stop).

With --shard-down, one of the two shards is killed (not started again) before the first
router is continued: its catch-up reads the members, and places over the shard left once the
coordinator lets the other go. Checked: `moe-client train` through it, started as it is
continued, is refused while the router catches up, then takes its step, saying that exactly
the experts the second router had placed on the killed shard alone lost their training (until
2026-12-07 the catch-up read the table's shards, gave up after 10 s, and the router's table
then lost experts that the second router had moved onto the shard left); the log says it caught
up. With --gate-unreadable, the kept gate is made unreadable instead: the catch-up gives the
gate up after 10 s, said in a line, and still places over what the shards hold (until
2026-12-07 it went on from its table, and every request for an expert the second router had
moved failed from then on); train's retries outlast the 10 s (its step is taken 10 s or more
after the continuation). In both, the router still serves after.

usage: router_regrant_test.py BUILD_DIR WORK_DIR [--shard-down | --gate-unreadable]
"""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

from cli_harness import (Checks, router_pid, service_addr, setup, shard_pid, small_checkpoint,
                         start_cluster, stop_cluster)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../torch"))
import st  # noqa: E402

bin_dir, client, work = setup(sys.argv)
mode = sys.argv[3] if len(sys.argv) > 3 else ""
if mode not in ("", "--shard-down", "--gate-unreadable"):
    sys.exit(f"router_regrant_test.py: unknown mode {mode!r}; use --shard-down or "
             "--gate-unreadable, or none")
checks = Checks()
expect = checks.expect
ck = small_checkpoint(client, work)
state = os.path.join(work, "state")
subprocess.run(["rm", "-rf", state], check=True)
cluster, router_a = start_cluster(bin_dir, ck, work, "--shards", "2", "--state-dir", state,
                                  "--no-restart")
coordinator = service_addr(cluster, "coordinator")
tokens = os.path.join(work, "tokens.safetensors")
subprocess.run([client, "make-tokens", "--out", tokens, "--tokens", "16", "--d-model", "64"],
               check=True, stdout=subprocess.DEVNULL)


def run(*args, timeout=90):
    return subprocess.run([client, *args], capture_output=True, text=True, timeout=timeout)


def output_of(router, name):
    """The layer's output for `tokens` through `router` (an array), or None."""
    out = os.path.join(work, f"{name}.safetensors")
    r = run("forward", "--router", router, "--input", tokens, "--output", out)
    if r.returncode != 0:
        return None
    return st.load(out)[0]["output"]


def same(x, y):
    return x is not None and y is not None and x.shape == y.shape and \
        bool(np.all(np.abs(x - y) <= 1e-5))


def serving(router, within):
    by = time.monotonic() + within
    while time.monotonic() < by:
        if run("health", "--addr", router, "--timeout-ms", "500").returncode == 0:
            return True
        time.sleep(0.2)
    return False


def kept_step():
    """The training step of the gate kept in the routers' --state-dir (its metadata)."""
    return st.load(os.path.join(state, "router", "gate.safetensors"))[1].get("train_step")


logs = []


def start_router(name, *args):
    """A moe-router on the cluster's coordinator and --state-dir, following the coordinator's
    membership (no --shards); (process, address)."""
    log = open(os.path.join(work, f"router-{name}.stderr"), "w+")
    logs.append((name, log))
    p = subprocess.Popen([os.path.join(bin_dir, "moe-router"), "--checkpoint", ck,
                          "--coordinator", coordinator, "--state-dir",
                          os.path.join(state, "router"), "--host", "127.0.0.1", "--port", "0",
                          *args], stdout=subprocess.PIPE, stderr=log, text=True)
    m = re.search(r"listening on (\S+)", p.stdout.readline())
    return p, m.group(1) if m else None


def last_step(out):
    """The step count of the last row of train's table (TrainStepResponse.step)."""
    steps = re.findall(r"^\s*(\d+)\s", out, re.M)
    return int(steps[-1]) if steps else None


def train(router, steps):
    r = run("train", "--router", router, "--synthetic", "--steps", str(steps), "--batch-size",
            "16")
    expect(r.returncode == 0, f"train {steps} through {router}: exit {r.returncode}:\n"
           f"{r.stdout}{r.stderr}")
    return last_step(r.stdout)


a = b = None
stopped = False
try:
    # The cluster's own router (a fixed --shards list) gives its lease up to a, which follows the
    # coordinator's membership; b stands by.
    a, router_a = start_router("a")
    os.kill(router_pid(cluster), signal.SIGTERM)
    expect(serving(router_a, 30), "router a did not take over from the cluster's router")
    b, router_b = start_router("b", "--placement", "sharded")
    expect(train(router_a, 1) == 1, "a's first step is not counted 1")
    before = output_of(router_a, "a-before")
    expect(before is not None, "forward through a failed")
    os.kill(a.pid, signal.SIGSTOP)
    stopped = True
    # a's lease (3 s) lapses; b takes it over and serves.
    expect(serving(router_b, 30), "router b did not take over within 30 s of a's stall")
    expect(train(router_b, 2) == 3, "b's steps do not count on from a's")
    trained = output_of(router_b, "b-trained")
    expect(trained is not None and not same(trained, before),
           "b's answers did not change with its training")
    if mode == "--shard-down":
        # The experts b placed on the shard about to be killed alone (the placement table's
        # expert rows list shard indices, its shard rows index and address).
        placement = run("placement", "--router", router_b).stdout
        down = service_addr(cluster, "shard 1")
        index = {address: i for i, address in
                 re.findall(r"^(\d+)\s+(127\.0\.0\.1:\d+)\s", placement, re.M)}.get(down)
        only_there = [e for e, s in re.findall(r"^(\d+)\s+([\d,]+)\s+[\d.]+$", placement, re.M)
                      if s == index]
        expect(len(only_there) > 0, f"b placed no expert on {down} alone:\n{placement}")
    b.send_signal(signal.SIGTERM)  # gives the lease up
    expect(b.wait(timeout=30) == 0, f"router b exited {b.returncode}")
    if mode:
        if mode == "--shard-down":
            os.kill(shard_pid(cluster, 1), signal.SIGKILL)
        else:  # --gate-unreadable: an I/O error's, or a write cut short's, file
            with open(os.path.join(state, "router", "gate.safetensors"), "wb") as f:
                f.write(b"not a safetensors file")
        os.kill(a.pid, signal.SIGCONT)
        stopped = False
        continued = time.monotonic()
        r = run("train", "--router", router_a, "--synthetic", "--steps", "1", "--batch-size",
                "16")
        took = time.monotonic() - continued
        said = r.stdout + r.stderr
        print(f"train through a took {took:.1f} s from a's continuation:\n{said}")
        expect(r.returncode == 0, f"train through a, continued ({mode}): exit {r.returncode} "
               f"after {took:.1f} s:\n{said[-3000:]}")
        # Refused while a catches up: the step ("is reading what the shards hold now"), or the
        # forward for the loss, routed on a's table of before its stall (a shard refuses the rows
        # of an expert b moved off it, or is down).
        expect("trying again, attempt 2 (" in said,
               f"train was not refused while a caught up:\n{said[-3000:]}")
        log_a = open(os.path.join(work, "router-a.stderr")).read()
        if mode == "--shard-down":
            # Read from the shard left once the coordinator let the killed one go (a lease):
            # what b trained there is kept; what b placed on the killed shard alone is lost.
            told = re.search(r"^expert\(s\) ([\d,]+) lost their training", r.stdout, re.M)
            expect(told is not None and told.group(1).split(",") == only_there,
                   f"train should say experts {only_there} lost their training:\n{r.stdout}")
            expect("this router found the shards holding other than its table" in log_a,
                   "router a's log does not say it caught up")
            expect("did not catch up" not in log_a, "router a gave up catching up")
        else:
            expect(took >= 10, f"train's step was taken {took:.1f} s after a was continued, "
                   "before its catch-up could have given up")
            expect("did not catch up with the kept gate within 10s (the gate kept in" in log_a and
                   "cannot be read" in log_a and "it goes on from its gate;" in log_a,
                   "router a's log does not say it gave up reading the kept gate again")
        time.sleep(2)  # a router that stops for another's gate does so right after its step
        expect(run("health", "--addr", router_a, "--timeout-ms", "2000").returncode == 0,
               "router a stopped serving after its catch-up")
    else:
        os.kill(a.pid, signal.SIGCONT)
        stopped = False
        # Granted again, a reads the gate b kept and places again over what the shards hold.
        by = time.monotonic() + 15
        now = output_of(router_a, "a-again")
        while not same(now, trained) and time.monotonic() < by:
            time.sleep(0.3)
            now = output_of(router_a, "a-again")
        expect(same(now, trained), "router a, granted the lease again, does not answer as b, "
               "which trained meanwhile, did (the gate kept since not read again, or its table "
               "not the shards')")
        kept_by_b = kept_step()
        expect(train(router_a, 1) == 4, "a's step after its stall is not counted 4 (1 of a's, 2 "
               "of b's, this one)")
        time.sleep(2)  # a router that stops for another's gate does so right after its step
        expect(run("health", "--addr", router_a, "--timeout-ms", "2000").returncode == 0,
               "router a stopped serving after its training step")
        expect(kept_step() != kept_by_b, f"router a did not keep its step's gate (the kept gate "
               f"is still of step {kept_by_b})")
finally:
    if stopped:
        os.kill(a.pid, signal.SIGCONT)
    for p in (a, b):
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    for name, log in logs:
        log.close()
        print(f"--- router {name}'s stderr ---")
        checks.services_clean(log.name)
    stop_cluster(cluster, checks)
checks.finish("a router granted the lease again after another trained serves and keeps that "
              "router's gate")
