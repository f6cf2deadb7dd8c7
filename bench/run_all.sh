#!/usr/bin/env bash
# Runs every benchmark and writes docs/PERFORMANCE.md and docs/performance.json from the numbers
# of this one run. usage: bench/run_all.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
# Debian's torch calls the libblas.so.3 alternative: without OpenBLAS that is the reference BLAS,
# and PyTorch ran 25x slower (445 tokens/s against 10382 on the same Xeon, 2026-12-05).
if ! dpkg-query -W -f='${Status}' libopenblas0-pthread 2>/dev/null | grep -q 'ok installed'; then
  echo "run_all.sh: PyTorch would run on Debian's reference BLAS (libopenblas0-pthread is" \
    "missing) and its figures would be about 25x too slow: run \`make bench\`, which installs" \
    "the benchmarks' packages" >&2
  exit 2
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "[1/7] expert FFN against the FMA peak (bench/ffn_bench)" >&2
"$BUILD/bin/ffn_bench" --benchmark_format=json --benchmark_out="$OUT/ffn.json" \
  --benchmark_out_format=json >/dev/null 2>"$OUT/ffn.err"
cat "$OUT/ffn.err" >&2
# Ours and PyTorch in 3 alternating pairs: on this VM either side's tokens/s moves by up to 15 %
# between runs a minute apart, so the report takes medians.
for pair in 1 2 3; do
  echo "[2/7] in-process layer (bench/layer_bench), pair $pair of 3" >&2
  "$BUILD/bin/layer_bench" --benchmark_out="$OUT/layer_$pair.json" --benchmark_out_format=json \
    >/dev/null
  echo "[3/7] the same layer in PyTorch (bench/torch_layer.py), pair $pair of 3" >&2
  /usr/bin/python3 bench/torch_layer.py 256 1.0 >"$OUT/torch_$pair.jsonl"
done
echo "[4/7] one shard on loopback against the in-process kernel (bench/shard_bench)" >&2
# 3 runs of each, in a random interleaved order, medians reported: run one after the other, the
# in-process and the shard figures were up to a minute apart on a VM whose speed drifts.
"$BUILD/bin/shard_bench" --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true \
  --benchmark_report_aggregates_only=true --benchmark_out="$OUT/shard.json" \
  --benchmark_out_format=json >/dev/null 2>&1
echo "[5/7] the cluster against the in-process layer (bench/cluster_bench)" >&2
"$BUILD/bin/cluster_bench" 4 >"$OUT/cluster.json" 2>"$OUT/cluster.err" || { cat "$OUT/cluster.err" >&2; exit 1; }
echo "[5/7] what gRPC alone costs for a request of the cluster's shape (bench/grpc_floor)" >&2
"$BUILD/bin/grpc_floor" 2 >"$OUT/grpc_floor.json" 2>"$OUT/grpc_floor.err" || { cat "$OUT/grpc_floor.err" >&2; exit 1; }
echo "[6/7] ring all-reduce against Gloo and Open MPI (bench/allreduce_bench.py)" >&2
/usr/bin/python3 bench/allreduce_bench.py "$OUT/allreduce.jsonl" "$BUILD/bin"
echo "[7/7] hybrid against dynamic placement under Zipf load (bench/placement_bench.py)" >&2
/usr/bin/python3 bench/placement_bench.py "$OUT/placement.jsonl" "$BUILD/bin" 10
/usr/bin/python3 bench/report.py "$OUT" docs/PERFORMANCE.md docs/performance.json
