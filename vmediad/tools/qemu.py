"""Start and stop one QEMU guest built by vmediad.tools.vmimage, and read its console.

The guest runs a script from a share directory (mounted at the same path inside the guest) and
powers off; its serial console is QEMU's stdout, read line by line in a thread and stamped with
the time since QEMU started (``ConsoleLine.t``), so the caller can wait for a line and measure
boot time.  The script's exit status comes back on the console (``vmimage.EXIT_MARKER``).

QEMU stops cleanly on SIGTERM; ``stop`` sends it, then SIGKILL if QEMU does not exit in time.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmediad.tools.vmimage import EXIT_MARKER, RUN_SCRIPT


class QemuError(RuntimeError):
    """QEMU exited before the line a caller waited for, or could not start."""


@dataclass(frozen=True)
class ConsoleLine:
    t: float  # seconds since QEMU was started
    text: str


def write_run_script(share: Path, argv: Sequence[str], *, cwd: Path | None = None,
                     env: Mapping[str, str] | None = None) -> Path:
    """Write the script the guest runs: ``argv`` in ``cwd`` (default: the share) with ``env`` added."""
    lines = ["set -e", f"cd {shlex.quote(str(cwd or share))}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    lines.append("exec " + shlex.join(argv))
    path = share / RUN_SCRIPT
    path.write_text("\n".join(lines) + "\n")
    return path


class Guest:
    """One QEMU process and its console."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.lines: list[ConsoleLine] = []
        self.exit_status: int | None = None  # the run script's, from the console's last line
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr = tempfile.TemporaryFile()
        self._reader: threading.Thread | None = None
        self._t0 = 0.0
        self._eof = False

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self) -> Guest:
        self._t0 = time.monotonic()
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=self._stderr)
        except OSError as e:
            raise QemuError(f"cannot start {self.argv[0]}: {e.strerror}") from e
        self._reader = threading.Thread(target=self._read, name=f"qemu-console-{self._proc.pid}", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            text = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            line = ConsoleLine(time.monotonic() - self._t0, text)
            with self._cond:
                self.lines.append(line)
                if text.startswith(EXIT_MARKER) and text[len(EXIT_MARKER):].isdigit():
                    self.exit_status = int(text[len(EXIT_MARKER):])
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_line(self, match: str | Callable[[str], bool], timeout: float) -> ConsoleLine:
        """The first console line containing ``match`` (or for which it is true).

        TimeoutError after ``timeout``; QemuError if QEMU's console closed first."""
        def ok(text: str) -> bool:
            return match(text) if callable(match) else match in text

        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if ok(line.text):
                        return line
                seen = len(self.lines)
                if self._eof:
                    raise QemuError(f"QEMU exited before {match!r}: {self.describe()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no console line {match!r} within {timeout} s")
                self._cond.wait(left)

    def wait(self, timeout: float) -> int:
        """QEMU's exit code once it exits (the guest powered off: 0); TimeoutError otherwise."""
        assert self._proc is not None, "not started"
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"QEMU (pid {self._proc.pid}) still running after {timeout} s") from None
        if self._reader is not None:
            self._reader.join(5)  # the console's last lines are read after QEMU exits
        return code

    def stop(self, timeout: float = 5.0) -> int:
        """End QEMU: SIGTERM (a clean QEMU shutdown), SIGKILL if it is still there after ``timeout``."""
        assert self._proc is not None, "not started"
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self.wait(timeout)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def describe(self) -> str:
        """QEMU's stderr and the console's last lines: what to show when a guest failed."""
        tail = "\n".join(f"  [{ln.t:6.2f}] {ln.text}" for ln in self.lines[-20:])
        return f"qemu stderr: {self.stderr().strip() or '(empty)'}\nconsole tail:\n{tail}"

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.stop()
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> Guest:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
