#!/usr/bin/env bash
# Makes (once) the virtual environment with PyTorch that the reference model under reference/torch
# runs in, and prints its interpreter. PyPI's Linux torch wheel brings its CUDA libraries (about 5 GB
# installed); the CPU is all that the tests and `kiln bench --against-torch` use. The environment lives
# outside the checkout, so clean clones on one machine share it.
set -euo pipefail
TORCH_VERSION=2.15.0
venv="${KILN_TORCH_VENV:-$HOME/.cache/kiln/torch-venv}"
python="$venv/bin/python"
if ! "$python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "torch-venv.sh: installing torch $TORCH_VERSION into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" >&2
fi
echo "$python"
