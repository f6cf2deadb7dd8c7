#!/usr/bin/env python3
"""`moe-client train --synthetic` while a shard that holds an expert's only replica is stalled
(SIGSTOP) for 3 s, as when it is killed and restarted: the forward that computes the loss gets
UNAVAILABLE ("expert E has no healthy replica"). Until 2026-12-04 that ended the run (exit 1)
at once, where a step refused the same way was tried again; found by a new user's walk-through.

Checked: train says the forward failed and that it tries again, then takes every step (exit
0, the table's steps 1 and 2). Then the shard is killed, and moe-cluster starts it again with
the checkpoint's weights: the next train names the experts that lost their training.

usage: train_shard_stall_test.py BUILD_DIR WORK_DIR
"""
import os
import re
import signal
import subprocess
import sys
import threading

from cli_harness import Checks, setup, shard_pid, small_checkpoint, start_cluster, stop_cluster

bin_dir, client, work = setup(sys.argv)
checks = Checks()
expect = checks.expect
ck = small_checkpoint(client, work)
cluster, router = start_cluster(bin_dir, ck, work, "--shards", "2", "--placement", "sharded")
try:
    shard = shard_pid(cluster, 1)
    os.kill(shard, signal.SIGSTOP)
    resume = threading.Timer(3.0, os.kill, (shard, signal.SIGCONT))
    resume.start()
    try:
        train = subprocess.run([client, "train", "--router", router, "--synthetic", "--steps",
                                "2", "--batch-size", "16"],
                               capture_output=True, text=True, timeout=90)
    finally:
        resume.join()
        os.kill(shard, signal.SIGCONT)
    said = train.stdout + train.stderr
    expect(train.returncode == 0, f"train exit {train.returncode}:\n{said[-3000:]}")
    expect("step 1 of 2: the forward for the loss failed (" in said,
           f"train did not say the forward failed:\n{said[-3000:]}")
    expect("has no healthy replica" in said, f"train did not say why:\n{said[-3000:]}")
    expect("trying again, attempt 2 (retries stop 20 s after the first attempt)" in said,
           f"train did not say it tries again:\n{said[-3000:]}")
    steps = [line.split()[0] for line in train.stdout.splitlines()
             if re.match(r"^\d+\s+\d", line)]
    expect(steps == ["1", "2"], f"the table's steps: {steps}:\n{train.stdout}")
    # Killed, the shard is started again by moe-cluster with the checkpoint's weights (no
    # --state-dir): the experts it held alone lost their training, and train says which.
    os.kill(shard, signal.SIGKILL)
    again = subprocess.run([client, "train", "--router", router, "--synthetic", "--steps",
                            "1", "--batch-size", "16"],
                           capture_output=True, text=True, timeout=90)
    said = again.stdout + again.stderr
    expect(again.returncode == 0, f"train after the kill: exit {again.returncode}:\n{said[-3000:]}")
    told = re.search(r"^expert\(s\) ([\d,]+) lost their training \(every replica", again.stdout,
                     re.M)
    expect(told is not None, f"train did not say which experts lost their training:\n{said}")
finally:
    stop_cluster(cluster, checks)
checks.finish("train tried the loss's forward again while a shard was stalled, and took every step")
