#!/usr/bin/env python3
"""The same MoE layer as layer_bench in PyTorch (Debian's torch): gate, softmax, top-k, the usual
loop over experts with index_add. Prints JSON lines {variant, threads, tokens_per_s}."""
import json
import sys
import time

import torch


def make_layer(E, D, F, gated, seed=1):
    g = torch.Generator().manual_seed(seed)
    def u(*shape, fan_in):
        b = 1.0 / fan_in ** 0.5
        return (torch.rand(*shape, generator=g) * 2 - 1) * b
    layer = {"gate": u(E, D, fan_in=D), "experts": []}
    for _ in range(E):
        ex = {"w1": u(F, D, fan_in=D), "w2": u(D, F, fan_in=F)}
        if gated:
            ex["w3"] = u(F, D, fan_in=D)
        layer["experts"].append(ex)
    return layer


@torch.no_grad()
def forward(layer, x, k, gated):
    logits = x @ layer["gate"].T
    p = torch.softmax(logits, dim=-1)
    top_p, idx = torch.topk(p, k, dim=-1)
    w = top_p / top_p.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    act = torch.nn.functional.silu if gated else torch.relu
    for e, ex in enumerate(layer["experts"]):
        t_idx, j_idx = torch.where(idx == e)
        if len(t_idx) == 0:
            continue
        xe = x[t_idx]
        h = act(xe @ ex["w1"].T)
        if gated:
            h = h * (xe @ ex["w3"].T)
        y.index_add_(0, t_idx, w[t_idx, j_idx].unsqueeze(1) * (h @ ex["w2"].T))
    return y


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    min_time = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    for gated in (False, True):
        layer = make_layer(16, 512, 2048, gated)
        x = torch.rand(n, 512, generator=torch.Generator().manual_seed(3)) * 2 - 1
        for threads in (1, 2):
            torch.set_num_threads(threads)
            forward(layer, x, 2, gated)
            iters, start = 0, time.perf_counter()
            while time.perf_counter() - start < min_time:
                forward(layer, x, 2, gated)
                iters += 1
            dt = (time.perf_counter() - start) / iters
            print(json.dumps({"variant": "gated_silu" if gated else "relu", "threads": threads,
                              "N": n, "tokens_per_s": n / dt, "ms": dt * 1e3}), flush=True)


if __name__ == "__main__":
    main()
