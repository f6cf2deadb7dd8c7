#!/usr/bin/env python3
"""`make run`'s demo (scripts/run-demo.sh) as a user meets it, after set-up and build: the
cluster comes up, the load runs with a progress bar and ends in its table with every request OK,
the placement table follows, the router's metrics answer on the port the demo names, and Ctrl-C
(SIGINT to the terminal's process group) stops every process and exits 0. A shard killed while
the demo serves is started again by moe-cluster, and the router has all four shards up again.

The load runs 3 s instead of 20 (MOE_DEMO_SECONDS); the ports are free ones found here, and the
demo's files go to WORK_DIR (MOE_RUN_DIR), so the test does not touch build/run.

usage: run_demo_test.py BUILD_DIR WORK_DIR
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

build, work = sys.argv[1], sys.argv[2]
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../..")
os.makedirs(work, exist_ok=True)
sys.path.insert(0, os.path.join(root, "client/python"))
import local_cluster  # noqa: E402
failures = []


def expect(cond, what):
    if not cond:
        failures.append(what)


metrics = local_cluster.free_port_run(6)
env = dict(os.environ, MOE_RUN_DIR=work, MOE_ROUTER_PORT="0", MOE_METRICS_PORT=str(metrics),
           MOE_DEMO_SECONDS="3")
env.pop("MOE_DEMO_EXIT", None)
# A terminal's foreground job: its own process group, which Ctrl-C signals as a whole.
demo = subprocess.Popen(["bash", "scripts/run-demo.sh", build], cwd=root, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        start_new_session=True)
lines = []
reader = threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True)
reader.start()


def wait_for(text, seconds):
    """True once the demo has printed `text` (within `seconds`); False at once when it exited
    without printing it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in "".join(lines):
            return True
        if demo.poll() is not None:
            reader.join(timeout=5)  # what it printed last
            return text in "".join(lines)
        time.sleep(0.1)
    return False


serving = wait_for("press Ctrl-C to stop", 240)
out = "".join(lines)
expect(serving, "the demo never said it keeps serving")
if serving:
    router = re.search(r"cluster ready: router at (\S+)", out)
    expect(router is not None, "no 'cluster ready: router at' line")
    expect("model: 16 experts, d_model 512, d_ff 2048, top-2" in out, "info's model line is missing")
    expect(re.search(r"load \[#+\] 100%", out) is not None, "the load's progress bar never reached 100%")
    requests = re.search(r"^requests +(\d+)$", out, re.M)
    expect(requests is not None and int(requests.group(1)) > 0, "the load table has no requests")
    expect(re.search(r"^errors +0$", out, re.M) is not None, "the load table reports errors")
    expect(re.search(r"^placement hybrid, version \d+", out, re.M) is not None,
           "no placement table")
    # Every expert appears in the placement table: experts 0-7 on every shard (hybrid).
    for e in range(8):
        expect(re.search(rf"^{e} +0,1,2,3 ", out, re.M) is not None,
               f"expert {e} is not on every shard")
    # The router's metrics are where the README says (MOE_METRICS_PORT), counting the load.
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        ok = re.search(r'^moe_router_requests_total\{code="OK",method="InferStream"\} (\S+)$',
                       text, re.M)
        expect(ok is not None and float(ok.group(1)) == int(requests.group(1)),
               f"router metrics count {ok and ok.group(1)} OK InferStream requests, "
               f"the load table {requests and requests.group(1)}")
    except OSError as e:
        failures.append(f"router metrics on port {metrics}: {e}")
    for i in range(4):  # each shard's metrics on the next ports
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics + 1 + i}/metrics", timeout=10).read()
        except OSError as e:
            failures.append(f"shard {i} metrics on port {metrics + 1 + i}: {e}")
    # A shard dies: moe-cluster starts it again and the router takes it back into rotation.
    shard3 = re.search(r"^shard 3 addr=\S+ pid=(\d+)$",
                       open(os.path.join(work, "cluster.out")).read(), re.M)
    expect(shard3 is not None, "moe-cluster's output names no pid for shard 3")
    if shard3:
        os.kill(int(shard3.group(1)), signal.SIGKILL)
        expect(wait_for("moe-cluster: shard 3 (pid " + shard3.group(1) +
                        ") killed by signal", 10), "moe-cluster did not report the killed shard")
        expect(wait_for("moe-cluster: shard 3 is back", 30), "moe-cluster did not restart shard 3")
        up = 0
        for _ in range(100):
            info = subprocess.run([os.path.join(build, "bin", "moe-client"), "info", "--router",
                                   router.group(1)], capture_output=True, text=True).stdout
            up = len(re.findall(r"^\d+\s+127\.0\.0\.1:\d+\s+up\s", info, re.M))
            if up == 4:
                break
            time.sleep(0.2)
        expect(up == 4, f"after the restart, {up} of 4 shards are up")
    # Ctrl-C.
    os.killpg(demo.pid, signal.SIGINT)
try:
    demo.wait(timeout=60)
    reader.join(timeout=10)
    rest = "".join(lines)[len(out):]
    out = "".join(lines)
    expect(demo.returncode == 0, f"the demo exited {demo.returncode} after Ctrl-C")
    expect("moe-cluster: stopped" in rest, "moe-cluster did not say it stopped")
except subprocess.TimeoutExpired:
    failures.append("the demo did not exit within 60 s of Ctrl-C")
# Nothing of the demo is left running: every process it started is in its process group.
left = subprocess.run(["pgrep", "-g", str(demo.pid), "-a"], capture_output=True, text=True).stdout
expect(left.strip() == "", f"processes left after Ctrl-C:\n{left}")
if left.strip():
    os.killpg(demo.pid, signal.SIGKILL)

if failures:
    print(out)
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print(f"make run's demo: served, tables printed, metrics on {metrics}, Ctrl-C stopped everything")
