#!/usr/bin/env bash
# The scale run (issue: performance): the cluster with 1, 2, 4 and 8 shards against the
# in-process layer on the same cores, on a machine with at least 10 cores. Shard i runs on core
# i (one compute thread each); the in-process layer runs S OpenMP threads on the same S cores;
# the router and the load client run on the cores left over. Same checkpoint as make bench's
# cluster row (16 experts, d_model 512, d_ff 2048, top-2, gated SiLU), 256-token requests.
#
#   bench/scale_run.sh BIN_DIR OUT_DIR [SECONDS_PER_POINT]
# Writes OUT_DIR/scale.json (and prints a table); bench/report.py puts docs/scale.json into
# docs/PERFORMANCE.md. bench/pack_scale.sh packs the binaries and libraries for another machine.
set -euo pipefail
BIN=${1:?usage: scale_run.sh BIN_DIR OUT_DIR [SECONDS]}
OUT=${2:?usage: scale_run.sh BIN_DIR OUT_DIR [SECONDS]}
SECS=${3:-8}
N=256
mkdir -p "$OUT"
cores=$(nproc)
[ "$cores" -ge 10 ] || { echo "scale_run: needs at least 10 cores (8 shards + router + client), this machine has $cores" >&2; exit 1; }
CK="$OUT/scale.safetensors"
"$BIN/moe-client" init-checkpoint --out "$CK" --experts 16 --d-model 512 --d-ff 2048 --top-k 2 \
  --activation silu --gated --seed 1 >/dev/null
cpu=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)
echo "scale_run: $cpu, $cores cores, ${SECS} s per point, N=$N" >&2
rows=()
for S in 1 2 4 8; do
  shard_cpus="0-$((S - 1))"
  rest="$S-$((cores - 1))"
  # In process: S OpenMP threads on the shards' cores; ~SECS seconds of batches (calibrated).
  probe=$(OMP_NUM_THREADS=$S taskset -c "$shard_cpus" "$BIN/moe-client" demo --checkpoint "$CK" \
    --batches 20 --batch-size $N | sed -n 's/.*: \([0-9.]*\) tokens\/s.*/\1/p')
  batches=$(awk -v t="$probe" -v s="$SECS" -v n=$N 'BEGIN { b = int(t * s / n); print (b < 20 ? 20 : b) }')
  local_tps=$(OMP_NUM_THREADS=$S taskset -c "$shard_cpus" "$BIN/moe-client" demo --checkpoint "$CK" \
    --batches "$batches" --batch-size $N | sed -n 's/.*: \([0-9.]*\) tokens\/s.*/\1/p')
  # The cluster: shards pinned to cores 0..S-1, router (and client) on the rest.
  taskset -c "$rest" "$BIN/moe-cluster" --checkpoint "$CK" --shards "$S" --placement sharded \
    --router-port 0 --pin-shards --shard-threads 1 > "$OUT/cluster-$S.out" 2> "$OUT/cluster-$S.err" &
  cluster=$!
  for _ in $(seq 1 600); do grep -q '^READY' "$OUT/cluster-$S.out" 2>/dev/null && break; sleep 0.1; done
  router=$(sed -n 's/^READY router=//p' "$OUT/cluster-$S.out")
  [ -n "$router" ] || { cat "$OUT/cluster-$S.err" >&2; echo "scale_run: cluster of $S did not start" >&2; exit 1; }
  taskset -c "$rest" "$BIN/moe-client" load --router "$router" --concurrency $((2 * S + 2)) \
    --batch-size $N --duration 2 > /dev/null 2>&1   # warm-up
  taskset -c "$rest" "$BIN/moe-client" load --router "$router" --concurrency $((2 * S + 2)) \
    --batch-size $N --duration "$SECS" > "$OUT/load-$S.txt" 2>/dev/null
  kill -TERM $cluster; wait $cluster || true
  cluster_tps=$(awk '$1 == "tokens/s" { print $2 }' "$OUT/load-$S.txt")
  p99=$(awk '$1 == "p99" { print $4 }' "$OUT/load-$S.txt")
  errors=$(awk '$1 == "errors" { print $2 }' "$OUT/load-$S.txt")
  echo "S=$S: in-process $local_tps tokens/s, cluster $cluster_tps tokens/s (p99 $p99 ms, errors $errors)" >&2
  rows+=("{\"shards\": $S, \"in_process_tokens_per_s\": $local_tps, \"cluster_tokens_per_s\": $cluster_tps, \"cluster_p99_ms\": $p99, \"errors\": $errors}")
done
{
  printf '{"machine": "%s", "cores": %d, "tokens_per_request": %d, "seconds_per_point": %s, "points": [' \
    "$cpu" "$cores" $N "$SECS"
  (IFS=,; printf '%s' "${rows[*]}")
  printf ']}\n'
} > "$OUT/scale.json"
/usr/bin/env python3 - "$OUT/scale.json" "$(dirname "$0")" <<'PY'
import json, sys
sys.path.insert(0, sys.argv[2])
import report
print("\n".join(report.scale_table(json.load(open(sys.argv[1])))))
PY
