"""Soak run: many guests, mixed tasks, corrupt streams, hostd restarts; figures out.

Usage::

    from vmediad.tools.soak import run
    report = run(tasks=100_000, guests=4, corrupt_ratio=0.05, restarts=3,
                 progress_cb=lambda done, note: None)

``run`` starts hostd as a subprocess (``python -m vmediad hostd``) on a
private socket, with fault injection on and workers recycled by task count and
RSS, and spawns ``guests`` guest processes that share ``tasks`` descriptors:
NOP, CRC32, COPY and H.264 DECODE of a valid stream (checked against an
in-process PyAV decode), plus ``corrupt_ratio`` of corrupt work (bit-flipped or
truncated streams, and buffers carrying the worker-crash marker).  Every result
is checked.  ``restarts`` times, evenly spread, hostd is SIGKILLed and a new one
is started on the same socket; the guests re-adopt their regions.

``progress_cb(done, note)`` is called about twice a second from the calling
thread (``note`` is a short status line).  The returned dict holds the counts
per outcome, mismatches (must be 0), the task rate, per hostd process (one per
restart) its RSS, fd and /dev/shm counts after warm-up (a tenth of its tasks)
and at its end with the guests attached, hostd's fd count with no guest before
and after the run, worker recycles and crashes, the
re-attach time after each restart, and ``ok`` (every check passed).

``HostdProcess`` (hostd as a subprocess that can be SIGKILLed and restarted on
the same socket) is shared with the test-suite.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

from vmediad.sched import keep_scheduling

ProgressCb = Callable[[int, str], None]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    path.write_text("\n".join(lines) + "\n")
    return path


class HostdProcess:
    """hostd as a child process on a fixed socket path: start, SIGKILL, restart, inspect."""

    def __init__(self, socket_path: Path, *, channels: int = 2, fault_injection: bool = False,
                 config: dict[str, dict[str, Any]] | None = None, log_path: Path | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.channels = channels
        self.fault_injection = fault_injection
        self.config_path = write_config(self.socket_path.with_suffix(".toml"), config or {})
        self.log_path = log_path or self.socket_path.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def socket(self) -> str:
        return str(self.socket_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "vmediad", "hostd", "--socket", str(self.socket_path),
               "--channels", str(self.channels), "--config", str(self.config_path), "--log-level", "warning"]
        if self.fault_injection:
            cmd.append("--fault-injection")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.starts += 1
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hostd exited {self.proc.returncode} at start; see {self.log_path}")
            try:
                self.status(timeout=1.0)
                return
            except Exception:
                time.sleep(0.02)
        raise RuntimeError(f"hostd did not come up within {timeout}s; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, exactly as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        from guestlib.device import hostd_status

        return hostd_status(self.socket, timeout)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def shm_entries() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("vmediad-")}
    except OSError:
        return set()


# --- streams ----------------------------------------------------------------------------------
ENCODERS: dict[str, tuple[str, dict[str, str]]] = {
    "h264": ("libx264", {"preset": "ultrafast", "tune": "zerolatency"}),
    "hevc": ("libx265", {"preset": "ultrafast", "tune": "zerolatency", "x265-params": "log-level=error"}),
    "vp9": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}),
    "av1": ("libsvtav1", {"preset": "10"}),
}


def encode_packets(codec: str, width: int = 64, height: int = 64, frames: int = 12, seed: int = 0,
                   gop: int = 6) -> list[bytes]:
    """A small valid stream (moving gradient plus noise), one bytes object per packet."""
    from fractions import Fraction

    import av
    import numpy as np

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner to stderr otherwise
    impl, opts = ENCODERS[codec]
    ctx: Any = av.CodecContext.create(impl, "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base = Fraction(1, 30)
    ctx.framerate = 30
    ctx.gop_size = gop
    ctx.options = dict(opts)
    with keep_scheduling():  # SVT-AV1 run as root would leave this thread at SCHED_FIFO 99
        ctx.open()
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.arange(height), np.arange(width)) % 256
    chroma = np.full((height // 2, width), 128, np.uint8)
    packets: list[bytes] = []
    for i in range(frames):
        luma = (base + (3 * i + seed) % 256).astype(np.uint8) ^ rng.integers(0, 16, (height, width), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(np.vstack([luma, chroma]), format="yuv420p")
        frame.pts = i
        packets += [bytes(p) for p in ctx.encode(frame)]
    packets += [bytes(p) for p in ctx.encode(None)]
    return packets


def reference_decode(codec: str, packets: list[bytes]) -> list[str]:
    """md5 of each decoded frame (unpadded yuv420p planes), decoded in-process with PyAV."""
    import av

    from vmediad.abi import DECODER_IMPL, Codec

    impl = DECODER_IMPL[Codec[codec.upper()]]
    ctx: Any = av.CodecContext.create(impl, "r")
    out: list[str] = []
    for data in [*packets, None]:
        for frame in ctx.decode(None if data is None else av.Packet(data)):
            out.append(frame_md5(frame.to_ndarray(format="yuv420p").reshape(-1).tobytes()))
    return out


def frame_md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def corrupt(packets: list[bytes], rng: random.Random) -> tuple[str, list[bytes]]:
    """A corrupt variant of a valid stream: bit flips, truncation, or garbage splices."""
    kind = rng.choice(["flip", "flip", "flip_header", "truncate", "truncate_packet", "splice", "drop"])
    pk = [bytearray(p) for p in packets]
    if kind in ("flip", "flip_header"):
        for _ in range(rng.randint(1, 12)):
            i = 0 if kind == "flip_header" else rng.randrange(len(pk))
            if pk[i]:
                j = rng.randrange(min(len(pk[i]), 64) if kind == "flip_header" else len(pk[i]))
                pk[i][j] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        stream = b"".join(pk)
        cut = rng.randrange(1, max(2, len(stream)))
        keep: list[bytearray] = []
        used = 0
        for p in pk:
            if used + len(p) >= cut:
                if cut - used > 0:
                    keep.append(p[: cut - used])
                break
            keep.append(p)
            used += len(p)
        pk = keep or [pk[0][:1]]
    elif kind == "truncate_packet":
        i = rng.randrange(len(pk))
        pk[i] = pk[i][: rng.randrange(max(1, len(pk[i])))] or bytearray(b"\0")
    elif kind == "splice":
        i = rng.randrange(len(pk))
        j = rng.randrange(len(pk[i]) + 1)
        pk[i][j:j] = rng.randbytes(rng.randint(1, 256))
    else:
        del pk[rng.randrange(len(pk))]
        pk = pk or [bytearray(b"\0")]
    return kind, [bytes(p) for p in pk if p]


# --- the soak run -----------------------------------------------------------------------------
STREAM_FRAMES = 12


def _guest(sock: str, name: str, seed: int, quota: int, corrupt_ratio: float, reports: Any, finish: Any) -> None:
    """One soak guest (a spawned process): ``quota`` descriptors, every result checked."""
    import guestlib
    from codec_backend.engine import CRASH_MARKER
    from guestlib.device import DeviceError, SessionLost
    from vmediad import abi
    from vmediad.abi import ErrorCode, Op, Status

    rng = random.Random(seed)
    dev = guestlib.attach(sock, name=name, region_size=32 << 20, ring_entries=64)
    reg = dev.region
    outcomes: Counter[str] = Counter()
    errors: list[str] = []
    done = corrupt_done = streams_ok = 0
    data = rng.randbytes(1 << 20)
    src = dev.put(data)
    dst = dev.alloc(256 << 10)
    bomb = dev.put(CRASH_MARKER + rng.randbytes(4096))
    bomb_crc = zlib.crc32(bomb.mem)
    valid = encode_packets("h264", 64, 64, STREAM_FRAMES, seed)
    want = reference_decode("h264", valid)
    last_report = 0.0

    def report(final: bool = False) -> None:
        reports.put((name, done, corrupt_done, dict(outcomes), errors[:20], streams_ok, final))

    def stream(packets: list[bytes], check: bool) -> int:
        """Open, decode every packet, flush, close: returns the descriptors used."""
        nonlocal streams_ok
        before = reg.load64(abi.REG_EPOCH)
        dec = dev.decoder("h264", parse=False)
        after = reg.load64(abi.REG_EPOCH)
        used = 1
        md5s: list[str] = []
        try:
            for p in [*packets, None]:
                used += 1
                try:
                    frames = dec.flush() if p is None else dec.decode(p)
                except SessionLost:
                    raise
                except DeviceError as e:
                    if check or e.code not in (ErrorCode.INVALID_DATA, ErrorCode.TOO_LARGE):
                        errors.append(f"DECODE ended {e.code.name}")
                    outcomes[e.code.name] += 1
                    continue
                outcomes["OK"] += 1
                md5s += [frame_md5(f.to_ndarray().tobytes()) for f in frames]
            if check:
                if md5s != want:
                    errors.append("decoded frames differ from the reference")
                else:
                    streams_ok += 1
        except SessionLost:
            outcomes["SESSION_LOST"] += 1
            if before == after and reg.load64(abi.REG_EPOCH) == after:
                errors.append("SessionLost without a hostd restart")
        dec.close()
        return used + 1

    try:
        while done < quota:
            if time.monotonic() - last_report > 0.5:
                last_report = time.monotonic()
                report()
            corrupt_now = corrupt_done < corrupt_ratio * (done + 1)
            if corrupt_now and rng.random() < 0.15:
                # A buffer carrying the crash marker: the worker dies of SIGSEGV.
                c = dev.crc32(bomb).completion(timeout=30)
                done += 1
                corrupt_done += 1
                if c.status == Status.ERROR and c.error == ErrorCode.WORKER_CRASHED:
                    outcomes["WORKER_CRASHED"] += 1
                elif c.status == Status.DONE and c.result == bomb_crc:
                    outcomes["OK (crash raced the task)"] += 1
                else:
                    errors.append(f"crash-marker task ended {c.status.name}/{c.error.name}")
            elif corrupt_now:
                kind, packets = corrupt(valid, rng)
                outcomes["corrupt " + kind] += 1
                n = stream(packets, check=False)
                done += n
                corrupt_done += n
            else:
                job = rng.random()
                if job < 0.15:
                    done += stream(valid, check=True)
                    continue
                plan: list[tuple[str, Any]] = []
                with dev.batch() as b:
                    for _ in range(rng.randint(1, 16)):
                        r = rng.random()
                        if r < 0.3:
                            b.nop()
                            plan.append(("nop", None))
                        elif r < 0.65:
                            off, n = rng.randrange(len(data) - 65536), rng.randint(1, 65536)
                            b.add(Op.CRC32, src=(src.offset + off, n))
                            plan.append(("crc", zlib.crc32(data[off : off + n])))
                        else:
                            off, n = rng.randrange(len(data) - 4096), rng.randint(1, 4096)
                            at = dst.offset + 4096 * len(plan)
                            b.add(Op.COPY, src=(src.offset + off, n), dst=(at, n))
                            plan.append(("copy", (at, data[off : off + n])))
                for t, (kind, want_) in zip(b.tasks, plan, strict=True):
                    c = t.completion(timeout=60)
                    done += 1
                    if c.status != Status.DONE:
                        errors.append(f"{kind} ended {c.status.name}/{c.error.name}")
                        continue
                    outcomes["OK"] += 1
                    if kind == "crc" and c.result != want_:
                        errors.append("CRC32 result differs")
                    elif kind == "copy" and bytes(reg.mem[want_[0] : want_[0] + len(want_[1])]) != want_[1]:
                        errors.append("COPY result differs")
        report(final=True)
        finish.wait(600)
    except BaseException as e:
        errors.append(f"guest died: {type(e).__name__}: {e}")
        report(final=True)
        raise
    finally:
        dev.close()


def _idle_fds(h: HostdProcess) -> int:
    """hostd's fd count once the control connections it just served are closed."""
    counts = []
    for _ in range(6):
        time.sleep(0.05)
        counts.append(h.fd_count())
    return min(counts)


