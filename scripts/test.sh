#!/usr/bin/env bash
# Runs every test: installs what the build and tests need, checks formatting, then runs unit, property
# and end-to-end tests (which start their own kiln processes on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
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
