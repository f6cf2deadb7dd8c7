#!/usr/bin/env bash
# Packs the service binaries (stripped) and the shared libraries they load, other than glibc's,
# into one archive for bench/scale_run.sh on another x86-64 Linux machine:
#   bench/pack_scale.sh BUILD_DIR OUT.tar.xz
# There: tar xf OUT.tar.xz -C DIR; LD_LIBRARY_PATH=DIR/lib bench/scale_run.sh DIR/bin RESULTS
set -euo pipefail
BUILD=${1:?usage: pack_scale.sh BUILD_DIR OUT.tar.xz}
ARCHIVE=${2:?usage: pack_scale.sh BUILD_DIR OUT.tar.xz}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib"
bins=(moe-client moe-cluster moe-router moe-expert-server moe-coordinator)
for b in "${bins[@]}"; do strip --strip-debug -o "$stage/bin/$b" "$BUILD/bin/$b"; done
ldd "${bins[@]/#/$BUILD/bin/}" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u |
  grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux-x86-64)\.so' |
  while read -r lib; do cp -L "$lib" "$stage/lib/"; done
tar -C "$stage" -cJf "$ARCHIVE" bin lib
echo "pack_scale: $(du -h "$ARCHIVE" | cut -f1) in $ARCHIVE ($(ls "$stage/lib" | wc -l) libraries)"