def _rss(h: HostdProcess) -> int:
    try:
        return h.rss_bytes()
    except OSError:
        return 0


def run(tasks: int = 100_000, guests: int = 4, corrupt_ratio: float = 0.05, restarts: int = 0,
        progress_cb: ProgressCb | None = None, *, channels: int = 2, recycle_tasks: int = 5000,
        recycle_rss_mb: int = 512, seed: int = 1) -> dict[str, Any]:
    """Run the soak and return its figures (see the module docstring)."""
    ctx = mp.get_context("spawn")
    work = Path(tempfile.mkdtemp(prefix="vmsoak-"))
    cb = progress_cb or (lambda _done, _note: None)
    h = HostdProcess(work / "h.sock", channels=channels, fault_injection=True, config={
        "workers": {"recycle_tasks": recycle_tasks, "recycle_rss_mb": recycle_rss_mb},
        "limits": {"max_width": 1024, "max_height": 1024},
    })
    shm_before = len(shm_entries())
    h.start()
    fd_idle_before = _idle_fds(h)
    reports, finish = ctx.Queue(), ctx.Event()
    quotas = [tasks // guests + (1 if i < tasks % guests else 0) for i in range(guests)]
    procs = [ctx.Process(target=_guest, args=(h.socket, f"soak{i}", seed * 1000 + i, q, corrupt_ratio, reports,
                                              finish), daemon=True) for i, q in enumerate(quotas)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    state: dict[str, tuple[int, int, dict[str, int], list[str], int, bool]] = {}
    restart_at = [tasks * (k + 1) // (restarts + 1) for k in range(restarts)]
    # One segment per hostd process: its RSS and fds after warm-up (a tenth of the
    # segment's tasks) and at its end (just before the SIGKILL, or the end of the run).
    bounds = [0, *restart_at, tasks]
    segments: list[dict[str, Any]] = [{"warm_at": a + max(1, (b - a) // 10)} for a, b in pairwise(bounds)]
    reattach_s: list[float] = []
    seen: dict[tuple[int, str], tuple[int, int]] = {}  # (epoch, guest) -> (worker restarts, recycles)
    worker_rss_max = 0
    dead: list[str] = []
    last_poll = 0.0

    def done_total() -> int:
        return sum(v[0] for v in state.values())

    def figures() -> dict[str, int]:
        return {"rss": _rss(h), "fd": _idle_fds(h), "shm": len(shm_entries())}

    def poll() -> None:
        nonlocal worker_rss_max
        try:
            st = h.status()
        except Exception:
            return
        for v in st["vms"]:
            seen[(st["epoch"], v["name"])] = (v.get("worker_restarts", 0), v.get("worker_recycles", 0))
            worker_rss_max = max(worker_rss_max, v.get("worker_rss", 0))

    try:
        while len([v for v in state.values() if v[5]]) < guests:
            try:
                msg = reports.get(timeout=0.5)
                state[msg[0]] = msg[1:]
            except queue.Empty:
                pass
            for i, p in enumerate(procs):
                if not p.is_alive() and not state.get(f"soak{i}", (0, 0, {}, [], 0, False))[5]:
                    dead.append(f"soak{i} exited {p.exitcode}")
                    state[f"soak{i}"] = (0, 0, {}, [f"process exited {p.exitcode}"], 0, True)
            now = time.monotonic()
            if now - last_poll > 0.5:
                last_poll = now
                poll()
            total = done_total()
            seg = segments[len(reattach_s)]
            if "warm" not in seg and total >= seg["warm_at"]:
                seg["warm"] = figures()
            if restart_at and total >= restart_at[0]:
                restart_at.pop(0)
                poll()
                seg["end"] = figures()
                t_kill = time.monotonic()
                h.kill()
                h.start()
                end = time.monotonic() + 30
                while time.monotonic() < end and h.status()["guests"] < guests:
                    time.sleep(0.01)
                reattach_s.append(round(time.monotonic() - t_kill, 3))
            cb(total, f"{len(reattach_s)}/{restarts} restarts, {total / max(1e-9, now - t0):.0f} tasks/s")
        elapsed = time.monotonic() - t0
        poll()
        segments[len(reattach_s)]["end"] = figures()
        finish.set()
        for p in procs:
            p.join(60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and h.status()["guests"]:
            time.sleep(0.05)
        fd_idle_after = _idle_fds(h)
        alive = h.alive()
    finally:
        finish.set()
        for p in procs:
            if p.is_alive():
                p.kill()
        rc = h.stop()
        log = h.log_text()
        shutil.rmtree(work, ignore_errors=True)
    outcomes: Counter[str] = Counter()
    errors: list[str] = list(dead)
    for _done, _corrupt, oc, errs, _ok, _final in state.values():
        outcomes.update(oc)
        errors += errs
    crashes = sum(r for r, _ in seen.values())
    recycles = sum(c for _, c in seen.values())
    done = done_total()
    corrupt_tasks = sum(v[1] for v in state.values())
    measured = [sg for sg in segments if "warm" in sg and "end" in sg]
    for sg in measured:
        sg["rss_growth_pct"] = round(100.0 * (sg["end"]["rss"] - sg["warm"]["rss"]) / max(1, sg["warm"]["rss"]), 2)
    growth = max((sg["rss_growth_pct"] for sg in measured), default=0.0)
    flat = all(sg["warm"]["fd"] == sg["end"]["fd"] and sg["warm"]["shm"] == sg["end"]["shm"] for sg in measured)
    result: dict[str, Any] = {
        "tasks": done, "guests": guests, "corrupt_tasks": corrupt_tasks,
        "corrupt_share": round(corrupt_tasks / max(1, done), 4), "restarts": len(reattach_s),
        "seconds": round(elapsed, 1), "tasks_per_s": round(done / max(1e-9, elapsed)),
        "outcomes": dict(sorted(outcomes.items())), "errors": errors[:50], "mismatches": len(errors),
        "streams_ok": sum(v[4] for v in state.values()),
        "hostd": {
            "segments": [{"warm_after_tasks": sg["warm_at"], "rss_warm_mb": round(sg["warm"]["rss"] / 2**20, 1),
                          "rss_end_mb": round(sg["end"]["rss"] / 2**20, 1), "rss_growth_pct": sg["rss_growth_pct"],
                          "fd_warm": sg["warm"]["fd"], "fd_end": sg["end"]["fd"], "shm_warm": sg["warm"]["shm"],
                          "shm_end": sg["end"]["shm"]} for sg in measured],
            "rss_growth_pct_max": growth, "fd_idle_before": fd_idle_before, "fd_idle_after": fd_idle_after,
            "shm_before": shm_before, "shm_after": len(shm_entries()), "alive_at_end": alive, "exit_code": rc,
            "internal_errors": log.count("device loop crashed")},
        "workers": {"crash_respawns": crashes, "recycles": recycles, "recycle_tasks": recycle_tasks,
                    "recycle_rss_mb": recycle_rss_mb, "rss_max_mb": round(worker_rss_max / 2**20, 1)},
        "reattach_s": reattach_s,
    }
    result["ok"] = bool(
        not errors and done >= tasks and alive and rc == 0 and measured and growth < 5.0 and flat
        and fd_idle_after == fd_idle_before and result["hostd"]["internal_errors"] == 0
    )
    return result
