#!/usr/bin/env python3
"""`moe-client load` against a router that stalls (SIGSTOP: a hung host, a process stopped in a
debugger): its streams have no deadline, and until 2026-12-02 load waited for their answers for
good once its duration was over. Now it waits for the answers in flight until none has come for
10 s, then gives them up.

Checked: load exits 0 within its duration plus that wait (and some slack); it says the answers
were given up and asks whether the router is stalled; its table counts them as CANCELLED (at
most the streams' windows) and nothing else as an error.

usage: load_router_stall_test.py BUILD_DIR WORK_DIR
"""
import os
import signal
import subprocess
import sys
import time

from cli_harness import Checks, codes, local_cluster, router_pid, setup, small_checkpoint

bin_dir, client, work = setup(sys.argv)
checks = Checks()
expect = checks.expect
ck = small_checkpoint(client, work)
cluster_log = open(f"{work}/moe-cluster.stderr", "w+")
cluster, router = local_cluster.start(bin_dir, ck, "--shards", "2", stderr=cluster_log)
pid = router_pid(cluster)
try:
    duration = 4
    start = time.monotonic()
    load = subprocess.Popen([client, "load", "--router", router, "--duration", str(duration),
                             "--concurrency", "2", "--batch-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the load runs for a while (its table must show OK requests)
    os.kill(pid, signal.SIGSTOP)
    try:
        out, err = load.communicate(timeout=duration + 40)
    except subprocess.TimeoutExpired:
        load.kill()
        out, err = load.communicate()
        checks.failures.append(f"load still ran {duration + 40} s after it started:\n{out}{err[-2000:]}")
    took = time.monotonic() - start
    if not checks.failures:
        expect(load.returncode == 0, f"load exit {load.returncode}:\n{out}{err[-2000:]}")
        expect(took < duration + 10 + 10, f"load took {took:.1f} s for a {duration} s run")
        expect("given up" in out and "is the router stalled?" in out,
               f"load did not say it gave up the answers in flight:\n{out}")
        by_code = codes(out)
        expect(by_code.get("OK", 0) > 0, f"no request OK:\n{out}")
        expect(set(by_code) <= {"OK", "CANCELLED"}, f"errors other than CANCELLED:\n{out}")
        expect(1 <= by_code.get("CANCELLED", 0) <= 4,
               f"the requests in flight (1 to 4) should be counted CANCELLED:\n{out}")
finally:
    os.kill(pid, signal.SIGCONT)
    cluster.terminate()
    cluster.wait(timeout=30)
    cluster_log.close()
checks.services_clean(cluster_log.name)
checks.finish("load gave up the answers of a stalled router and ended")
