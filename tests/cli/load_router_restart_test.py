#!/usr/bin/env python3
"""`moe-client load` through a router crash: moe-cluster starts the router again on its port, and
load, whose streams the crash broke, opens them again and goes on loading the new router until
its duration ends, instead of stopping early with every stream gone.

Checked: load exits 0 at about its duration; its table counts the requests cut off by the crash
(at most the streams' windows) as UNAVAILABLE and nothing else as an error, says how many streams
it reopened, and its OK requests include ones the restarted router answered (that router's own
request counter, which starts from zero, shows them). Then the cluster is stopped under a second
load: load ends at its duration, says when the router stopped serving, and exits 1. No service's
stderr holds a sanitizer report.

usage: load_router_restart_test.py BUILD_DIR WORK_DIR
"""
import os
import re
import subprocess
import sys
import time
import urllib.request

from cli_harness import (Checks, codes, local_cluster, router_pid, setup, small_checkpoint,
                         start_cluster, stop_cluster)

bin_dir, client, work = setup(sys.argv)
checks = Checks()
expect = checks.expect


def router_stream_ok(port):
    """The router's count of InferStream requests answered OK (0 when it cannot be read)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0
    m = re.search(r'^moe_router_requests_total\{code="OK",method="InferStream"\} (\S+)$', text,
                  re.M)
    return float(m.group(1)) if m else 0


def wait_until(cond, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


ck = small_checkpoint(client, work)
metrics = local_cluster.free_port_run(4)  # router, 2 shards, coordinator
cluster, router = start_cluster(bin_dir, ck, work, "--shards", "2", "--metrics-port",
                                str(metrics))
try:
    pid = router_pid(cluster)
    duration = 12
    start = time.monotonic()
    load = subprocess.Popen([client, "load", "--router", router, "--duration", str(duration),
                             "--concurrency", "2", "--batch-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expect(wait_until(lambda: router_stream_ok(metrics) > 0, 10),
           "the router answered no request of the load before the crash")
    os.kill(pid, 9)
    back = wait_until(lambda: "the router is back" in open(cluster.log.name).read(), 60)
    expect(back, "moe-cluster did not start the router again:\n" + open(cluster.log.name).read())
    # Load is back on the restarted router (it serves when moe-cluster says so) at once: its
    # probes are new channels each. Probing on the channel of the broken streams, it came back
    # 2-4 s later, that channel's connection attempts hanging in the TCP handshake.
    if back:
        since = time.monotonic()
        resumed = wait_until(lambda: router_stream_ok(metrics) > 0, 1.5)
        expect(resumed, "load was not back on the restarted router 1.5 s after it served (it "
               f"was after {time.monotonic() - since:.1f} s)" if
               wait_until(lambda: router_stream_ok(metrics) > 0, 10) else
               "load did not come back to the restarted router within 10 s")
    out, err = load.communicate(timeout=duration + 60)
    took = time.monotonic() - start
    expect(load.returncode == 0, f"load exit {load.returncode}:\n{out}{err[-2000:]}")
    expect(took < duration + 15, f"load took {took:.1f} s for a {duration} s run")
    # The restarted router's counter started from zero: what it shows, load sent after the crash.
    if back:
        expect(router_stream_ok(metrics) > 0,
               f"the restarted router answered no request of the load:\n{out}")
    reopened = re.search(r"^streams reopened\s+(\d+)$", out, re.M)
    expect(reopened is not None and int(reopened.group(1)) >= 2,
           f"both of load's streams should have been reopened:\n{out}")
    by_code = codes(out)
    expect(by_code.get("OK", 0) > 0, f"no request OK:\n{out}")
    expect(set(by_code) <= {"OK", "UNAVAILABLE"}, f"errors other than UNAVAILABLE:\n{out}")
    # Only what was in flight when the router died fails: each of the 2 streams holds at most
    # its window of 2 requests. A stream reopened before the restarted router served got every
    # request answered UNAVAILABLE ("still loading its placement"), as fast as they came back.
    expect(by_code.get("UNAVAILABLE", 0) <= 4,
           f"more requests failed than the crash cut off:\n{out}")

    # The cluster stopped for good under a load with time left: load waits for the router until
    # its duration ends, then says when the router stopped serving, and exits 1 (it exited 0
    # until 2026-12-06, its tokens/s counting the outage as quiet time).
    duration = 6
    answered_before = router_stream_ok(metrics)
    start = time.monotonic()
    load = subprocess.Popen([client, "load", "--router", router, "--duration", str(duration),
                             "--concurrency", "2", "--batch-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expect(wait_until(lambda: router_stream_ok(metrics) > answered_before, 10),
           "the router answered no request of the second load")
    stopped_at = time.monotonic() - start
    stop_cluster(cluster, checks)
    cluster = None
    out, err = load.communicate(timeout=duration + 60)
    took = time.monotonic() - start
    expect(load.returncode == 1, f"load exit {load.returncode}, not 1:\n{out}{err[-2000:]}")
    expect(took < duration + 5, f"load took {took:.1f} s for a {duration} s run")
    says = re.search(r"^the router stopped serving ([0-9.]+) s into the run and was not serving "
                     r"when the run ended, ([0-9.]+) s in: the figures cover", out, re.M)
    expect(says is not None, f"load did not say the router stopped serving:\n{out}")
    if says:
        expect(float(says.group(1)) <= stopped_at + 2 and float(says.group(2)) >= duration - 0.5,
               f"stopped {stopped_at:.1f} s in, a {duration} s run, but load says:\n{out}")
    expect("moe-client load: the router stopped serving" in err,
           f"load's error line does not say the router stopped serving:\n{err[-2000:]}")
    by_code = codes(out)
    expect(by_code.get("OK", 0) > 0, f"no request OK:\n{out}")
    expect(set(by_code) <= {"OK", "UNAVAILABLE"}, f"errors other than UNAVAILABLE:\n{out}")
finally:
    if cluster is not None:
        stop_cluster(cluster, checks)
checks.finish("load went on through a router restart, and said so when the router stayed away")
