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
  # pip, for the independent C2PA verifier below.
  /usr/bin/python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
fi

if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing ${packages[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  else
    echo "bootstrap: missing system packages. Run: sudo apt-get install -y ${packages[*]}" >&2
    exit 1
  fi
fi

# The C2PA test reads Kiln's images with c2pa-python (PyPI), a verifier Kiln did not write.
if [ "${1:-}" = "--test" ] && ! /usr/bin/python3 -c 'import c2pa' >/dev/null 2>&1; then
  echo "bootstrap: installing c2pa-python from PyPI" >&2
  user=()
  [ "$(id -u)" = "0" ] || user=(--user)
  /usr/bin/python3 -m pip install -q "${user[@]}" --break-system-packages "c2pa-python==0.38.1" >&2
fi

# The stock reflection client of grpcio (v1alpha), matched to Debian's python3-grpcio 1.51.1 and
# installed without dependencies so that pip leaves Debian's grpcio and protobuf alone
# (examples/python/discover.py, run by tests/stock_tools.rs).
if [ "${1:-}" = "--test" ] && ! /usr/bin/python3 -c 'import grpc_reflection' >/dev/null 2>&1; then
  echo "bootstrap: installing grpcio-reflection from PyPI" >&2
  user=()
  [ "$(id -u)" = "0" ] || user=(--user)
  /usr/bin/python3 -m pip install -q "${user[@]}" --break-system-packages --no-deps \
    "grpcio-reflection==1.51.1" >&2
fi

# The deployment test (tests/deploy.rs) lints and renders the Helm chart with Helm's own library
# (helm-python-sdk bundles it: no helm binary), validates the manifests against the Kubernetes schemas
# offline (kubernetes-validate) and lints the YAML (yamllint).
if [ "${1:-}" = "--test" ] && ! /usr/bin/python3 -c 'import helm_python, kubernetes_validate, yamllint' >/dev/null 2>&1; then
  echo "bootstrap: installing helm-python-sdk, kubernetes-validate and yamllint from PyPI" >&2
  user=()
  [ "$(id -u)" = "0" ] || user=(--user)
  /usr/bin/python3 -m pip install -q "${user[@]}" --break-system-packages \
    "helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0" "yamllint==1.38.0" >&2
fi
