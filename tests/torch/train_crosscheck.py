#!/usr/bin/env python3
"""TrainStep through a live cluster against PyTorch autograd + SGD (Debian's python3-torch).

For every placement it starts moe-cluster (coordinator, 3 shards, router), runs one TrainStep and
compares grad_input and every weight after the step (read back with SaveCheckpoint) with the same
layer trained in PyTorch (float64): max|ours - torch| <= 1e-4 * max|torch| for grad_input and for
each weight's update. Then it runs 10 more steps and requires SaveCheckpoint to report every
replica bit-identical.

usage: train_crosscheck.py BUILD_DIR WORK_DIR
"""
import os
import subprocess
import sys
import time

import numpy as np
import torch

build, work = sys.argv[1], sys.argv[2]
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
sys.path.insert(0, os.path.join(build, "python"))
sys.path.insert(0, os.path.join(here, "../../client/python"))
import grpc  # noqa: E402
import local_cluster  # noqa: E402
import st  # noqa: E402
from crosscheck import torch_layer  # noqa: E402
from moe.v1 import router_pb2, router_pb2_grpc, tensor_pb2  # noqa: E402

REL = 1e-4
bin_dir = os.path.join(build, "bin")
os.makedirs(work, exist_ok=True)
E, D, F, K, N = 6, 16, 24, 2, 40
LR, AUX, ZC = 0.05, 0.01, 0.001


def tensor(a):
    a = np.ascontiguousarray(a, dtype="<f4")
    return tensor_pb2.Tensor(shape=list(a.shape), dtype=tensor_pb2.FLOAT32, data=a.tobytes())


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = max(np.abs(ref).max(), 1e-30)
    return np.abs(ours - ref).max() / scale


def train_step(stub, request):
    """TrainStep, asked again while the router refuses it with UNAVAILABLE (a shard briefly out
    of rotation or slow to show its replicas on a loaded machine) or aborts it (ABORTED: e.g. the
    coordinator's verdict lost to a connection attempt that timed out under ThreadSanitizer):
    either way the step changed no weight, as moe-client train also assumes when it retries."""
    start = time.monotonic()
    while True:
        try:
            return stub.TrainStep(request, timeout=60)
        except grpc.RpcError as e:
            if (e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
                    or time.monotonic() - start > 30):
                raise
            print(f"TrainStep refused, asking again: {e.details()}")
            time.sleep(0.1)


def run(placement):
    ck = os.path.join(work, f"train_{placement}.safetensors")
    subprocess.run([f"{bin_dir}/moe-client", "init-checkpoint", "--out", ck, "--experts", str(E),
                    "--d-model", str(D), "--d-ff", str(F), "--top-k", str(K), "--activation",
                    "silu", "--gated", "--bias", "--seed", "3"], check=True,
                   stdout=subprocess.DEVNULL)
    cluster, router = local_cluster.start(bin_dir, ck, "--shards", "3", "--placement", placement)
    failures = []
    try:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router))
        rng = np.random.default_rng(17)
        x = rng.uniform(-1, 1, (N, D)).astype(np.float32)
        dy = rng.uniform(-1, 1, (N, D)).astype(np.float32)
        resp = train_step(stub, router_pb2.TrainStepRequest(
            tokens=tensor(x), grad_output=tensor(dy), learning_rate=LR, aux_loss_coef=AUX,
            z_loss_coef=ZC))
        grad_input = np.frombuffer(resp.grad_input.data, "<f4").reshape(N, D)
        saved = os.path.join(work, f"after_{placement}.safetensors")
        sresp = stub.SaveCheckpoint(router_pb2.SaveCheckpointRequest(path=saved), timeout=60)
        before, meta = st.load(ck)
        after, _ = st.load(saved)
        ref = torch_layer(before, meta, {"E": E}, x, dy, AUX, ZC, 0.0)
        errs = {"grad_input": rel(grad_input, ref["grad_input"])}
        for name, g in ref["grads"].items():
            want = before[name].astype(np.float64) - LR * g.numpy()
            errs[name] = rel(after[name] - before[name], want - before[name])
        worst = max(errs, key=errs.get)
        if errs[worst] > REL:
            failures.append(f"{placement}: {worst} relative error {errs[worst]:.3g}")
        if not sresp.replicas_identical:
            failures.append(f"{placement}: replicas differ after one step: {list(sresp.divergent_experts)}")
        for i in range(10):
            xi = rng.uniform(-1, 1, (N, D)).astype(np.float32)
            dyi = rng.uniform(-1, 1, (N, D)).astype(np.float32)
            train_step(stub, router_pb2.TrainStepRequest(tokens=tensor(xi), grad_output=tensor(dyi),
                                                         learning_rate=LR))
        sresp = stub.SaveCheckpoint(router_pb2.SaveCheckpointRequest(path=saved), timeout=60)
        if not sresp.replicas_identical or sresp.step != 11:
            failures.append(f"{placement}: after 11 steps identical={sresp.replicas_identical} "
                            f"step={sresp.step} divergent={list(sresp.divergent_experts)}")
        print(f"{placement:10s} one step: max rel err {errs[worst]:.2e} ({worst}); "
              f"11 steps: replicas identical {sresp.replicas_identical}")
    except grpc.RpcError as e:
        failures.append(f"{placement}: {e.code().name}: {e.details()}")
    finally:
        cluster.terminate()
        # moe-cluster exits non-zero when a service did not stop cleanly (ASan's exit errors too).
        if cluster.wait(timeout=30) != 0:
            failures.append(f"{placement}: moe-cluster exited with {cluster.returncode} on SIGTERM")
    return failures


failures = []
for p in ["replicated", "sharded", "hybrid", "dynamic"]:
    failures += run(p)
for f in failures:
    print("FAIL:", f)
print("TrainStep vs PyTorch:", "all placements match" if not failures else "MISMATCH")
sys.exit(1 if failures else 0)
