#!/usr/bin/env python3
"""Runs the Python client example against a real local cluster (moe-cluster) and checks its
answers against `moe-client forward --local` on the same tokens, and its errors by status code.

usage: python_client_test.py BUILD_DIR WORK_DIR
"""
import os
import subprocess
import sys

import numpy as np

build, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(build, "python"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../client/python"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../torch"))
import grpc  # noqa: E402
import local_cluster  # noqa: E402
import moe_client  # noqa: E402
import st  # noqa: E402

bin_dir = os.path.join(build, "bin")
os.makedirs(work, exist_ok=True)
ck = os.path.join(work, "py.safetensors")
subprocess.run([f"{bin_dir}/moe-client", "init-checkpoint", "--out", ck, "--experts", "6",
                "--d-model", "24", "--d-ff", "40", "--top-k", "2", "--activation", "gelu",
                "--bias"], check=True, stdout=subprocess.DEVNULL)
cluster, router = local_cluster.start(bin_dir, ck, "--shards", "2", "--placement", "sharded")
failures = []
try:
    stub = moe_client.connect(router)
    info = moe_client.cluster_info(stub)
    if info.num_experts != 6 or info.d_model != 24 or info.placement_strategy != "sharded":
        failures.append(f"cluster info wrong: {info}")
    # The example script itself.
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(moe_client.__file__),
                                                       "moe_client.py"),
                          "--router", router, "--tokens", "5", "--save",
                          os.path.join(work, "py.npz")],
                         env=dict(os.environ, PYTHONPATH=os.path.join(build, "python")),
                         capture_output=True, text=True)
    if out.returncode != 0 or "token 0: expert" not in out.stdout:
        failures.append(f"example failed: {out.stdout} {out.stderr}")
    # A user's mistakes: one line saying what is wrong, no traceback.
    script = os.path.join(os.path.dirname(moe_client.__file__), "moe_client.py")
    for args, says in [(["--tokens", "0"], "--tokens must be >= 1"),
                       (["--tokens", "2", "--save", os.path.join(work, "no-such-dir", "x.npz")],
                        "cannot write"),
                       (["--tokens", "1000000"], "make more than one request carries")]:
        bad = subprocess.run([sys.executable, script, "--router", router, *args],
                             env=dict(os.environ, PYTHONPATH=os.path.join(build, "python")),
                             capture_output=True, text=True)
        if bad.returncode == 0 or says not in bad.stderr or "Traceback" in bad.stderr:
            failures.append(f"moe_client.py {' '.join(args)}: exit {bad.returncode}, "
                            f"stderr {bad.stderr.strip()!r}; expected {says!r}")
    saved = np.load(os.path.join(work, "py.npz"))
    # Same tokens through the in-process layer.
    inp = os.path.join(work, "py_in.safetensors")
    ref = os.path.join(work, "py_ref.safetensors")
    st.save(inp, {"tokens": saved["tokens"]})
    subprocess.run([f"{bin_dir}/moe-client", "forward", "--local", "--checkpoint", ck,
                    "--input", inp, "--output", ref], check=True, stdout=subprocess.DEVNULL)
    expect, _ = st.load(ref)
    err = np.abs(saved["output"] - expect["output"]).max()
    if err > 1e-5:
        failures.append(f"output differs from the in-process layer by {err}")
    if not np.array_equal(saved["expert_ids"], expect["expert_ids"]):
        failures.append("routing differs from the in-process layer")
    # Errors come back as gRPC status codes.
    try:
        moe_client.infer(stub, np.zeros((2, 23), dtype=np.float32))
        failures.append("wrong d_model was accepted")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT or "must be [N, 24]" not in e.details():
            failures.append(f"wrong d_model: {e.code()} {e.details()}")
    bad = np.zeros((2, 24), dtype=np.float32)
    bad[1, 3] = np.nan
    try:
        moe_client.infer(stub, bad)
        failures.append("NaN was accepted")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            failures.append(f"NaN: {e.code()} {e.details()}")
finally:
    cluster.terminate()
    # moe-cluster exits non-zero when a service did not stop cleanly (ASan's exit errors too).
    if cluster.wait(timeout=20) != 0:
        failures.append(f"moe-cluster exited with {cluster.returncode} on SIGTERM")

# A secured router (moe-cluster --tls-dir with mutual TLS, and --auth-token-file): the example
# connects with --tls-ca, --tls-cert, --tls-key and --auth-token-file, and says what is missing
# without the token or with the wrong one.
certs = os.path.join(work, "certs")
subprocess.run(["bash", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                     "../../scripts/make-certs.sh"), certs],
               check=True, stdout=subprocess.DEVNULL)
token_file = os.path.join(certs, "token")
wrong_file = os.path.join(work, "wrong-token")
with open(wrong_file, "w") as f:
    f.write("not-it\n")
cluster, router = local_cluster.start(bin_dir, ck, "--shards", "1", "--tls-dir", certs,
                                      "--require-client-cert", "--auth-token-file", token_file)
try:
    script = os.path.join(os.path.dirname(moe_client.__file__), "moe_client.py")
    env = dict(os.environ, PYTHONPATH=os.path.join(build, "python"))
    run = [sys.executable, script, "--router", router, "--tokens", "3",
           "--tls-ca", os.path.join(certs, "ca.crt"), "--tls-cert",
           os.path.join(certs, "client.crt"), "--tls-key", os.path.join(certs, "client.key")]
    ok = subprocess.run(run + ["--auth-token-file", token_file], env=env, capture_output=True,
                        text=True)
    if ok.returncode != 0 or "token 0: expert" not in ok.stdout:
        failures.append(f"with the token: exit {ok.returncode}: {ok.stdout} {ok.stderr}")
    for extra, says in [([], "UNAUTHENTICATED"),
                        ([], "give the router's token with --auth-token-file F"),
                        (["--auth-token-file", wrong_file],
                         "--auth-token-file does not hold the router's token")]:
        bad = subprocess.run(run + extra, env=env, capture_output=True, text=True)
        if bad.returncode != 1 or says not in bad.stderr or "cannot reach" in bad.stderr:
            failures.append(f"moe_client.py {' '.join(extra)} against a secured router: exit "
                            f"{bad.returncode}, stderr {bad.stderr.strip()!r}; expected {says!r}")
    # The library call, as a program would make it.
    pem = {k: open(os.path.join(certs, f), "rb").read()
           for k, f in [("tls_ca", "ca.crt"), ("tls_cert", "client.crt"), ("tls_key", "client.key")]}
    secret = open(token_file).read().strip()
    y, _, _, _ = moe_client.infer(moe_client.connect(router, token=secret, **pem),
                                  np.zeros((2, 24), dtype=np.float32))
    if y.shape != (2, 24):
        failures.append(f"connect(token=...): output shape {y.shape}")
finally:
    cluster.terminate()
    if cluster.wait(timeout=20) != 0:
        failures.append(f"moe-cluster with TLS exited with {cluster.returncode} on SIGTERM")

for f in failures:
    print("FAIL:", f)
print("python client:", "ok" if not failures else f"{len(failures)} failures")
sys.exit(1 if failures else 0)
