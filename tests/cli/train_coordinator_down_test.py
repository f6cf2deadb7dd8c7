#!/usr/bin/env python3
"""`moe-client info` and `train` while the coordinator is down (killed, not started again):
until 2026-12-05 info did not show it, and train spent 47 s over 8 attempts, each waiting 5 s
on the router for a connection, before it said so; found by a new user's walk-through.

Checked: a step is taken while the coordinator runs, and info says "connected"; once it is
stopped (SIGSTOP: a hung process, whose connection the kernel still accepts), info says
UNREACHABLE within 10 s, as the keepalive closes the connection and no new one gets gRPC's
SETTINGS frame, and train exits 1 within 5 s having sent no step; continued, info says
"connected" again within 10 s; once it is killed, info says UNREACHABLE within 10 s, and
train then exits 1 within 5 s, naming the coordinator, having sent no step.

usage: train_coordinator_down_test.py BUILD_DIR WORK_DIR
"""
import os
import signal
import subprocess
import sys
import time

from cli_harness import Checks, service_pid, setup, small_checkpoint, start_cluster, stop_cluster

bin_dir, client, work = setup(sys.argv)
checks = Checks()
expect = checks.expect
ck = small_checkpoint(client, work)
cluster, router = start_cluster(bin_dir, ck, work, "--shards", "2", "--no-restart")


def run(*args, timeout=90):
    return subprocess.run([client, *args], capture_output=True, text=True, timeout=timeout)


try:
    coordinator = service_pid(cluster, "coordinator")
    first = run("train", "--router", router, "--synthetic", "--steps", "1", "--batch-size", "8")
    expect(first.returncode == 0, f"train with the coordinator up: exit {first.returncode}:\n"
           f"{first.stdout}{first.stderr}")
    info = run("info", "--router", router).stdout
    expect(", connected\n" in info, f"info with the coordinator up:\n{info}")

    def unreachable_then_refused(how):
        info = run("info", "--router", router).stdout
        by = time.monotonic() + 10
        while "UNREACHABLE" not in info and time.monotonic() < by:
            time.sleep(0.1)
            info = run("info", "--router", router).stdout
        expect("training: coordinator 127.0.0.1:" in info and
               "is UNREACHABLE from the router" in info,
               f"info 10 s after the coordinator was {how}:\n{info}")
        started = time.monotonic()
        train = run("train", "--router", router, "--synthetic", "--steps", "1",
                    "--batch-size", "8")
        took = time.monotonic() - started
        expect(train.returncode == 1,
               f"train with the coordinator {how}: exit {train.returncode}")
        expect(f"router {router} cannot reach coordinator 127.0.0.1:" in train.stderr and
               "no step was sent" in train.stderr,
               f"train with the coordinator {how} said:\n{train.stdout}{train.stderr}")
        expect(took < 5, f"train took {took:.1f} s to say the coordinator is {how}")

    os.kill(coordinator, signal.SIGSTOP)
    try:
        unreachable_then_refused("stopped")
    finally:
        os.kill(coordinator, signal.SIGCONT)
    info = run("info", "--router", router).stdout
    by = time.monotonic() + 10
    while ", connected\n" not in info and time.monotonic() < by:
        time.sleep(0.1)
        info = run("info", "--router", router).stdout
    expect(", connected\n" in info, f"info 10 s after the coordinator was continued:\n{info}")
    os.kill(coordinator, signal.SIGKILL)
    unreachable_then_refused("killed")
finally:
    stop_cluster(cluster, checks)
checks.finish("info showed the coordinator stopped, then down, and train said so at once")
