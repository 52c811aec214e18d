#!/usr/bin/env bash
# Installs the system packages Kiln's build (and, with --test, its tests) need, when they are missing.
# As root with apt it installs them; otherwise it prints the exact command to run and fails.
set -euo pipefail

packages=()
command -v protoc >/dev/null 2>&1 || packages+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/timestamp.proto ] || packages+=(libprotobuf-dev)
if [ "${1:-}" = "--test" ]; then
  command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
  command -v etcd >/dev/null 2>&1 || packages+=(etcd-server)
  # promtool checks deploy/prometheus/alerts.yml.
  command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
  # examples/python/kiln_example.py, run by a test with Debian's own interpreter.
  /usr/bin/python3 -c 'import grpc' >/dev/null 2>&1 || packages+=(python3-grpcio)
  /usr/bin/python3 -c 'import google.protobuf' >/dev/null 2>&1 || packages+=(python3-protobuf)
fi
[ ${#packages[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing ${packages[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
else
  echo "bootstrap: missing system packages. Run: sudo apt-get install -y ${packages[*]}" >&2
  exit 1
fi
