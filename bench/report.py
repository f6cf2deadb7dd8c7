#!/usr/bin/env python3
"""Turns one run's benchmark outputs into docs/PERFORMANCE.md (tables of ratios) and a JSON."""
import json
import os
import platform
import re
import statistics
import subprocess
import sys


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.*)", out).group(1).strip()
    except Exception:  # noqa: BLE001
        model = platform.processor()
    return f"{model}, {os.cpu_count()} vCPUs, {platform.system()} {platform.release()}"


def plot_cluster(cluster, path):
    """tokens/s against tokens per request, cluster beside in-process; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = cluster["throughput"]
    n = [r["N"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(n, [r["in_process_tokens_per_s"] for r in rows], "o-", label="in-process layer")
    ax.plot(n, [r["cluster_tokens_per_s"] for r in rows], "s-",
            label=f"cluster (router + {cluster['shards']} shards)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per request")
    ax.set_ylabel("tokens/s")
    ax.set_title("MoE layer throughput (16 experts, d_model 512, top-2)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def medians(benchmarks):
    """Google Benchmark's runs, keeping only the median where repetitions were aggregated."""
    return [b for b in benchmarks
            if b.get("run_type") != "aggregate" or b.get("aggregate_name") == "median"]


def main():
    src, md_path, json_path = sys.argv[1:4]
    ffn = json.load(open(os.path.join(src, "ffn.json")))
    layer_runs, torch_runs = [], []  # alternating pairs of runs (bench/run_all.sh)
    for pair in range(1, 100):
        lp, tp = (os.path.join(src, f"layer_{pair}.json"), os.path.join(src, f"torch_{pair}.jsonl"))
        if not (os.path.exists(lp) and os.path.exists(tp)):
            break
        layer_runs.append(json.load(open(lp)))
        torch_runs.append([json.loads(l) for l in open(tp) if l.strip()])
    ffn_rows = []
    for b in medians(ffn["benchmarks"]):
        m = re.match(r"ExpertForward/(\w+)/(\d+)", b["name"])
        ffn_rows.append({"variant": m.group(1), "M": int(m.group(2)), "gflops": b["GFLOPs"],
                         "of_peak": b["of_peak"], "peak_gflops": b["peak_GFLOPs"]})
    peak = statistics.median(r["peak_gflops"] for r in ffn_rows) if ffn_rows else None
    # Per (variant, N, threads): each side's median over the pairs, and the median of the pairs'
    # ratios (against PyTorch at the same thread count, and at its better one).
    pairs = {}
    for layer, torch_rows in zip(layer_runs, torch_runs):
        torch_by = {(r["variant"], r["threads"]): r["tokens_per_s"] for r in torch_rows}
        for b in layer["benchmarks"]:
            m = re.match(r"BM_LayerForward/(\w+)/N:(\d+)/threads:(\d+)", b["name"])
            v, n, t = m.group(1), int(m.group(2)), int(m.group(3))
            best = max(torch_by.get((v, 1), 0), torch_by.get((v, 2), 0))
            pairs.setdefault((v, n, t), []).append((b["tokens_per_s"], torch_by.get((v, t)), best))
    layer_rows = []
    for (v, n, t), runs in pairs.items():
        ours = statistics.median(r[0] for r in runs)
        refs = [r[1] for r in runs if r[1]]
        ratios = [r[0] / r[1] for r in runs if r[1]]
        best_ratios = [r[0] / r[2] for r in runs if r[2]]
        layer_rows.append({"variant": v, "N": n, "threads": t, "tokens_per_s": ours,
                           "torch_tokens_per_s": statistics.median(refs) if refs else None,
                           "ratio": statistics.median(ratios) if ratios else None,
                           "ratio_vs_best_torch":
                               statistics.median(best_ratios) if best_ratios else None,
                           "pair_ratios": ratios, "pairs": len(runs)})
    shard = json.load(open(os.path.join(src, "shard.json")))
    shard_rows = {}
    for b in medians(shard["benchmarks"]):
        m = re.match(r"BM_(\w+)/rows:(\d+)", b["name"])
        shard_rows.setdefault(int(m.group(2)), {})[m.group(1)] = b["rows_per_s"]
    shard_table = [{"rows": r, "in_process_rows_per_s": v["InProcess"], "shard_rows_per_s": v["Shard"],
                    "ratio": v["Shard"] / v["InProcess"]} for r, v in sorted(shard_rows.items())]
    cluster = json.load(open(os.path.join(src, "cluster.json")))
    cluster["grpc_floor"] = json.load(open(os.path.join(src, "grpc_floor.json")))
    allreduce = [json.loads(l) for l in open(os.path.join(src, "allreduce.jsonl")) if l.strip()]
    placement = [json.loads(l) for l in open(os.path.join(src, "placement.jsonl")) if l.strip()]
    machine = cpu_name()
    result = {"machine": machine, "fma_peak_gflops_1thread": peak, "expert_ffn": ffn_rows,
              "layer_vs_torch": layer_rows, "shard_vs_kernel": shard_table, "cluster": cluster,
              "allreduce": allreduce, "placement_under_skew": placement}
    os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
    json.dump(result, open(json_path, "w"), indent=2)
    lines = ["# Performance", "",
             "Written by `make bench` (bench/run_all.sh) from the numbers of one run; every ratio",
             "compares two measurements taken in that run on the same machine.", "",
             f"Machine: {machine}", "",
             "## Expert FFN forward against this machine's FP32 FMA peak", "",
             "d_model 512, d_ff 2048, 1 thread. The peak is measured for 0.1 s just before each "
             "run of the FFN, and each row is the median of 3 runs (this VM's speed drifts "
             "within a minute); \"of peak\" is the median of the runs' ratios. The peaks' median: "
             + (f"{peak:.1f} GFLOP/s." if peak else "none measured."), "",
             "| variant | M | GFLOP/s | peak GFLOP/s | of peak |", "|---|---:|---:|---:|---:|"]
    for r in ffn_rows:
        lines.append(f"| {r['variant']} | {r['M']} | {r['gflops']:.1f} | {r['peak_gflops']:.1f} | "
                     f"{r['of_peak']:.2f} |")
    lines += ["", "## In-process layer against PyTorch", "",
              "16 experts, d_model 512, d_ff 2048, top-2, N tokens per batch. PyTorch: Debian's torch,",
              "the usual loop over experts with index_add (bench/torch_layer.py). Ours and PyTorch",
              f"ran in {max((r['pairs'] for r in layer_rows), default=0)} alternating pairs: "
              "tokens/s are each side's median, ratios the median",
              "of the pairs' ratios (the pairs' ratios in the last column).", "",
              "| variant | N | threads | ours tokens/s | PyTorch tokens/s | ratio | vs PyTorch's best thread count | pairs |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in layer_rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        best = f"{r['ratio_vs_best_torch']:.2f}x" if r["ratio_vs_best_torch"] else "-"
        torch_tps = f"{r['torch_tokens_per_s']:.0f}" if r["torch_tokens_per_s"] else "-"
        each = ", ".join(f"{x:.2f}" for x in r["pair_ratios"])
        lines.append(f"| {r['variant']} | {r['N']} | {r['threads']} | {r['tokens_per_s']:.0f} | "
                     f"{torch_tps} | {ratio} | {best} | {each} |")
    lines += ["", "## One shard on loopback against the in-process kernel", "",
              "One expert (d_model 512, d_ff 2048, gated SiLU), 1 compute thread both ways; the",
              "client keeps 8 batches in flight on one Dispatch stream, so the shard coalesces",
              "small batches into one matmul (dynamic batching) where the kernel runs them singly.",
              "Each figure is the median of 3 runs, the runs of both sides interleaved in a random order.", "",
              "| rows per batch | in-process rows/s | shard rows/s | ratio |", "|---:|---:|---:|---:|"]
    for r in shard_table:
        lines.append(f"| {r['rows']} | {r['in_process_rows_per_s']:.0f} | {r['shard_rows_per_s']:.0f} | "
                     f"{r['ratio']:.2f} |")
    lat = cluster["latency_n1"]
    lines += ["", "## The cluster against the in-process layer", "",
              f"Router + {cluster['shards']} shards ({cluster['shard_threads']} compute thread each) "
              f"on loopback, against the in-process layer with {cluster['in_process_threads']} "
              "OpenMP threads, on the same machine (all processes share its cores). 16 experts, "
              "d_model 512, d_ff 2048, top-2, hybrid placement. The cluster keeps a window of "
              "requests in flight on one InferStream (16 below N = 256, 4 from it) and is timed in "
              "steady state. Measured in "
              f"{cluster.get('rounds', 1)} rounds, each timing the in-process layer and the cluster "
              "back to back at every N (this VM's speed drifts by 10-20 % within a minute): "
              "tokens/s are the medians of the rounds, the ratio the median of the rounds' ratios.", "",
              "| N tokens per request | in-process tokens/s | cluster tokens/s | ratio | ratio by round |",
              "|---:|---:|---:|---:|---|"]
    for r in cluster["throughput"]:
        each = ", ".join(f"{x:.2f}" for x in r.get("round_ratios", []))
        lines.append(f"| {r['N']} | {r['in_process_tokens_per_s']:.0f} | "
                     f"{r['cluster_tokens_per_s']:.0f} | {r['ratio']:.2f} | {each} |")
    lines += ["", f"Latency at N = 1 (p50): cluster {lat['cluster_p50_s'] * 1e3:.3f} ms, in-process "
              f"{lat['in_process_p50_s'] * 1e3:.3f} ms, bare gRPC unary round trip to the router "
              f"{lat['bare_rtt_p50_s'] * 1e6:.0f} us: the cluster adds "
              f"**{lat['added_in_round_trips']:.1f} round trips**."]
    gaps = lat.get("expert_forward_1row_by_gap", [])
    if gaps:
        each = ", ".join(f"{g['p50_s'] * 1e6:.0f} us "
                         + ("back to back" if g["gap_us"] == 0 else
                            f"{g['gap_us'] / 1000:g} ms after the previous") for g in gaps)
        # Said only where the run shows it: on some machines the weights stay in cache.
        slowest = max(g["p50_s"] for g in gaps) / gaps[0]["p50_s"]
        why = ("its 12 MiB of weights fall out of this VM's last-level cache (shared with the "
               "host's other tenants) within milliseconds" if slowest >= 1.25 else
               f"at most {slowest:.2f}x slower after a pause: on this machine the weights mostly "
               "stay in cache between requests, and one row is bound by reading them")
        lines += ["", "One expert's forward of one row (1 thread, p50, measured in the same run) "
                  f"takes {each}: {why}. In the cluster a "
                  "shard computes its expert once per request, about every "
                  f"{lat['cluster_p50_s'] * 1e3:.1f} ms and beside the other processes, while the "
                  "in-process layer runs its two experts back to back."]
    parts = []
    varied, tiny = lat.get("varied_tokens"), lat.get("negligible_compute")
    if varied:
        parts.append(f"| a new token per request (experts vary, as in serving) | "
                     f"{varied['cluster_p50_s'] * 1e3:.3f} | {varied['in_process_p50_s'] * 1e3:.3f} | "
                     f"{lat['bare_rtt_p50_s'] * 1e6:.0f} | {varied['added_in_round_trips']:.1f} |")
    if tiny:
        parts.append(f"| one token, d_ff {tiny['d_ff']}: experts cost next to nothing | "
                     f"{tiny['cluster_p50_s'] * 1e3:.3f} | {tiny['in_process_p50_s'] * 1e3:.3f} | "
                     f"{tiny['bare_rtt_p50_s'] * 1e6:.0f} | {tiny['added_in_round_trips']:.1f} |")
    if parts:
        lines += ["", "The same N = 1 latency three ways, to tell its parts apart (p50, one request "
                  "at a time):", "",
                  "| requests | cluster ms | in-process ms | round trip us | added round trips |",
                  "|---|---:|---:|---:|---:|",
                  f"| one token repeated (the figure above) | {lat['cluster_p50_s'] * 1e3:.3f} | "
                  f"{lat['in_process_p50_s'] * 1e3:.3f} | {lat['bare_rtt_p50_s'] * 1e6:.0f} | "
                  f"{lat['added_in_round_trips']:.1f} |"] + parts
        if tiny:
            lines += ["", "With experts that cost nothing the cluster still adds "
                      f"{tiny['cluster_p50_s'] * 1e6 - tiny['in_process_p50_s'] * 1e6:.0f} us: "
                      "its own path, on two cores that the five processes share. The experts' "
                      "compute adds the rest: at 1 row an expert reads its 12 MiB of weights, which "
                      "takes longer in a shard, where they have gone cold since the last request, "
                      "than in the in-process layer's back-to-back loop."]
    floor = cluster.get("grpc_floor")
    if floor:
        cb, asy = floor["callback"], floor["async"]
        lines += ["", "What gRPC alone costs for a request of this shape (bench/grpc_floor, same "
                  "run): a client sends one 512-wide token to a relay process, which sends it on "
                  "a long-lived stream to each of two backend processes; they echo it and the "
                  "relay answers. No gating, no compute, no combine; the cluster's channel "
                  "settings. p50 in bare unary round trips to the same relay, median of 3 "
                  "alternating runs:", "",
                  "| relay and backends on | bare round trip us | relayed request us | round trips |",
                  "|---|---:|---:|---:|",
                  f"| gRPC's callback API (as the router and shards) | {cb['bare_rtt_p50_s'] * 1e6:.0f} | "
                  f"{cb['two_hop_p50_s'] * 1e6:.0f} | {cb['in_round_trips']:.2f} |",
                  f"| async completion queues, one thread polling and handling each process's events "
                  f"| {asy['bare_rtt_p50_s'] * 1e6:.0f} | {asy['two_hop_p50_s'] * 1e6:.0f} | "
                  f"{asy['in_round_trips']:.2f} |", "",
                  "This is the floor under the N = 1 figure: a cluster request is at least this "
                  f"relayed request ({cb['in_round_trips']:.1f} round trips for the callback API) "
                  f"plus the experts' compute, so {floor_verdict(cb, asy)}"]
    lines += ["", "## Ring all-reduce against Gloo and Open MPI", "",
              "Bus bandwidth 2 (N-1)/N * bytes / time in GB/s, ranks as processes on this machine.",
              "Ours: the gRPC ring (moe-ring-rank), back-to-back collectives on one stream per",
              "link after 32 MiB of warm-up collectives crossed each link, as Gloo is measured",
              "(its ring all-reduce over TCP, every connection warmed with one 32 MiB message",
              "first); \"new stream\": a stream opened per collective, unwarmed, as a",
              "training step does. Open MPI: MPI_Allreduce over loopback TCP, and over shared",
              "memory (the upper bound). Ours and Gloo run in 3 alternating pairs: each column",
              "is the median of its 3 runs, and ours / Gloo the median of the 3 pairs' ratios",
              "(this VM's speed drifts between runs; the others are single runs).", "",
              "| ranks | MiB | ours | ours, new stream | Gloo | ours / Gloo | MPI TCP | MPI shm |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v: f"{v:.2f}" if v else "-"
    for r in allreduce:
        ratio = (f"{r['ours_vs_gloo']:.2f}" if r.get("ours_vs_gloo") else
                 f"{r['ours'] / r['gloo']:.2f}" if r.get("ours") and r.get("gloo") else "-")
        lines.append(f"| {r['ranks']} | {r['MiB']} | {fmt(r.get('ours'))} | "
                     f"{fmt(r.get('ours_stream_per_op'))} | {fmt(r.get('gloo'))} | "
                     f"{ratio} | {fmt(r.get('mpi_tcp'))} | {fmt(r.get('mpi_shm'))} |")
    lines += ["", "## Hybrid against dynamic placement under Zipf(1.2) load", "",
              placement_limit_text(placement),
              "`moe-client load` with",
              "4 streams of 64 or 256 tokens and expert popularity Zipf(1.2); measured after a warm-up in",
              "which dynamic placement sees the skew and rebalances (`dynamic` with its default slot",
              "budget, ceil(5E/4S) = 5 experts a shard, half the memory of `hybrid`'s 10). The two",
              f"clusters are up at once and each of {len(placement[0].get('round_tokens_per_s', [])) if placement else 0} "
              "rounds loads one and then the other, so that the figures of a",
              "round see the same machine (this VM's speed drifts by 10-20 % within a minute);",
              "tokens/s and p99 are the medians of the rounds, a ratio the median of the rounds'",
              "ratios. Three popularity orders:",
              "by expert id (expert 0 the most popular), the hot experts are exactly the ones",
              "`hybrid` replicates everywhere, its best case; shuffled (`--hot-order 7`), an",
              "arbitrary order (here the hottest expert, 10, is one `hybrid` keeps on one shard),",
              "the case a user meets, whose model's hot experts are not known in advance;",
              "reversed (`--hot-order -1`), the hot experts are the ones `hybrid` does not",
              "replicate, its worst case. Both of a token's experts are drawn from the Zipf law",
              "(without replacement), so the hottest expert gets 31 % of the assignments, the next",
              "16 %. Each expert a shard computes for a batch costs a read of its 12 MiB of",
              "weights, whatever its rows. At 64 tokens a request that read is most of a shard's",
              "time for an expert, so a shard's time follows the experts it is sent more than",
              "their rows, and `hybrid` evens its shards out by sending its replicated experts",
              "away from the one that holds the hot expert. At 256 tokens the hot expert's rows",
              "(about 160 a request) are most of its shard's time, more than a quarter of the",
              "cluster's, and only more replicas of it spread them: that is where `dynamic` gains.", ""]
    ceiling = any("ceiling_tokens_per_s" in r for r in placement)
    if ceiling:
        cpus = next(r["shards_cpus"] for r in placement if "shards_cpus" in r)
        sizes = sorted({(r["batch"], r["in_process_batch"]) for r in placement
                        if "in_process_batch" in r})
        lines += ["The ceiling: each round also runs the in-process layer on one core (one thread,",
                  "pinned; `moe-client demo --zipf` on the same tokens) in batches of the streams'",
                  "requests together (" + ", ".join(f"{m} tokens for requests of {b}"
                                                     for b, m in sizes) + "), and its tokens/s",
                  f"times the {cpus:g} CPUs the shards have together is a reference for what those",
                  "CPUs do with the expert math alone, nothing spent on distributing it. A",
                  "reference, not a strict bound: a shard gathers the rows queued for an expert",
                  "into one matmul (up to 256), and `load` keeps up to 2 requests in flight per",
                  "stream, so a shard may read an expert's weights once for more rows, or fewer,",
                  "than the reference does; and the reference's core runs alone, where the",
                  "shards share the machine's caches and memory with the router and the load",
                  "generator. \"of ceiling\" is the median of the rounds' ratios, and \"ceiling /",
                  "hybrid\" its inverse for hybrid: about as much as another placement could gain",
                  "over hybrid with nothing more spent on distributing the work. Here the best",
                  f"row reaches {max(r.get('of_ceiling', 0) for r in placement):.2f} of its ceiling.", ""]
    lines += ["| tokens a request | popularity | placement | tokens/s | tokens/s by round | p99 ms | errors | placement version |"
              + (" ceiling tokens/s | of ceiling |" if ceiling else ""),
              "|---:|---|---|---:|---|---:|---:|---:|" + ("---:|---:|" if ceiling else "")]
    for r in placement:
        rounds = ", ".join(f"{t:.0f}" for t in r.get("round_tokens_per_s", []))
        line = (f"| {r.get('batch', 64)} | {r.get('order', 'by_id')} | {r['placement']} | "
                f"{r['tokens_per_s']:.0f} | {rounds} | {r['p99_ms']:.1f} | {r['errors']} | "
                f"{r['placement_version']} |")
        if ceiling:
            line += (f" {r['ceiling_tokens_per_s']:.0f} | {r['of_ceiling']:.2f} |"
                     if "ceiling_tokens_per_s" in r else " - | - |")
        lines.append(line)
    hybrid_of = {(r.get("batch", 64), r.get("order")): r.get("of_ceiling")
                 for r in placement if r["placement"] == "hybrid"}
    if any("over_hybrid" in r for r in placement):
        lines += ["", "| tokens a request | popularity | placement | / hybrid | by round |"
                  + (" ceiling / hybrid |" if ceiling else ""),
                  "|---:|---|---|---:|---|" + ("---:|" if ceiling else "")]
    for r in placement:
        if "over_hybrid" in r:
            each = ", ".join(f"{x:.2f}" for x in r.get("round_ratios", []))
            line = (f"| {r.get('batch', 64)} | {r['order']} | {r['placement']} | "
                    f"**{r['over_hybrid']:.2f}x** | {each} |")
            if ceiling:
                h = hybrid_of.get((r.get("batch", 64), r.get("order")))
                line += f" {1 / h:.2f}x |" if h else " - |"
            lines.append(line)
    plot = plot_cluster(cluster, os.path.join(os.path.dirname(md_path) or ".", "cluster_throughput.png"))
    if plot:
        lines += ["", "## Cluster throughput against batch size", "",
                  f"![tokens/s against tokens per request]({os.path.basename(plot)})"]
    lines += scale_section(os.path.join(os.path.dirname(md_path) or ".", "scale.json"))
    open(md_path, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


def placement_limit_text(placement):
    """How the placement benchmark gave the shards equal CPU shares."""
    cpus = placement[0].get("shard_cpus") if placement else None
    if cpus == "pinned":
        return ("4 shards pinned two to a core (no cgroup CPU quota on this machine: a busy shard "
                "can borrow its core-mate's idle time),")
    return (f"4 shards, each limited to {cpus} CPUs by a cgroup CPU quota of its own "
            "(`moe-cluster --shard-cpus`: like a machine of that size, a shard cannot borrow a "
            "neighbour's idle time; the quotas add up to 60 % of the cores, and the router and "
            "the load generator take about 0.45 of a core between them: with 80 % the machine, "
            "not the quotas, was the limit),")


def floor_verdict(cb, asy):
    """What the gRPC floor says about the 2.5 round-trip target and the async API, in words."""
    rt, art = cb["in_round_trips"], asy["in_round_trips"]
    room = (2.5 - rt) * cb["bare_rtt_p50_s"] * 1e6
    out = (f"the 2.5 round-trip target leaves {room:.0f} us for the experts' compute on this "
           "machine." if rt < 2.5 else
           "the 2.5 round-trip target is below what gRPC alone takes on this machine.")
    if art >= 0.95 * rt:
        return out + (" Moving the hot path to the async API would not lower it (the second "
                      "row); the services keep the callback API.")
    return out + (f" The async API lowers the relay by {(1 - art / rt) * 100:.0f} % (the second "
                  f"row), to {art:.1f} round trips: "
                  + ("still above the target, and" if art >= 2.5 else "below the target, but")
                  + " the services keep the callback API, whose reactors carry their flow "
                  "control, cancellation and failover.")


def scale_table(d):
    """The scale run's table (markdown): tokens/s, ratio and scaling efficiency per shard count."""
    p = d["points"]
    c1, l1 = p[0]["cluster_tokens_per_s"], p[0]["in_process_tokens_per_s"]
    out = ["| shards S | in-process tokens/s (S threads) | cluster tokens/s | cluster / in-process | "
           "cluster efficiency | in-process efficiency | cluster p99 ms | errors |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in p:
        s = r["shards"]
        out.append(f"| {s} | {r['in_process_tokens_per_s']:.0f} | {r['cluster_tokens_per_s']:.0f} | "
                   f"{r['cluster_tokens_per_s'] / r['in_process_tokens_per_s']:.2f} | "
                   f"{r['cluster_tokens_per_s'] / (s * c1):.2f} | "
                   f"{r['in_process_tokens_per_s'] / (s * l1):.2f} | {r['cluster_p99_ms']:.0f} | {r['errors']} |")
    return out


def scale_section(path):
    """The scale run on a many-core machine (bench/scale_run.sh, kept in docs/scale.json: it is
    not made by make bench, which runs on this 2-core machine)."""
    if not os.path.exists(path):
        return []
    d = json.load(open(path))
    out = ["", "## Scale run: 1 to 8 shards on a 16-core machine", "",
           f"Machine: {d['machine']}, {d['date']}. Command: `{d['command']}`.",
           f"{d['tokens_per_request']}-token requests, {d['seconds_per_point']} s per point after a warm-up,",
           "`moe-client load` with 2S+2 streams, `sharded` placement. Efficiency is tokens/s at S divided",
           "by S times tokens/s at 1 (for the cluster and for the in-process layer each).", ""]
    return out + scale_table(d) + ["", d["notes"]]


if __name__ == "__main__":
    main()
