#!/usr/bin/env bash
# Installs the Debian packages moe-cluster builds and tests with. Idempotent: asks apt only for
# what is missing, so a machine that has everything returns at once. Works as root or via sudo.
#
#   install-deps.sh          everything `make test` needs (the default)
#   install-deps.sh build    only what building the services needs (the container image's build
#                            stage: cmake -DMOE_BUILD_TESTS=OFF)
#   install-deps.sh bench    the default set plus the benchmark peers (Gloo, Open MPI, OpenBLAS)
#   install-deps.sh compose  the default set plus a Docker engine and debootstrap (make test-compose)
set -euo pipefail

BUILD_PACKAGES=(
  build-essential cmake pkg-config
  libgrpc++-dev libgrpc-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  libabsl-dev libdnnl-dev prometheus-cpp-dev nlohmann-json3-dev libssl-dev
)
TEST_PACKAGES=(
  git libgtest-dev libgmock-dev googletest libbenchmark-dev
  clang libclang-rt-14-dev
  python3 python3-torch python3-numpy python3-grpcio python3-protobuf python3-yaml
  curl procps openssl
  # fault injection (tests/fault): network namespaces and cut links
  iproute2 iptables
  # deployment checks (tests/deploy): compose, YAML, Prometheus rules and a live Prometheus
  docker-compose yamllint prometheus
)
# Tools that may already come from elsewhere (another vendor's package): Debian's only if absent.
command -v kubectl >/dev/null 2>&1 || TEST_PACKAGES+=(kubernetes-client)
command -v npm >/dev/null 2>&1 || TEST_PACKAGES+=(nodejs npm)

PACKAGES=("${BUILD_PACKAGES[@]}" "${TEST_PACKAGES[@]}")
for extra in "$@"; do
  case "$extra" in
    build) PACKAGES=("${BUILD_PACKAGES[@]}") ;;
    bench) PACKAGES+=(python3-matplotlib libopenblas0-pthread libgloo-dev openmpi-bin libopenmpi-dev) ;;
    compose) PACKAGES+=(docker.io debootstrap) ;;
    *) echo "install-deps.sh: unknown set '$extra' (known: build, bench, compose)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1
    fi
  fi
  echo "install-deps: installing ${#missing[@]} missing packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q >/dev/null
  # (prometheus's package may start a server on :9090; the tests start their own on a free port.)
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  echo "install-deps: done"
fi

# The Kubernetes schema validator of tests/deploy (npm's kubernetes-models, pinned by its lock file).
case " $* " in *" build "*) exit 0 ;; esac
here="$(cd "$(dirname "$0")/.." && pwd)"
lock="$here/tests/deploy/package-lock.json"
if [ -f "$lock" ] && [ ! "$here/tests/deploy/node_modules/.package-lock.json" -nt "$lock" ]; then
  echo "install-deps: npm ci in tests/deploy (Kubernetes schemas)"
  (cd "$here/tests/deploy" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
