from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hostd.config import Config
from hostd.daemon import Hostd
from vmediad import logs
from vmediad.sched import drop_realtime

logs.configure("warning", json=True)

HAVE_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None
needs_ffmpeg = pytest.mark.skipif(not HAVE_FFMPEG, reason="stock ffmpeg/ffprobe not installed (apt-get install ffmpeg)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture of the test: no thread of this process runs a real-time policy.  An
    earlier test's in-process SVT-AV1 encoder (run as root) leaves the main thread at SCHED_FIFO
    99; every process started from it would inherit that, and two TCG QEMUs spinning at it take
    both cores from everything else for good (the CI run that hung; vmediad/sched.py)."""
    drop_realtime()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: Unix socket paths must stay under 108 bytes."""
    d = tempfile.mkdtemp(prefix="vmd-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_hostd(short_tmp: Path) -> Iterator[Callable[..., Hostd]]:
    started: list[Hostd] = []

    def make(**kw: Any) -> Hostd:
        base = Config(socket=short_tmp / f"h{len(started)}.sock", channels=2, region_default=8 << 20,
                      spin_us=50)
        h = Hostd(replace(base, **kw))
        h.start()
        started.append(h)
        return h

    yield make
    for h in started:
        if h.device.state.value != "stopped":
            h.stop()


@pytest.fixture
def hostd(make_hostd: Callable[..., Hostd]) -> Hostd:
    return make_hostd()


def pytest_report_header(config: pytest.Config) -> str:
    return ("stock ffmpeg: " + ("found" if HAVE_FFMPEG else "NOT FOUND - ffmpeg-judged checks will be skipped")
            + f"; cpus={os.cpu_count()}")
