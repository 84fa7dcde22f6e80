#!/usr/bin/env bash
# First command of the README: install vmediad (builds the cffi core) and run the demo:
# hostd in-process, 4 fake VMs encoding, decoding, transcoding and playing at once, all shown on
# the shared screen (its live page's URL is printed; screen.png and screen.mp4 are left behind).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 \
  | { grep -v '^WARNING: Location' || true; }
# The module, not the script: the script's directory need not be on PATH (a user site, a venv not activated).
exec python3 -m vmediad demo "$@"
