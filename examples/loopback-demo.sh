#!/usr/bin/env bash
# A first transfer: random data through viamillipede over loopback, checked with sha256.
# Usage: bash examples/loopback-demo.sh [MEGABYTES] [THREADS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
vmp=${VIAMILLIPEDE:-}
if [ -z "$vmp" ]; then
  if [ -x "$here/.venv/bin/viamillipede" ]; then vmp="$here/.venv/bin/viamillipede"
  else vmp=$(command -v viamillipede) || { echo "viamillipede is not installed" >&2; exit 1; }
  fi
fi
mb=${1:-200}
threads=${2:-4}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

head -c "${mb}M" /dev/urandom > "$dir/in"
echo "sending $mb MB over $threads connections to 127.0.0.1:$port"
"$vmp" rx "$port" > "$dir/out" &
rx=$!
# The transmitter retries until the receiver listens, so no pause is needed here.
"$vmp" tx 127.0.0.1 "$port" threads "$threads" < "$dir/in"
wait "$rx"
a=$(sha256sum < "$dir/in" | cut -d' ' -f1)
b=$(sha256sum < "$dir/out" | cut -d' ' -f1)
if [ "$a" = "$b" ]; then
  echo "OK: output is byte-identical (sha256 $a)"
else
  echo "MISMATCH: in $a, out $b" >&2
  exit 1
fi
