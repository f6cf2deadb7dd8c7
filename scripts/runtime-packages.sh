#!/usr/bin/env bash
# Prints the Debian packages that hold the shared libraries the given binaries load, one per line:
# the runtime image installs exactly these. Fails naming a library no package owns.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: runtime-packages.sh BINARY..." >&2; exit 2; }
ldd "$@" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u | while read -r lib; do
  pkg=""
  for candidate in "$lib" "$(readlink -f "$lib")" "/usr$lib" "${lib#/usr}"; do
    pkg=$(dpkg -S "$candidate" 2>/dev/null | head -n1 | cut -d: -f1) && [ -n "$pkg" ] && break
  done
  [ -n "$pkg" ] || { echo "runtime-packages: no Debian package owns $lib" >&2; exit 1; }
  echo "$pkg"
done | sort -u
