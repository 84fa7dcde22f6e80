"""The README's guestlib example runs as written against a real hostd."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from hostd.daemon import Hostd

ROOT = Path(__file__).resolve().parents[2]


def example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## guestlib in ten lines\n\n.*?```python\n(.*?)```", text, re.S)
    assert block is not None
    return block.group(1) + (
        "\nassert len(packets) == 60 and packets[0].is_keyframe\n"
        "assert sum(len(p.data) for p in packets) > 1000\nprint('ok', len(packets))\n"
    )


def test_readme_example_finds_hostd_on_the_default_socket(short_tmp: Path) -> None:
    """As printed: `vmediad hostd` with no --socket, the example with no VMEDIAD_SOCKET.  The
    default path is redirected with RUNTIME_DIRECTORY (the first rule), for both sides."""
    env = {k: v for k, v in os.environ.items() if k != "VMEDIAD_SOCKET"}
    env["RUNTIME_DIRECTORY"] = str(short_tmp)
    proc = subprocess.Popen([sys.executable, "-m", "vmediad", "hostd", "--channels", "1",
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        sock = short_tmp / "hostd.sock"
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), "hostd did not make its socket on the default path"
        r = subprocess.run([sys.executable, "-c", example()], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "ok 60"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_readme_guestlib_example(hostd: Hostd) -> None:
    code = example()
    env = {**os.environ, "VMEDIAD_SOCKET": hostd.socket_path}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok 60"


def test_readme_commands_exist() -> None:
    text = (ROOT / "README.md").read_text()
    assert "bash scripts/setup-and-demo.sh" in text and "bash scripts/test.sh" in text
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_links_resolve_inside_the_repo() -> None:
    text = (ROOT / "README.md").read_text()
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
