#!/usr/bin/env bash
# Second command of the README (and exactly what .ci/run runs): the test suite plus lint and types.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing stock ffmpeg (the outside judge of bitstreams)..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg) \
      >/tmp/vmediad-apt.log 2>&1 || echo "WARNING: apt-get install ffmpeg failed; ffmpeg-judged tests will skip"
  else
    echo "NOTE: stock ffmpeg not installed and not root; ffmpeg-judged tests will skip"
  fi
fi
# Debian's chromium for the live page's browser test; without it that test skips and says so.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium (the live page's browser test)..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
      >>/tmp/vmediad-apt.log 2>&1 || echo "WARNING: apt-get install chromium failed; the browser test will skip"
  else
    echo "NOTE: chromium not installed and not root; the browser test will skip"
  fi
fi
# QEMU, a guest kernel and igb_uio for the real-VM tests; without them those tests skip and say so.
bash scripts/setup-vm.sh || echo "WARNING: scripts/setup-vm.sh failed; the QEMU tests will skip"
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 \
  | { grep -v '^WARNING: Location' || true; }
python3 -m pytest -q -p no:cacheprovider "$@"
python3 -m ruff check .
python3 -m mypy .  # the packages and the tests
