#!/usr/bin/env bash
# The main job: builds kiln, starts the whole cluster in one process on the embedded default and writes
# one generated image through the public gRPC API.  Usage: scripts/up.sh [PROMPT] [OUTPUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="${1:-a red triangle above a blue star}"
output="${2:-kiln.png}"
scripts/bootstrap.sh
cargo build --quiet -p kiln
exec ./target/debug/kiln up --generate "$prompt" --output "$output"
