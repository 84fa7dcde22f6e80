#!/usr/bin/env bash
# Runs every benchmark; each reports ratios against a floor measured in the same run.
# Results land in benchmarks/results/*.json; docs/benchmarks.md summarises them.
set -euo pipefail
cd "$(dirname "$0")/.."
vmediad bench transport --json-out benchmarks/results/transport.json
vmediad bench codec --json-out benchmarks/results/codec.json
