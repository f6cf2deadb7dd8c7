#!/usr/bin/env bash
# Renders every overlay of deploy/k8s with `kubectl kustomize` and validates the objects
# (tests/deploy/validate_k8s.mjs: Kubernetes schemas, then selectors, ports, probes and
# addresses across objects). Then proves the validator can fail: a copy with the shard's probe
# port changed must be refused.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
command -v kubectl >/dev/null || { echo "check_k8s: kubectl not found (scripts/install-deps.sh installs it)" >&2; exit 1; }
[ -d "$here/node_modules/kubernetes-models" ] || {
  echo "check_k8s: npm packages missing; run scripts/install-deps.sh (npm ci in tests/deploy)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for overlay in "$repo"/deploy/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  # kubectl 1.2x+ warns about the kustomize 2 field names kept for Debian's kubectl 1.20.
  kubectl kustomize "$overlay" > "$tmp/$name.yaml" 2> "$tmp/$name.err" || {
    cat "$tmp/$name.err" >&2; echo "check_k8s: overlay $name does not render" >&2; exit 1; }
  node "$here/validate_k8s.mjs" "$name" "$tmp/$name.yaml"
done
sed 's/port: 50061$/port: 50099/' "$tmp/dev.yaml" > "$tmp/broken.yaml"
if node "$here/validate_k8s.mjs" broken "$tmp/broken.yaml" > "$tmp/broken.out"; then
  echo "check_k8s: the validator accepted a shard whose probes name a port it does not open" >&2
  exit 1
fi
grep -q "readinessProbe port 50099 is not a container port" "$tmp/broken.out" || {
  cat "$tmp/broken.out" >&2; echo "check_k8s: the validator missed the broken probe port" >&2; exit 1; }
echo "ok: a broken copy is refused ($(wc -l < "$tmp/broken.out") problems named)"
