#!/usr/bin/env bash
# Certificates and node keys for a TLS SuperLink with SuperNode authentication (flwr 1.42).
#
#   deploy/make_certs.sh [-o DIR] [-n NODES] [-d DAYS] [HOST_OR_IP ...]
#
#   DIR/ca.crt, DIR/ca.key          a private CA (keep ca.key offline; ca.crt goes to every device
#                                   and to the workstation's connection config)
#   DIR/server.pem, DIR/server.key  the SuperLink's certificate, valid for every HOST_OR_IP given
#                                   AND for 127.0.0.1, ::1 and localhost: the SuperLink's own
#                                   SuperExec/ServerApp connect to 127.0.0.1:<port> even with
#                                   `--host 0.0.0.0`, and with a certificate that lacks 127.0.0.1
#                                   every run stays `pending`.
#   DIR/keys/node<i>, .pub          one ECDSA P-384 key pair per SuperNode (ssh-keygen -t ecdsa -b 384),
#                                   i = 1..NODES; register each .pub with `flwr supernode register`,
#                                   give each private key to its device only.
#
# Existing files are kept (re-running adds missing node keys; delete DIR to start over).
# Needs openssl and ssh-keygen.
set -euo pipefail

OUT="certificates"
NODES=2
DAYS=365
while getopts "o:n:d:h" opt; do
  case "$opt" in
    o) OUT="$OPTARG" ;;
    n) NODES="$OPTARG" ;;
    d) DAYS="$OPTARG" ;;
    h) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "usage: $0 [-o DIR] [-n NODES] [-d DAYS] [HOST_OR_IP ...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "$NODES" =~ ^[0-9]+$ ]] || { echo "make_certs: -n must be a number of nodes, got '$NODES'" >&2; exit 2; }
command -v openssl >/dev/null || { echo "make_certs: openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "make_certs: ssh-keygen not found" >&2; exit 1; }

mkdir -p "$OUT/keys"
chmod 700 "$OUT"
cd "$OUT"

# Subject alternative names: the given hosts/IPs plus loopback (always).
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for h in "$@"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san="$san,IP:$h"; else san="$san,DNS:$h"; fi
done
cn="${1:-localhost}"

if [[ ! -f ca.key || ! -f ca.crt ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha256 -days "$DAYS" \
    -keyout ca.key -out ca.crt -subj "/CN=TaskEdge-FL CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 600 ca.key
  echo "make_certs: CA -> $OUT/ca.crt"
fi

if [[ ! -f server.key || ! -f server.pem ]]; then
  ext="$(mktemp)"
  trap 'rm -f "$ext" server.csr' EXIT
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$san" > "$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -keyout server.key -out server.csr -subj "/CN=$cn" 2>/dev/null
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days "$DAYS" \
    -extfile "$ext" -out server.pem 2>/dev/null
  chmod 600 server.key
  echo "make_certs: server certificate -> $OUT/server.pem (valid for $san)"
else
  echo "make_certs: keeping the existing $OUT/server.pem ($(openssl x509 -in server.pem -noout -ext subjectAltName 2>/dev/null | tail -1 | sed 's/^ *//'))"
fi

for ((i = 1; i <= NODES; i++)); do
  if [[ ! -f "keys/node$i" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "taskedge-node$i" -f "keys/node$i"
    echo "make_certs: node key -> $OUT/keys/node$i (public: keys/node$i.pub)"
  fi
done
