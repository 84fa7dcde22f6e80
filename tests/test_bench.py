"""The codec benchmark's accounting (not its figures: timing claims live in docs/benchmarks.md)."""

from __future__ import annotations

import threading
import time

import pytest

from vmediad.bench import codec as cbench
from vmediad.bench.common import cpu_seconds


def test_cpu_seconds_of_one_thread() -> None:
    """Per-thread CPU from /proc counts the busy thread, not the idle one next to it."""
    tids: dict[str, int] = {}
    stop = threading.Event()

    def busy() -> None:
        tids["busy"] = threading.get_native_id()
        end = time.thread_time() + 0.4
        while time.thread_time() < end:
            pass
        stop.wait()

    t = threading.Thread(target=busy)
    t.start()
    while "busy" not in tids:
        time.sleep(0.01)
    me = threading.get_native_id()
    b0, m0 = cpu_seconds(tid=tids["busy"]), cpu_seconds(tid=me)
    time.sleep(0.6)
    b1, m1 = cpu_seconds(tid=tids["busy"]), cpu_seconds(tid=me)
    stop.set()
    t.join()
    assert b1 - b0 >= 0.2
    assert m1 - m0 <= 0.1
    assert cpu_seconds(tid=2**22 + 12345) == 0.0  # a thread that is gone reads as 0


def test_quick_codec_bench_reports_cpu_per_frame() -> None:
    pytest.importorskip("av")
    res = cbench.run(frames=12, quick=True, rounds=1)
    cases = {c["case"]: c for c in res["cases"]}
    assert set(cases) == {"h264 encode 720p", "h264 decode 720p"}
    for c in cases.values():
        cpu = c["cpu_us_per_frame"]
        assert cpu["direct"]["direct"] > 0
        dev = cpu["device"]
        assert set(dev) == {"guest", "hostd", "worker", "total"}
        assert dev["worker"] > 0  # the codec runs in the worker process
        assert dev["total"] == pytest.approx(dev["guest"] + dev["hostd"] + dev["worker"], abs=0.2)
        assert c["device_fps"] > 0 and c["direct_fps"] > 0
    # The decoder writes its pictures into the guest's frame pool: only the bitstream is
    # copied (once, into FFmpeg's padded packets), never the 1.5 bytes per pixel of planes.
    assert 0 < cases["h264 decode 720p"]["bytes_copied_per_frame"] < 1280 * 720 // 4
    assert cases["h264 encode 720p"]["bytes_copied_per_frame"] < 1280 * 720 // 4
    # The decoder knows the picture size: its output buffers fit from the first task.
    assert cases["h264 decode 720p"]["no_space_retries"] == 0


def test_case_selection_matches_words_and_rejects_unknown_cases() -> None:
    names = [c.name for c in cbench.select(cbench.FULL, ["decode"])]
    assert names == ["h264 decode 720p", "h264 decode 1080p", "hevc decode 720p", "vp9 decode 720p"]
    assert [c.name for c in cbench.select(cbench.FULL, ["h264 1080p", "vp9 encode"])] == [
        "h264 encode 1080p", "h264 decode 1080p", "vp9 encode 720p"]
    assert cbench.select(cbench.FULL, []) == cbench.FULL
    with pytest.raises(ValueError, match="no case matches"):
        cbench.select(cbench.FULL, ["av1"])
