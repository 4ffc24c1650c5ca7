#!/bin/sh
# Makes the TLS certificates of the cluster's routes with openssl: a CA for
# this cluster, and one certificate per node, signed by it.
#
#   sh make-certs.sh OUT_DIR nats-1.ferry.internal nats-2.ferry.internal nats-3.ferry.internal
#
# Writes OUT_DIR/ca.pem and OUT_DIR/ca-key.pem (made once, reused on later
# runs; keep the key off the nodes), and for each host OUT_DIR/<host>/
# route.pem and route-key.pem, valid for that host name (or IP address) as
# server and as client. Copy ca.pem, route.pem and route-key.pem of a node
# to its /etc/ferry/nats/tls/ (see cluster.conf).
set -eu

if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR HOST..." >&2
  exit 2
fi
out=$1
shift
umask 077
mkdir -p "$out"

if [ ! -f "$out/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days 3650 -subj "/CN=Ferry NATS cluster CA" \
    -keyout "$out/ca-key.pem" -out "$out/ca.pem" 2>/dev/null
fi

for host in "$@"; do
  case $host in
    *[!0-9.]*) san="DNS:$host" ;;
    *) san="IP:$host" ;;
  esac
  dir="$out/$host"
  mkdir -p "$dir"
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n' \
    "$san" > "$dir/ext.cnf"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$host" -keyout "$dir/route-key.pem" -out "$dir/route.csr" 2>/dev/null
  openssl x509 -req -in "$dir/route.csr" -CA "$out/ca.pem" -CAkey "$out/ca-key.pem" \
    -CAcreateserial -days 825 -extfile "$dir/ext.cnf" -out "$dir/route.pem" 2>/dev/null
  rm -f "$dir/route.csr" "$dir/ext.cnf"
  echo "$dir/route.pem ($san)"
done
