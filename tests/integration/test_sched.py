"""No codec library leaves a thread on a real-time policy (vmediad/sched.py).

SVT-AV1 run as root switches the thread that opens an encoder, and every thread it starts, to
SCHED_FIFO 99.  Before the fix a guest's AV1 encode left its worker so, and the test run's main
thread too, whose children (two TCG QEMUs spinning at FIFO 99) then held both cores for good:
the CI run that hung.  The precondition is checked first, so these tests fail if the fix goes,
and skip where SVT-AV1 does not do it (not root)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import guestlib
from hostd.daemon import Hostd

REPO = Path(__file__).resolve().parents[2]

_PROBE = textwrap.dedent("""
    import json, os, sys
    from fractions import Fraction
    import av
    from codec_backend.options import _open_ctx
    from vmediad.sched import drop_realtime

    def policies():
        out = []
        for t in os.listdir("/proc/self/task"):
            try:
                out.append(os.sched_getscheduler(int(t)))
            except OSError:
                pass
        return sorted(set(out))

    def encoder():
        ctx = av.CodecContext.create("libsvtav1", "w")
        ctx.width, ctx.height, ctx.pix_fmt, ctx.time_base = 64, 64, "yuv420p", Fraction(1, 30)
        return ctx

    raw = encoder()
    raw.open()  # as SVT-AV1 does it
    res = {"raw": policies(), "dropped": drop_realtime(), "after_drop": policies()}
    kept = encoder()
    _open_ctx(kept, {"preset": "10"})  # as the codec worker opens every codec
    res["kept"] = policies()
    print(json.dumps(res))
""")


def _probe() -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SVT_LOG": "1"})
    assert out.returncode == 0, out.stderr
    import json

    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if res["raw"] == [os.SCHED_OTHER]:
        pytest.skip("SVT-AV1 left its threads on SCHED_OTHER here (it switches them only as root)")
    return res


def test_opening_a_codec_keeps_every_thread_off_real_time() -> None:
    res = _probe()
    assert os.SCHED_FIFO in res["raw"]  # SVT-AV1's own doing: the precondition
    assert isinstance(res["dropped"], int) and res["dropped"] > 1  # the opener and the threads it started
    assert res["after_drop"] == [os.SCHED_OTHER]
    assert res["kept"] == [os.SCHED_OTHER]  # _open_ctx: nothing to drop


def test_a_guests_av1_encode_leaves_its_worker_off_real_time(make_hostd: Callable[..., Hostd]) -> None:
    _probe()  # skips where SVT-AV1 does not switch policies
    h = make_hostd()
    with guestlib.attach(h.socket_path, name="av1") as dev:
        with dev.encoder("av1", 64, 64, 30) as enc:
            frame = enc.new_frame()
            for plane in frame.planes:
                plane[:] = np.uint8(128)
            packets = enc.encode(frame) + enc.flush()
        assert packets
        worker = h.device.statistics()["vms"][0]["worker_pid"]
        tids = os.listdir(f"/proc/{worker}/task")
        assert len(tids) > 2  # SVT-AV1's threads are there
        assert {os.sched_getscheduler(int(t)) for t in tids} == {os.SCHED_OTHER}
