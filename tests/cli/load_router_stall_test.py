#!/usr/bin/env python3
"""`moe-client load` against a router that stalls (SIGSTOP: a hung host, a process stopped in a
debugger): its streams have no deadline, and until 2026-12-02 load waited for their answers for
good once its duration was over. Now it waits for the answers in flight until none has come for
10 s, then gives them up.

Checked: load exits 0 within its duration plus that wait (and some slack); it says the answers
were given up and asks whether the router is stalled; its table counts them as CANCELLED (at
most the streams' windows) and nothing else as an error. Then the same with `--requests` and no
duration, which would wait for good: no answer for `--stall-s` (3 s here, 35 by default) ends
the run, and load says so and exits 1 (a run cut short is no result; it exited 0 until
2026-12-05).

usage: load_router_stall_test.py BUILD_DIR WORK_DIR
"""
import os
import signal
import subprocess
import sys
import time

from cli_harness import (Checks, codes, router_pid, setup, small_checkpoint, start_cluster,
                         stop_cluster)

bin_dir, client, work = setup(sys.argv)
checks = Checks()
expect = checks.expect
ck = small_checkpoint(client, work)
cluster, router = start_cluster(bin_dir, ck, work, "--shards", "2")
pid = router_pid(cluster)


def serving_again():
    """Waits (up to 30 s) until the router lists every shard up again: a stopped router's
    streams to the shards broke meanwhile, and their shards come back with a health check."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = subprocess.run([client, "info", "--router", router], capture_output=True,
                              text=True)
        up = [line for line in info.stdout.splitlines()
              if len(line.split()) >= 3 and line.split()[2] == "up"]
        if info.returncode == 0 and len(up) == 2:
            return
        time.sleep(0.2)
    checks.failures.append(f"the router's shards did not come back up:\n{info.stdout}")


def stalled_run(args, stop_after, limit, says, code):
    """Runs load with `args`, stops the router `stop_after` s in, and checks that load ends
    within `limit` s, exit `code`, saying `says`, its errors the CANCELLED answers in flight
    only."""
    start = time.monotonic()
    load = subprocess.Popen([client, "load", "--router", router, "--concurrency", "2",
                             "--batch-size", "8"] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(stop_after)  # the load runs for a while (its table must show OK requests)
        os.kill(pid, signal.SIGSTOP)
        try:
            out, err = load.communicate(timeout=limit + 10)
        except subprocess.TimeoutExpired:
            load.kill()
            out, err = load.communicate()
            checks.failures.append(f"load {args} still ran {limit + 10} s after it started:\n"
                                   f"{out}{err[-2000:]}")
            return
    finally:
        os.kill(pid, signal.SIGCONT)
        serving_again()
    took = time.monotonic() - start
    expect(load.returncode == code, f"load {args} exit {load.returncode}, not {code}:\n"
           f"{out}{err[-2000:]}")
    if code == 1:
        expect("the run was cut short: the router answered nothing for" in err,
               f"load {args} did not say the run was cut short:\n{err[-2000:]}")
    expect(took < limit, f"load {args} took {took:.1f} s (at most {limit} s expected)")
    for line in says:
        expect(line in out, f"load {args} did not say {line!r}:\n{out}")
    by_code = codes(out)
    expect(by_code.get("OK", 0) > 0, f"no request OK:\n{out}")
    expect(set(by_code) <= {"OK", "CANCELLED"}, f"errors other than CANCELLED:\n{out}")
    expect(1 <= by_code.get("CANCELLED", 0) <= 4,
           f"the requests in flight (1 to 4) should be counted CANCELLED:\n{out}")


try:
    duration = 4
    # The duration, then 10 s without an answer, and slack.
    stalled_run(["--duration", str(duration)], 1.5, duration + 10 + 10,
                ["given up", "is the router stalled?"], 0)
    # Stopped 4.5 s in (past --stall-s 3: the silence counts from the last answer, not from
    # the start), then 3 s without an answer, then 10 s more for the answers in flight.
    stalled_run(["--requests", "1000000", "--stall-s", "3"], 4.5, 4.5 + 3 + 10 + 10,
                ["the router answered nothing for 3 s, so the run ended early", "given up"], 1)
finally:
    stop_cluster(cluster, checks)
checks.finish("load gave up the answers of a stalled router and ended (by --duration and by --stall-s)")
