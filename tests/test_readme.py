"""The README's guestlib example runs as written against a real hostd."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from hostd.daemon import Hostd

ROOT = Path(__file__).resolve().parent.parent


def test_readme_guestlib_example(hostd: Hostd) -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## guestlib in ten lines\n\n```python\n(.*?)```", text, re.S)
    assert block is not None
    code = block.group(1) + (
        "\nassert len(packets) == 60 and packets[0].is_keyframe\n"
        "assert sum(len(p.data) for p in packets) > 1000\nprint('ok', len(packets))\n"
    )
    env = {**os.environ, "VMEDIAD_SOCKET": hostd.socket_path}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok 60"


def test_readme_commands_exist() -> None:
    text = (ROOT / "README.md").read_text()
    assert "bash scripts/setup-and-demo.sh" in text and "bash scripts/test.sh" in text
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
