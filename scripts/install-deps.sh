#!/usr/bin/env bash
# Installs the Debian packages moe-cluster builds and tests with. Idempotent: asks apt only for
# what is missing, so a machine that has everything returns at once. Works as root or via sudo.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config git
  libgrpc++-dev libgrpc-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  libabsl-dev libdnnl-dev prometheus-cpp-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  clang libclang-rt-14-dev
  python3 python3-torch python3-numpy python3-grpcio python3-protobuf
  curl procps openssl
)
# Optional tool sets, asked for by name: `install-deps.sh bench` adds the benchmark peers.
for extra in "$@"; do
  case "$extra" in
    bench) PACKAGES+=(python3-matplotlib libopenblas0-pthread libgloo-dev openmpi-bin libopenmpi-dev) ;;
    *) echo "install-deps.sh: unknown extra '$extra' (known: bench)" >&2; exit 2 ;;
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
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1
  fi
fi
echo "install-deps: installing ${#missing[@]} missing packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
