#!/usr/bin/env bash
# Runs every test: installs what the build and tests need, checks formatting, then runs unit, property
# and end-to-end tests (which start their own kiln processes on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
# The PyTorch reference model (reference/torch) that tests/torch_reference.rs checks logits against.
KILN_TORCH_PYTHON="$(scripts/torch-venv.sh)"
export KILN_TORCH_PYTHON
# OpenAI's official Python client, which tests/openai.rs drives against the HTTP API.
KILN_OPENAI_PYTHON="$(scripts/openai-venv.sh)"
export KILN_OPENAI_PYTHON
# A one-off build gains nothing from incremental caches, which would double the target folder on disk.
export CARGO_INCREMENTAL=0
echo "test.sh: $(df -h --output=avail . | tail -1 | tr -d ' ') free on disk before the build" >&2
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The end-to-end tests run the kiln binary: build it first, outside any test's time limit.
cargo build --quiet -p kiln
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
# nextest does not run doctests: the examples of docs/api.md compile here.
cargo test --doc --quiet -p kiln-client
echo "test.sh: the build and tests used $(du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | cut -f1) in its target folder" >&2
