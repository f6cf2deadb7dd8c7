#!/usr/bin/env python3
"""Turns one run's benchmark outputs into docs/PERFORMANCE.md (tables of ratios) and a JSON."""
import json
import os
import platform
import re
import subprocess
import sys


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.*)", out).group(1).strip()
    except Exception:  # noqa: BLE001
        model = platform.processor()
    return f"{model}, {os.cpu_count()} vCPUs, {platform.system()} {platform.release()}"


def main():
    src, md_path, json_path = sys.argv[1:4]
    ffn = json.load(open(os.path.join(src, "ffn.json")))
    layer = json.load(open(os.path.join(src, "layer.json")))
    torch_rows = [json.loads(l) for l in open(os.path.join(src, "torch.jsonl")) if l.strip()]
    peak = None
    ffn_rows = []
    for b in ffn["benchmarks"]:
        m = re.match(r"ExpertForward/(\w+)/(\d+)", b["name"])
        peak = b["peak_GFLOPs"]
        ffn_rows.append({"variant": m.group(1), "M": int(m.group(2)), "gflops": b["GFLOPs"],
                         "of_peak": b["GFLOPs"] / b["peak_GFLOPs"]})
    layer_rows = []
    torch_by = {(r["variant"], r["threads"]): r["tokens_per_s"] for r in torch_rows}
    for b in layer["benchmarks"]:
        m = re.match(r"BM_LayerForward/(\w+)/N:(\d+)/threads:(\d+)", b["name"])
        v, n, t = m.group(1), int(m.group(2)), int(m.group(3))
        ours = b["tokens_per_s"]
        ref = torch_by.get((v, t))
        best_torch = max(torch_by.get((v, 1), 0), torch_by.get((v, 2), 0))
        layer_rows.append({"variant": v, "N": n, "threads": t, "tokens_per_s": ours,
                           "torch_tokens_per_s": ref, "ratio": ours / ref if ref else None,
                           "ratio_vs_best_torch": ours / best_torch if best_torch else None})
    machine = cpu_name()
    result = {"machine": machine, "fma_peak_gflops_1thread": peak, "expert_ffn": ffn_rows,
              "layer_vs_torch": layer_rows}
    os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
    json.dump(result, open(json_path, "w"), indent=2)
    lines = ["# Performance", "",
             "Written by `make bench` (bench/run_all.sh) from the numbers of one run; every ratio",
             "compares two measurements taken in that run on the same machine.", "",
             f"Machine: {machine}", "",
             "## Expert FFN forward against this machine's FP32 FMA peak", "",
             f"d_model 512, d_ff 2048, 1 thread. Peak measured in the run: {peak:.1f} GFLOP/s.", "",
             "| variant | M | GFLOP/s | of peak |", "|---|---:|---:|---:|"]
    for r in ffn_rows:
        lines.append(f"| {r['variant']} | {r['M']} | {r['gflops']:.1f} | {r['of_peak']:.2f} |")
    lines += ["", "## In-process layer against PyTorch", "",
              "16 experts, d_model 512, d_ff 2048, top-2, N tokens per batch. PyTorch: Debian's torch,",
              "the usual loop over experts with index_add (bench/torch_layer.py).", "",
              "| variant | N | threads | ours tokens/s | PyTorch tokens/s | ratio | vs PyTorch's best thread count |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in layer_rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        best = f"{r['ratio_vs_best_torch']:.2f}x" if r["ratio_vs_best_torch"] else "-"
        torch_tps = f"{r['torch_tokens_per_s']:.0f}" if r["torch_tokens_per_s"] else "-"
        lines.append(f"| {r['variant']} | {r['N']} | {r['threads']} | {r['tokens_per_s']:.0f} | "
                     f"{torch_tps} | {ratio} | {best} |")
    open(md_path, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
