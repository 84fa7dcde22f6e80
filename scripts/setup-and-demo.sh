#!/usr/bin/env bash
# First command of the README: install vmediad (builds the cffi core) and run the demo:
# hostd in-process, 4 fake VMs encoding, decoding and transcoding at once.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec vmediad demo "$@"
