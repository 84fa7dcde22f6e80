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
from typing import Any

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
        return self.wait(timeout)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to QEMU if it still runs (SIGTERM: a clean QEMU exit; the guest just stops)."""
        assert self._proc is not None, "not started"
        if self._proc.poll() is None:
            self._proc.send_signal(sig)

    def poll(self) -> int | None:
        """QEMU's exit code, or None while it runs."""
        assert self._proc is not None, "not started"
        return self._proc.poll()

    def kill(self, timeout: float = 30.0) -> int:
        """SIGKILL QEMU (a VM that dies without a word) and reap it; its exit code (-9).
        TimeoutError if it is still not gone after ``timeout`` (stuck in the kernel)."""
        assert self._proc is not None, "not started"
        if self._proc.poll() is None:
            self._proc.kill()
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


# --- `vmediad bench transport --kind qemu` ----------------------------------------------------
BENCH_MARK = "vmediad-bench "
_BENCH_GUEST = r'''
import json, sys, time
import guestlib
from vmediad import ivshmem

n = int(sys.argv[1])
dev = guestlib.attach()
buf = dev.alloc(64)
ping, pong = buf.offset, buf.offset + 8  # one word each way, own cache lines apart
reg = dev.region
regs = dev._regs
print("vmediad-bench-buf", buf.offset, flush=True)
time.sleep(0.2)

def pct(lat):
    lat.sort()
    return {"p50_us": round(lat[len(lat) // 2] / 1000, 2), "p99_us": round(lat[int(len(lat) * 0.99)] / 1000, 2)}

def pingpong(ring):
    lat = []
    for i in range(1, n + 1):
        t = time.perf_counter_ns()
        reg.store32(ping, i)
        if ring:
            regs[ivshmem.REG_DOORBELL // 4] = ivshmem.doorbell_value(0, 1)
        while reg.load32(pong) != i:
            pass
        lat.append(time.perf_counter_ns() - t)
    reg.store32(ping, 0)
    reg.store32(pong, 0)
    return pct(lat)

def nops():
    lat = []
    for _ in range(n):
        t = time.perf_counter_ns()
        dev.nop().wait()
        lat.append(time.perf_counter_ns() - t)
    return pct(lat)

res = {"floor_spin": pingpong(False)}
print("vmediad-bench-phase doorbell", flush=True)
time.sleep(0.2)
res["floor_doorbell"] = pingpong(True)
dev.interrupts = False
res["nop_poll"] = nops()
if dev.uio is not None:
    dev.interrupts, dev.spins = True, 0
    res["nop_interrupt"] = nops()
print("vmediad-bench " + json.dumps(res), flush=True)
'''


def bench_transport(n: int = 2000, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """NOP round trips VM <-> hostd (poll, and interrupt where igb_uio is built) against the raw
    ivshmem floors measured in the same VM: shared memory with both sides spinning, and a
    Doorbell to a host eventfd with the guest spinning for the reply.  hostd runs in-process."""
    import json
    import os
    import select
    import shutil
    import sys

    from hostd.config import Config
    from hostd.daemon import Hostd
    from vmediad import ivshmem
    from vmediad.tools import vmimage

    d = Path(tempfile.mkdtemp(prefix="vmd-bq-"))
    share = d / "share"
    share.mkdir()
    h = Hostd(Config(socket=d / "h.sock", channels=2, region_default=8 << 20, ivshmem_dir=str(d)))
    h.start()
    stop = threading.Event()
    try:
        assert h.ivshmem is not None
        sock = h.ivshmem.listen("bench")
        image = vmimage.build_image()
        accel = vmimage.detect_accel()
        (share / "bench.py").write_text(_BENCH_GUEST)
        write_run_script(share, [sys.executable, str(share / "bench.py"), str(n)], cwd=share,
                         env={"VMEDIAD_TRANSPORT": "ivshmem"})
        argv = vmimage.qemu_command(image, share, accel=accel, ivshmem_socket=sock, vectors=ivshmem.VECTORS)
        progress(f"booting a QEMU VM ({accel.name.upper()}: {accel.reason})")
        with Guest(argv) as guest:
            line = guest.wait_line("vmediad-bench-buf", 90)
            off = int(line.text.split()[1])
            g = next(x for x in h.device.guests.values() if x.name == "bench")
            link = h.ivshmem.links["bench"]
            reg = g.region.mapped
            ring_fd = link.host_fds[1]  # host vector 1: the bench's (reserved otherwise)

            def responder() -> None:
                # Echo ping into pong: spinning, then (after the phase line) after each eventfd.
                seen = 0
                while not stop.is_set():
                    v = reg.load32(off)
                    if v != seen and v != 0:
                        seen = v
                        reg.store32(off + 8, v)
                    if doorbell.is_set():
                        select.select([ring_fd], [], [], 0.05)
                        try:
                            os.eventfd_read(ring_fd)
                        except BlockingIOError:
                            pass

            doorbell = threading.Event()
            t = threading.Thread(target=responder, daemon=True)
            t.start()
            progress(f"raw ivshmem ping-pong, {n} round trips")
            guest.wait_line("vmediad-bench-phase doorbell", 120)
            doorbell.set()
            progress("doorbell ping-pong, then NOP round trips")
            res_line = guest.wait_line(BENCH_MARK, 300)
            stop.set()
            t.join(2)
            boot = guest.lines[0].t if guest.lines else 0.0
        res: dict[str, Any] = json.loads(res_line.text[len(BENCH_MARK):])
        res.update(accel=accel.name, accel_reason=accel.reason, n=n, first_console_line_s=round(boot, 2),
                   poll_vs_floor=round(res["nop_poll"]["p50_us"] / res["floor_doorbell"]["p50_us"], 2))
        return res
    finally:
        stop.set()
        h.stop()
        shutil.rmtree(d, ignore_errors=True)
