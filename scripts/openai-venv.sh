#!/usr/bin/env bash
# Makes (once) the virtual environment with OpenAI's official Python client that tests/openai.rs
# drives against Kiln's OpenAI-compatible HTTP API, and prints its interpreter. It lives outside the
# checkout, so clean clones on one machine share it.
set -euo pipefail
OPENAI_VERSION=3.63.0
venv="${KILN_OPENAI_VENV:-$HOME/.cache/kiln/openai-venv}"
python="$venv/bin/python"
if ! "$python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "openai-venv.sh: installing openai $OPENAI_VERSION into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION" >&2
fi
echo "$python"
