#!/usr/bin/env bash
# `make run`: a demo checkpoint, a local cluster of 4 shards with hybrid placement, ~20 s of
# Zipf-skewed load with a progress bar, the summary and the placement table; then the cluster
# keeps serving until Ctrl-C.
set -euo pipefail
BUILD=${1:-build}
BIN="$BUILD/bin"
RUN_DIR=${MOE_RUN_DIR:-$BUILD/run}  # the checkpoint and moe-cluster's output
PORT=${MOE_ROUTER_PORT:-50051}
DURATION=${MOE_DEMO_SECONDS:-20}
mkdir -p "$RUN_DIR"
CK="$RUN_DIR/demo.safetensors"
if [ ! -f "$CK" ]; then
  "$BIN/moe-client" init-checkpoint --out "$CK" --experts 16 --d-model 512 --d-ff 2048 \
    --top-k 2 --activation silu --gated --seed 1
fi
# MOE_TLS=1: mutual TLS between every service and the client, and a bearer token on the router.
CLUSTER_TLS=()
CLIENT_TLS=()
if [ -n "${MOE_TLS:-}" ]; then
  CERTS="$RUN_DIR/certs"
  [ -f "$CERTS/ca.crt" ] || bash scripts/make-certs.sh "$CERTS"
  CLUSTER_TLS=(--tls-dir "$CERTS" --require-client-cert --auth-token-file "$CERTS/token")
  CLIENT_TLS=(--tls-ca "$CERTS/ca.crt" --tls-cert "$CERTS/client.crt" --tls-key "$CERTS/client.key"
              --auth-token-file "$CERTS/token")
  echo "TLS on: certificates in $CERTS; clients need: ${CLIENT_TLS[*]}"
fi
"$BIN/moe-cluster" --checkpoint "$CK" --shards 4 --placement hybrid --router-port "$PORT" \
  --metrics-port "${MOE_METRICS_PORT:-9400}" "${CLUSTER_TLS[@]}" > "$RUN_DIR/cluster.out" &
CLUSTER=$!
trap 'kill -TERM $CLUSTER 2>/dev/null || true; wait $CLUSTER 2>/dev/null || true' EXIT
# Ctrl-C stops the cluster; the demo then exits with moe-cluster's status (0 when every service
# stopped cleanly, else 1 with a line naming the ones that did not).
stop_cluster() {
  kill -TERM $CLUSTER 2>/dev/null || true  # (gone already when Ctrl-C reached it too)
  local st=0
  wait $CLUSTER || st=$?
  exit $st
}
trap stop_cluster INT TERM
for _ in $(seq 1 600); do
  if grep -q '^READY' "$RUN_DIR/cluster.out" 2>/dev/null; then break; fi
  if ! kill -0 $CLUSTER 2>/dev/null; then
    echo "run-demo: moe-cluster failed to start (is port $PORT taken? set MOE_ROUTER_PORT)" >&2
    exit 1
  fi
  sleep 0.1
done
ROUTER=$(sed -n 's/^READY router=//p' "$RUN_DIR/cluster.out")
[ -n "$ROUTER" ] || { echo "run-demo: the cluster did not become ready" >&2; exit 1; }
echo "cluster ready: router at $ROUTER (metrics on :${MOE_METRICS_PORT:-9400})"
"$BIN/moe-client" info --router "$ROUTER" "${CLIENT_TLS[@]}"
echo
echo "load: ${DURATION} s, 4 streams of 64-token requests, Zipf skew 1.2 over experts"
"$BIN/moe-client" load --router "$ROUTER" --checkpoint "$CK" --zipf 1.2 --concurrency 4 \
  --batch-size 64 --duration "$DURATION" "${CLIENT_TLS[@]}"
echo
"$BIN/moe-client" placement --router "$ROUTER" "${CLIENT_TLS[@]}"
echo
if [ -n "${MOE_DEMO_EXIT:-}" ]; then exit 0; fi
echo "the cluster keeps serving at $ROUTER; try: $BIN/moe-client info --router $ROUTER"
echo "press Ctrl-C to stop"
wait $CLUSTER
