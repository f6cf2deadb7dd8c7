#!/usr/bin/env python3
"""Cross-checks the in-process MoeLayer against PyTorch autograd (Debian's python3-torch).

For each variant (gated silu; non-gated relu and gelu; with and without biases; with and without
a capacity limit) it makes a checkpoint with moe-client, runs moe-layer-dump, and compares the
forward output, routing, losses, grad_input and every parameter gradient with the same layer in
PyTorch (float64), requiring max|ours - torch| <= 1e-4 * max|torch| for each tensor.

usage: crosscheck.py BIN_DIR WORK_DIR
"""
import os
import subprocess
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

REL_TOL = 1e-4


def torch_layer(params, meta, cfg, x, dy, aux, zc, cf):
    E, k = cfg["E"], int(meta["top_k"])
    normalize = meta["normalize_topk"] == "true"
    act = {"relu": torch.relu,
           "gelu": lambda t: torch.nn.functional.gelu(t, approximate="none"),
           "silu": torch.nn.functional.silu}[meta["activation"]]
    P = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in params.items()}
    X = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    N = X.shape[0]
    logits = X @ P["gate.weight"].T
    if "gate.bias" in P:
        logits = logits + P["gate.bias"]
    p = torch.softmax(logits, dim=-1)
    # Top-k with ties to the lower expert id: a stable descending sort.
    idx = torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    top_p = torch.gather(p, 1, idx)
    w = top_p / top_p.sum(-1, keepdim=True) if normalize else top_p
    keep = torch.ones(N, k, dtype=torch.bool)
    if cf > 0:
        cap = int(np.ceil(N * k / E * cf))
        used = [0] * E
        for j in range(k):
            for t in range(N):
                e = int(idx[t, j])
                if used[e] < cap:
                    used[e] += 1
                else:
                    keep[t, j] = False
    y = torch.zeros_like(X)
    for e in range(E):
        t_idx, j_idx = torch.where((idx == e) & keep)
        if len(t_idx) == 0:
            continue
        xe = X[t_idx]
        pre = f"experts.{e}."
        h = xe @ P[pre + "w1.weight"].T
        if pre + "w1.bias" in P:
            h = h + P[pre + "w1.bias"]
        a = act(h)
        if pre + "w3.weight" in P:
            h3 = xe @ P[pre + "w3.weight"].T
            if pre + "w3.bias" in P:
                h3 = h3 + P[pre + "w3.bias"]
            a = a * h3
        o = a @ P[pre + "w2.weight"].T
        if pre + "w2.bias" in P:
            o = o + P[pre + "w2.bias"]
        y = y.index_add(0, t_idx, w[t_idx, j_idx].unsqueeze(1) * o)
    counts = torch.bincount(idx.flatten(), minlength=E).to(torch.float64)
    lb = E * torch.sum(counts / (N * k) * p.mean(0))
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    loss = (y * torch.tensor(dy, dtype=torch.float64)).sum() + aux * lb + zc * z
    loss.backward()
    ids = torch.where(keep, idx, torch.full_like(idx, -1))
    weights = torch.where(keep, w, torch.zeros_like(w))
    grads = {n: (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in P.items()}
    return dict(output=y.detach(), ids=ids, weights=weights.detach(), lb=lb.item(), z=z.item(),
                grad_input=X.grad, grads=grads)


def compare(name, ours, ref, failures):
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        failures.append(f"{name}: shape {ours.shape} != {ref.shape}")
        return 0.0
    scale = max(np.max(np.abs(ref)) if ref.size else 0.0, 1e-30)
    err = np.max(np.abs(ours - ref)) / scale if ref.size else 0.0
    if not err <= REL_TOL:
        failures.append(f"{name}: relative error {err:.3g} > {REL_TOL}")
    return err


def run_case(bin_dir, work, name, activation, gated, bias, normalize, cf):
    E, D, F, K, N = 8, 32, 48, 2, 96
    ck = os.path.join(work, f"{name}.safetensors")
    cmd = [os.path.join(bin_dir, "moe-client"), "init-checkpoint", "--out", ck,
           "--experts", str(E), "--d-model", str(D), "--d-ff", str(F), "--top-k", str(K),
           "--activation", activation, "--seed", "5", "--normalize-topk", normalize]
    if gated:
        cmd.append("--gated")
    if bias:
        cmd.append("--bias")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rng = np.random.default_rng(11)
    x = rng.uniform(-1, 1, (N, D)).astype(np.float32)
    dy = rng.uniform(-1, 1, (N, D)).astype(np.float32)
    inp = os.path.join(work, f"{name}.in.safetensors")
    out = os.path.join(work, f"{name}.out.safetensors")
    st.save(inp, {"tokens": x, "grad_output": dy})
    aux, zc = 0.01, 0.001
    subprocess.run([os.path.join(bin_dir, "moe-layer-dump"), ck, inp, out, str(aux), str(zc),
                    str(cf)], check=True)
    params, meta = st.load(ck)
    ours, _ = st.load(out)
    ref = torch_layer(params, meta, {"E": E}, x, dy, aux, zc, cf)
    failures = []
    if not np.array_equal(ours["expert_ids"], ref["ids"].numpy()):
        failures.append("expert_ids differ")
    errs = [compare("output", ours["output"], ref["output"], failures),
            compare("weights", ours["weights"], ref["weights"], failures),
            compare("load_balance_loss", ours["load_balance_loss"], [ref["lb"]], failures),
            compare("router_z_loss", ours["router_z_loss"], [ref["z"]], failures),
            compare("grad_input", ours["grad_input"], ref["grad_input"], failures)]
    for pname, g in ref["grads"].items():
        errs.append(compare("grad " + pname, ours["grad." + pname], g, failures))
    dropped = int((ours["expert_ids"] < 0).sum())
    print(f"{name:28s} tensors {len(errs):3d}  max rel err {max(errs):.2e}  dropped {dropped:3d}  "
          f"{'ok' if not failures else 'FAIL'}")
    for f in failures:
        print("    " + f)
    return not failures


def main():
    bin_dir, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    torch.set_num_threads(1)
    cases = [
        ("gated_silu", "silu", True, False, "true", 0.0),
        ("gated_silu_bias", "silu", True, True, "true", 0.0),
        ("relu", "relu", False, False, "false", 0.0),
        ("relu_bias", "relu", False, True, "true", 0.0),
        ("gelu", "gelu", False, False, "true", 0.0),
        ("gelu_bias", "gelu", False, True, "false", 0.0),
        ("gated_silu_bias_capacity", "silu", True, True, "true", 0.8),
        ("gelu_capacity", "gelu", False, False, "false", 1.0),
    ]
    ok = all([run_case(bin_dir, work, *c) for c in cases])
    print("PyTorch cross-check:", "all variants match" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
