"""Shared helpers for the benchmarks: percentiles, CPU time, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The layers of `bench layers`, floor first (here so the CLI can offer them without
# importing numpy).
LAYERS = ("direct", "copy", "pool", "engine", "device")


@dataclass(frozen=True)
class Case:
    """One case of `bench codec` (here so the CLI can list the cases without importing numpy)."""

    codec: str
    op: str  # "encode" | "decode"
    width: int
    height: int
    pix_fmt: str = "yuv420p"  # the encoder's input or the decoder's output, native on both sides

    @property
    def name(self) -> str:
        return f"{self.codec} {self.op} {self.height}p" + (" 10-bit" if self.pix_fmt.endswith("p10le") else "")


CODEC_CASES = (
    Case("h264", "encode", 1280, 720), Case("h264", "decode", 1280, 720),
    Case("h264", "encode", 1920, 1080), Case("h264", "decode", 1920, 1080),
    Case("hevc", "encode", 1280, 720), Case("hevc", "decode", 1280, 720),
    Case("hevc", "decode", 1280, 720, "yuv420p10le"),
    Case("vp8", "encode", 1280, 720), Case("vp8", "decode", 1280, 720),
    Case("vp9", "encode", 1280, 720), Case("vp9", "decode", 1280, 720),
)


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    if not s:
        return 0.0
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summary_us(samples_s: list[float]) -> dict[str, float]:
    us = [x * 1e6 for x in samples_s]
    return {"p50_us": round(pct(us, 50), 2), "p99_us": round(pct(us, 99), 2),
            "mean_us": round(statistics.fmean(us), 2) if us else 0.0, "n": len(us)}


def name_matches(name: str, only: Sequence[str]) -> bool:
    """Whether case ``name`` contains every word of one of ``only`` (true if ``only`` is empty)."""
    return not only or any(all(w in name for w in o.split()) for o in only)


def round_ratios(floor: list[float], other: list[float]) -> list[float]:
    """Per-round ratios ``other / floor`` of runs paired round by round."""
    return [b / a for a, b in zip(floor, other, strict=True)]


def cpu_seconds(pid: int | None = None, tid: int | None = None) -> float:
    """utime+stime from /proc: of a whole process (all its threads, also exited ones),
    or with ``tid`` of that one thread.  0.0 when it is gone."""
    pid = pid or os.getpid()
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(),
            "kernel": platform.release(), "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _cpu_model() -> str:
    """The first "model name" of /proc/cpuinfo ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def save(results: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
