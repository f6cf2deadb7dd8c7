#!/usr/bin/env bash
# make test-compose: the container path end to end. Starts a Docker engine if none runs
# (Debian's docker.io: dockerd --iptables=false --bridge=none, host networking only), builds the
# image (from debian:bookworm, or where no registry is reachable from a bookworm base made here
# with debootstrap and `docker import`), runs docker-compose.yml on the host's network (without
# Prometheus and Grafana when their images cannot be pulled), sends token batches with
# moe-client and checks the answers against the in-process layer, then tears everything down.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
BUILD="$(cd "${1:-$repo/build}" && pwd)"
STATE="${MOE_COMPOSE_STATE:-$BUILD/compose}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"   # absolute: compose reads a relative volume source as a volume name
BIN="$BUILD/bin"
PROJECT=moe-smoke
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
say() { printf '[compose-smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { say "FAILED: $*"; exit 1; }
[ -x "$BIN/moe-client" ] || die "no $BIN/moe-client: run make build first"

started_dockerd=""
cleanup() {
  set +e
  if [ -n "${COMPOSE_FILES:-}" ]; then
    docker-compose -p "$PROJECT" $COMPOSE_FILES logs --no-color > "$STATE/compose.log" 2>&1
    docker-compose -p "$PROJECT" $COMPOSE_FILES --profile load down -v --remove-orphans >/dev/null 2>&1
  fi
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null; wait "$started_dockerd" 2>/dev/null
  fi
}
trap cleanup EXIT

# 1. A Docker engine.
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || die "no dockerd: apt-get install docker.io (scripts/install-deps.sh compose)"
  say "starting dockerd (no bridge, no iptables; log: $STATE/dockerd.log)"
  dockerd --iptables=false --bridge=none > "$STATE/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 1 150); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
  docker info >/dev/null 2>&1 || die "dockerd did not come up; see $STATE/dockerd.log"
fi

# 2. The base image: debian:bookworm from a registry, or made here.
registry=yes
BASE=debian:bookworm
if ! docker image inspect "$BASE" >/dev/null 2>&1 && ! timeout 60 docker pull -q "$BASE" >/dev/null 2>&1; then
  registry=""
  BASE=moe-base:bookworm
  if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || die "no registry and no debootstrap: apt-get install debootstrap"
    mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
    [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt to debootstrap from"
    say "no registry reachable: making $BASE with debootstrap from this machine's Debian mirror"
    rm -rf "$STATE/rootfs"
    debootstrap --variant=minbase bookworm "$STATE/rootfs" "$mirror" > "$STATE/debootstrap.log" 2>&1 \
      || die "debootstrap failed; see $STATE/debootstrap.log"
    tar -C "$STATE/rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$STATE/rootfs"
  fi
fi

# 3. The image, with the repo's Dockerfile.
say "building moe-cluster:local from $BASE (log: $STATE/build.log)"
t0=$(date +%s)
docker build --network host --build-arg BASE="$BASE" --build-arg JOBS="$(nproc)" \
  -f "$repo/deploy/docker/Dockerfile" -t moe-cluster:local "$repo" > "$STATE/build.log" 2>&1 \
  || { tail -30 "$STATE/build.log"; die "docker build failed; see $STATE/build.log"; }
say "image built in $(( $(date +%s) - t0 )) s: $(docker image inspect -f '{{.Size}}' moe-cluster:local | awk '{printf "%.0f MiB", $1/1048576}')"
user=$(docker image inspect -f '{{.Config.User}}' moe-cluster:local)
[ -n "$user" ] && [ "${user%%:*}" != "0" ] && [ "${user%%:*}" != "root" ] || die "the image runs as root"

# 4. The stack, on the host's network: docker-compose.yml (plus the given override files) as
#    `docker-compose config` resolves it, with every service on the host's network, the service
#    names mapped to loopback (so the file's addresses, coordinator:50041 and so on, work) and no
#    published ports (host mode has none; compose 1.x cannot drop keys in an override file, hence
#    a generated file). Then token batches through the router, checked against the in-process
#    layer on the same checkpoint, and a short load without an error.
stack_check() {
  local label=$1; shift
  local client=("$@")
  local services=(checkpoint-init coordinator shard-0 shard-1 shard-2 shard-3 router)
  if [ -n "$registry" ] && [ "$label" = plain ]; then services+=(prometheus grafana); fi
  MOE_IMAGE=moe-cluster:local docker-compose -f "$repo/docker-compose.yml" "${OVERRIDES[@]}" config \
    > "$STATE/compose.resolved.yml"
  /usr/bin/python3 - "$STATE/compose.resolved.yml" "$STATE/compose.hostnet.yml" <<'PY'
import sys
import yaml
cfg = yaml.safe_load(open(sys.argv[1]))
names = sorted(cfg["services"])
for svc in cfg["services"].values():
    svc.pop("ports", None)
    svc.pop("build", None)
    svc["network_mode"] = "host"
    svc["extra_hosts"] = [f"{n}:127.0.0.1" for n in names]
yaml.safe_dump(cfg, open(sys.argv[2], "w"))
PY
  COMPOSE_FILES="-f $STATE/compose.hostnet.yml"
  say "[$label] docker-compose up: ${services[*]}"
  docker-compose -p "$PROJECT" $COMPOSE_FILES up -d "${services[@]}" > "$STATE/up.log" 2>&1 \
    || { cat "$STATE/up.log"; die "docker-compose up failed"; }
  for svc in coordinator shard-0 shard-1 shard-2 shard-3 router; do
    local id
    id=$(docker-compose -p "$PROJECT" $COMPOSE_FILES ps -q "$svc")
    for _ in $(seq 1 120); do
      [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ] && break
      sleep 1
    done
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ] || die "[$label] $svc never became healthy"
  done
  say "[$label] all services healthy"
  local router_id
  router_id=$(docker-compose -p "$PROJECT" $COMPOSE_FILES ps -q router)
  docker cp "$router_id:/data/model.safetensors" "$STATE/model.safetensors"
  "$BIN/moe-client" info --router "$ROUTER" "${client[@]}" | tee "$STATE/info.txt"
  [ "$(awk '$3 == "up"' "$STATE/info.txt" | wc -l)" -eq 4 ] || die "[$label] the router does not see 4 shards up"
  "$BIN/moe-client" infer --router "$ROUTER" "${client[@]}" --input "$STATE/tokens.safetensors" \
    --output "$STATE/cluster.safetensors" >/dev/null
  "$BIN/moe-client" forward --local --checkpoint "$STATE/model.safetensors" \
    --input "$STATE/tokens.safetensors" --output "$STATE/local.safetensors" >/dev/null
  /usr/bin/python3 - "$STATE" "$repo" <<'PY' || die "[$label] the cluster's answers differ from the in-process layer"
import sys
import numpy as np
sys.path.insert(0, sys.argv[2] + "/tests/torch")
import st
a, _ = st.load(sys.argv[1] + "/cluster.safetensors")
b, _ = st.load(sys.argv[1] + "/local.safetensors")
err = float(np.max(np.abs(a["output"] - b["output"]) / (1 + np.abs(b["output"]))))
same = bool((a["expert_ids"] == b["expert_ids"]).all())
print(f"96 tokens through the containers: max relative error {err:.2e}, same experts: {same}")
sys.exit(0 if err < 1e-5 and same else 1)
PY
  "$BIN/moe-client" load --router "$ROUTER" "${client[@]}" --requests 200 --concurrency 4 \
    --batch-size 32 | tee "$STATE/load.txt"
  [ "$(awk '$1 == "errors" { print $2 }' "$STATE/load.txt")" = 0 ] || die "[$label] load saw errors"
}

ROUTER=127.0.0.1:50051
"$BIN/moe-client" make-tokens --out "$STATE/tokens.safetensors" --tokens 96 --d-model 512 --seed 7 >/dev/null
[ -n "$registry" ] || say "leaving out prometheus and grafana: their images need a registry"
OVERRIDES=()
stack_check plain
docker-compose -p "$PROJECT" $COMPOSE_FILES down -v >/dev/null 2>&1

# 5. The same with deploy/docker/compose.tls.yml: mutual TLS everywhere and a bearer token; a
#    client without them is refused.
CERTS="$STATE/certs"
rm -rf "$CERTS"
bash "$repo/scripts/make-certs.sh" "$CERTS" DNS:coordinator DNS:shard-0 DNS:shard-1 DNS:shard-2 \
  DNS:shard-3 DNS:router >/dev/null
chown -R 10001:10001 "$CERTS" 2>/dev/null || chmod a+r "$CERTS"/*
export MOE_CERTS="$CERTS"
OVERRIDES=(-f "$repo/deploy/docker/compose.tls.yml")
stack_check tls --tls-ca "$CERTS/ca.crt" --tls-cert "$CERTS/client.crt" --tls-key "$CERTS/client.key" \
  --auth-token-file "$CERTS/token"
TLS_CLIENT=(--tls-ca "$CERTS/ca.crt" --tls-cert "$CERTS/client.crt" --tls-key "$CERTS/client.key")
if "$BIN/moe-client" info --router "$ROUTER" > "$STATE/plain.txt" 2>&1; then
  die "[tls] a plaintext client was answered"
fi
grep -q "Connection refused" "$STATE/plain.txt" && die "[tls] nothing listens on $ROUTER: $(tail -1 "$STATE/plain.txt")"
say "[tls] a plaintext client is refused: $(tail -1 "$STATE/plain.txt")"
if "$BIN/moe-client" info --router "$ROUTER" "${TLS_CLIENT[@]}" > "$STATE/notoken.txt" 2>&1; then
  die "[tls] a client without the bearer token was answered"
fi
grep -q "bearer token" "$STATE/notoken.txt" || die "[tls] no token: $(tail -1 "$STATE/notoken.txt")"
say "[tls] a client without the token is refused: $(tail -1 "$STATE/notoken.txt")"
"$BIN/moe-client" info --router "$ROUTER" "${TLS_CLIENT[@]}" --auth-token-file "$CERTS/token" >/dev/null \
  || die "[tls] the router stopped answering the cluster's own client"
say "PASSED: non-root image; plain and TLS stacks healthy with 4 shards up, answers equal to the in-process layer, 2 x 200 requests without an error; plaintext and token-less clients refused under TLS"
echo "compose-smoke: 12 passed, 0 failed"
