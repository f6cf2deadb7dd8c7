#!/usr/bin/env bash
# Makes a local CA and certificates for a TLS cluster on this machine, with openssl:
#   DIR/ca.crt                  the CA every service and client trusts (--tls-ca)
#   DIR/server.crt, server.key  for every service (SANs localhost and 127.0.0.1)
#   DIR/client.crt, client.key  the cluster's client certificate (mutual TLS)
#   DIR/token                   a random bearer token for --auth-token-file
# usage: scripts/make-certs.sh DIR [EXTRA_SAN ...]  (e.g. DNS:moe-router IP:10.0.0.5)
set -euo pipefail
DIR=${1:?usage: make-certs.sh DIR [EXTRA_SAN ...]}
shift
mkdir -p "$DIR"
cd "$DIR"
SANS="DNS:localhost,IP:127.0.0.1"
for s in "$@"; do SANS="$SANS,$s"; done
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=moe-cluster local CA" \
  -keyout ca.key -out ca.crt 2>/dev/null
for name in server client; do
  openssl req -newkey rsa:2048 -nodes -subj "/CN=moe-cluster $name" \
    -keyout "$name.key" -out "$name.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$SANS" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
done
openssl rand -hex 24 > token
chmod 600 ./*.key token
echo "make-certs: wrote ca.crt, server.{crt,key}, client.{crt,key} and token in $DIR"
