#!/usr/bin/env bash
# Runs every benchmark; each reports ratios against a floor measured in the same run.
# One result file per benchmark lands in benchmarks/results/; docs/benchmarks.md explains them.
#   CODEC_RUNS=N  run `vmediad bench codec` N times and pool them into codec-pooled.json
#                 (codec.json is then the last run); default 1, no pooling.
#   PYTHON        the interpreter for the two scripts (default: python3).
# sched_policy.py sets SCHED_FIFO, which needs root; without it that benchmark is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
py=${PYTHON:-python3}
runs=${CODEC_RUNS:-1}

vmediad bench transport --json-out "$out/transport.json"

if [ "$runs" -gt 1 ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for i in $(seq "$runs"); do
    vmediad bench codec --json-out "$tmp/codec-$i.json"
  done
  vmediad bench combine "$tmp"/codec-*.json --json-out "$out/codec-pooled.json"
  cp "$tmp/codec-$runs.json" "$out/codec.json"
else
  vmediad bench codec --json-out "$out/codec.json"
fi

vmediad bench layers --blocks 100 --json-out "$out/layers.json"
vmediad bench display --json-out "$out/display.json"
"$py" benchmarks/hold_frames.py --blocks 150 --paths hold0,gap300,copy,hold16,hold16+copy+gap300 \
  --device 3x12 --json-out "$out/hold-frames.json"
if [ "$(id -u)" -eq 0 ]; then
  "$py" benchmarks/sched_policy.py --blocks 100 --device 3x12,3x24 --json-out "$out/sched-policy.json"
else
  echo "sched_policy.py skipped: SCHED_FIFO needs root" >&2
fi
