"""The codec benchmark's accounting (not its figures: timing claims live in docs/benchmarks.md)."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from vmediad.tools.bench import codec as cbench
from vmediad.tools.bench import layers as lbench
from vmediad.tools.bench.combine import CombineError, combine
from vmediad.tools.bench.common import cpu_seconds
from vmediad.tools.cli import main


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


def test_quick_codec_bench_runs_the_vp8_and_10_bit_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--quick --case` runs cases beyond the quick pair; each has both paths of the same run
    and its ratio is the median of their per-round ratios."""
    pytest.importorskip("av")
    monkeypatch.setattr(cbench, "QUICK_MIN_SECONDS", 0.0)  # the 2 rounds of --quick, no more
    out = tmp_path / "codec.json"
    r = CliRunner().invoke(main, ["bench", "codec", "--quick", "--frames", "12", "--case", "vp8",
                                  "--case", "10-bit", "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    cases = {c["case"]: c for c in res["cases"]}
    assert list(cases) == ["hevc decode 720p 10-bit", "vp8 encode 720p", "vp8 decode 720p"]
    for name, c in cases.items():
        assert name in r.output
        assert c["direct_fps"] > 0 and c["device_fps"] > 0 and c["ratio"] > 0
        rounds = c["runs"]
        assert len(rounds["direct"]) == len(rounds["device"]) == 2
        paired = statistics.median(b / a for a, b in zip(rounds["direct"], rounds["device"], strict=True))
        assert c["ratio"] == pytest.approx(paired, rel=0.02)  # the runs are rounded to 0.1 fps
    ten, vp8d = cases["hevc decode 720p 10-bit"], cases["vp8 decode 720p"]
    # Both paths hand out the stream's own format: no conversion on either side.
    assert ten["pix_fmt"] == "yuv420p10le" and ten["encoder_settings"] == {}
    assert ten["output_formats"] == {"direct": "yuv420p10le", "device": "yuv420p10le"}
    assert vp8d["output_formats"] == {"direct": "yuv420p", "device": "yuv420p"}
    assert cases["vp8 encode 720p"]["output_formats"] == {}
    for c in (ten, vp8d):
        assert c["no_space_retries"] == 0  # sized from the picture size from the first task
        assert c["bytes_copied_per_frame"] > 0  # at least the bitstream
    # VP8 pictures are decoded into the pool: only the bitstream is copied.
    assert vp8d["bytes_copied_per_frame"] < 1280 * 720
    for name in ("vp8 encode 720p", "vp8 decode 720p"):
        assert cases[name]["pix_fmt"] == "yuv420p"
        assert cases[name]["encoder_settings"] == {"threads": 1, "cpu-used": "-8"}


def test_codec_bench_refuses_a_path_that_hands_out_another_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode case whose paths do not both hand out its format stops before timing, with one line."""
    pytest.importorskip("av")
    monkeypatch.setattr(cbench, "output_formats", lambda dev, case, stream: {"direct": "yuv420p10le",
                                                                             "device": "yuv420p"})
    r = CliRunner().invoke(main, ["bench", "codec", "--quick", "--frames", "12", "--case", "10-bit"])
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == ("Error: hevc decode 720p 10-bit: decoded {'direct': 'yuv420p10le', "
                                         "'device': 'yuv420p'}, not yuv420p10le on both paths")


def test_ten_bit_pictures_keep_their_low_bits_through_the_stream() -> None:
    """The 10-bit case's pictures use the two bits 8-bit pictures lack, and its stream decodes
    natively to yuv420p10le at the case's size."""
    av = pytest.importorskip("av")
    pics8, pics10 = cbench.pictures(64, 48, 3), cbench.pictures10(64, 48, 3)
    assert [p.shape for p in pics10] == [(72, 64)] * 3 and pics10[0].dtype == np.uint16
    assert int(pics10[0].max()) <= 960 and int(pics10[0].min()) >= 64
    assert {int(x) for x in np.unique(pics10[0] & 3)} == {0, 1, 2, 3}
    assert np.abs(pics10[0].astype(np.int32) // 4 - pics8[0]).max() <= 1
    stream = cbench.stream10("hevc", 64, 48, pics10, 3)
    ctx = av.CodecContext.create("hevc", "r")
    frames = [f for d in [*stream, None] for f in ctx.decode(None if d is None else cbench._padded(d))]
    assert [(f.format.name, f.width, f.height) for f in frames] == [("yuv420p10le", 64, 48)] * 3
    with pytest.raises(ValueError, match="no 10-bit encoder for vp9"):
        cbench.stream10("vp9", 64, 48, pics10, 3)


def test_case_selection_matches_words_and_rejects_unknown_cases() -> None:
    names = [c.name for c in cbench.select(cbench.FULL, ["decode"])]
    assert names == ["h264 decode 720p", "h264 decode 1080p", "hevc decode 720p", "hevc decode 720p 10-bit",
                     "vp8 decode 720p", "vp9 decode 720p"]
    assert [c.name for c in cbench.select(cbench.FULL, ["h264 1080p", "vp9 encode"])] == [
        "h264 encode 1080p", "h264 decode 1080p", "vp9 encode 720p"]
    assert [c.name for c in cbench.select(cbench.FULL, ["10-bit"])] == ["hevc decode 720p 10-bit"]
    assert [c.name for c in cbench.select(cbench.FULL, ["vp8"])] == ["vp8 encode 720p", "vp8 decode 720p"]
    assert cbench.select(cbench.FULL, []) == cbench.FULL
    with pytest.raises(ValueError, match="no case matches"):
        cbench.select(cbench.FULL, ["av1"])


def _result(ratios_by_case: dict[str, list[tuple[float, float]]]) -> dict[str, object]:
    return {"cases": [{"case": name, "ratio": round(statistics.median(b / a for a, b in pairs), 3),
                       "runs": {"direct": [a for a, _ in pairs], "device": [b for _, b in pairs]}}
                      for name, pairs in ratios_by_case.items()]}


def test_combine_pools_paired_rounds_across_runs(tmp_path: Path) -> None:
    """Pooled median is over every paired round of every run, not the median of run medians."""
    run_a = _result({"x decode": [(100, 90), (100, 91), (100, 92)], "y encode": [(50, 50), (50, 60), (50, 40)]})
    run_b = _result({"y encode": [(50, 55), (50, 45), (50, 50)], "x decode": [(100, 100), (100, 101), (100, 102)]})
    pooled = combine([("a", run_a), ("b", run_b)], target=0.97)
    assert [p.case for p in pooled] == ["x decode", "y encode"]
    x, y = pooled
    # x: rounds 0.90 0.91 0.92 1.00 1.01 1.02: median 0.96, though run b alone has 1.01.
    assert (x.runs, x.rounds, x.run_ratios, x.median, x.runs_meeting, x.meets) == (2, 6, (0.91, 1.01), 0.96, 1, False)
    assert x.ci95[0] <= x.median <= x.ci95[1] and 0.90 <= x.ci95[0] and x.ci95[1] <= 1.02
    assert (y.median, y.meets) == (1.0, True)
    # The CLI prints the same, and writes it as JSON.
    for name, res in (("a.json", run_a), ("b.json", run_b)):
        (tmp_path / name).write_text(json.dumps(res))
    out = tmp_path / "pooled.json"
    r = CliRunner().invoke(main, ["bench", "combine", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                  "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    assert "0.960" in r.output and "1/2" in r.output
    assert [c["median"] for c in json.loads(out.read_text())["cases"]] == [0.96, 1.0]


def test_combine_refuses_files_it_cannot_pool(tmp_path: Path) -> None:
    good = _result({"x decode": [(100, 90)]})
    with pytest.raises(CombineError, match="no per-round"):
        combine([("old", {"cases": [{"case": "x decode", "ratio": 0.9}]})])
    with pytest.raises(CombineError, match="differ"):
        combine([("a", good), ("b", _result({"z encode": [(1, 1)]}))])
    with pytest.raises(CombineError, match="2 device rounds against 1"):
        combine([("a", {"cases": [{"case": "x", "runs": {"direct": [1.0], "device": [1.0, 2.0]}}]})])
    with pytest.raises(CombineError, match="no result files"):
        combine([])
    (tmp_path / "bad.json").write_text("{")
    r = CliRunner().invoke(main, ["bench", "combine", str(tmp_path / "bad.json")])
    assert r.exit_code == 2 and "not JSON" in r.output


def test_combine_pools_a_subset_of_cases_with_full_runs(tmp_path: Path) -> None:
    """`--case decode` pools decode-only runs with full runs; without it they differ."""
    full = _result({"x decode": [(100, 90), (100, 94)], "y encode": [(50, 50)]})
    part = _result({"x decode": [(100, 98), (100, 99)]})
    with pytest.raises(CombineError, match="differ"):
        combine([("full", full), ("part", part)])
    (x,) = combine([("full", full), ("part", part)], only=["decode"])
    # Rounds 0.90 0.94 0.98 0.99: median 0.96, from both files.
    assert (x.case, x.runs, x.rounds, x.median) == ("x decode", 2, 4, 0.96)
    with pytest.raises(CombineError, match="no case matches"):
        combine([("full", full)], only=["av1"])
    for name, res in (("full.json", full), ("part.json", part)):
        (tmp_path / name).write_text(json.dumps(res))
    out = tmp_path / "pooled.json"
    r = CliRunner().invoke(main, ["bench", "combine", str(tmp_path / "full.json"), str(tmp_path / "part.json"),
                                  "--case", "decode", "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    saved = json.loads(out.read_text())
    assert saved["only"] == ["decode"] and [c["case"] for c in saved["cases"]] == ["x decode"]
    assert saved["cases"][0]["rounds"] == 4


def test_layers_bench_checks_pictures_and_reports_each_layer_against_the_floor(tmp_path: Path) -> None:
    pytest.importorskip("av")
    out = tmp_path / "layers.json"
    r = CliRunner().invoke(main, ["bench", "layers", "--size", "320x240", "--frames", "24", "--blocks", "2",
                                  "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    assert "all 5 layers decode the same 24 pictures" in r.output
    res = json.loads(out.read_text())
    layers = {x["layer"]: x for x in res["layers"]}
    assert list(layers) == ["direct", "copy", "pool", "engine", "device"]
    assert layers["direct"]["speed"] == 1.0 and layers["direct"]["ci95"] == [1.0, 1.0]
    for x in layers.values():
        assert x["fps"] > 0 and x["ci95"][0] <= x["speed"] <= x["ci95"][1]
        assert len(res["seconds"][x["layer"]]) == 2
    assert layers["engine"]["thread_us_per_frame"] > 0  # the worker's code ran on this thread
    assert res["stream"] == {"depth": cbench.STREAM["decode"][0], "batch": cbench.STREAM["decode"][1],
                             "pool_frames": 48}
    bad = CliRunner().invoke(main, ["bench", "layers", "--layer", "nope"])
    assert bad.exit_code == 2


def test_layers_bench_refuses_a_layer_that_decodes_other_pictures(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("av")
    real = lbench._fresh_packets

    def drops_first(codec: str, s: Any, pool: bool, cb: Any) -> tuple[float, int]:
        seen: list[int] = []

        def skip(f: Any) -> None:
            seen.append(1)
            if len(seen) > 1:
                cb(f)
        return real(codec, s, pool, skip if cb is not None else None)

    monkeypatch.setattr(lbench, "_fresh_packets", drops_first)
    with pytest.raises(RuntimeError, match="layer copy decoded different pictures from frame 0"):
        lbench.run(width=320, height=240, frames=24, blocks=2, layers=("copy",))
    with pytest.raises(ValueError, match="unknown layers"):
        lbench.run(layers=("warp",))


def test_layers_scratch_keeps_chunks_output_and_pool_apart() -> None:
    """A stream of more than 8 MB (480 frames of 720p H.264) once ran into the engine layer's
    output table, which overwrote its later chunks: every range must be disjoint, and the
    chunks must read back as written."""
    stream = [bytes([i % 251]) * (50_000 + i) for i in range(240)]  # 12 MB of chunks
    s = lbench._Scratch(stream, 1280, 720, 4)
    try:
        ranges = sorted([(o, o + n) for o, n in s.chunks] + [(s.dst, s.dst + s.dst_len),
                                                             (s.pool, s.pool + s.pool_len)])
        assert all(a_end <= b for (_, a_end), (b, _) in itertools.pairwise(ranges))
        assert s.pool + s.pool_len <= len(s.mem)
        s.mem[s.dst:s.dst + s.dst_len] = b"\xff" * s.dst_len  # what a task's table may cover
        assert [bytes(s.mem[o:o + n]) for o, n in s.chunks] == stream
    finally:
        s.close()


def test_speed_interval_is_the_ratio_of_sums_with_a_paired_bootstrap() -> None:
    import random

    point, ci = lbench.speed_interval([1.0, 1.0, 2.0], [2.0, 2.0, 4.0], random.Random(0))
    assert point == 0.5 and ci == (0.5, 0.5)
    # The ratio of sums, not the mean of ratios: 4 / 5, though the per-block ratios average 0.833.
    point, ci = lbench.speed_interval([1.0, 3.0], [2.0, 3.0], random.Random(0), resamples=200)
    assert point == pytest.approx(0.8)
    assert 0.5 <= ci[0] <= 0.8 <= ci[1] <= 1.0
    with pytest.raises(ValueError):
        lbench.speed_interval([1.0], [1.0, 2.0], random.Random(0))


def _fifo_allowed() -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return True


def test_sched_policy_bench_reports_the_device_against_the_floor_of_each_policy(tmp_path: Path) -> None:
    pytest.importorskip("av")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "sched_policy.py"
    policies = ["other", "fifo"] if _fifo_allowed() else ["other"]
    out = tmp_path / "sched.json"
    r = subprocess.run([sys.executable, str(script), "--blocks", "2", "--policies", ",".join(policies),
                        "--device", "1x4,2x6", "--size", "320x240", "--json-out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["path"]: x for x in json.loads(out.read_text())["rows"]}
    assert list(rows) == [p for pol in policies for p in (f"direct {pol}", f"device 1x4 {pol}", f"device 2x6 {pol}")]
    assert rows["direct other"]["speed"] == 1.0
    for pol in policies:
        for shape in ("1x4", "2x6"):
            row = rows[f"device {shape} {pol}"]
            assert row["fps"] > 0 and row["ratio_ci95"][0] <= row["ratio_same_policy"] <= row["ratio_ci95"][1]
            assert row["worker_cpu_us_per_frame"] > 0
            if pol == "other":  # the same floor: both figures are one ratio
                assert row["ratio_same_policy"] == row["speed"]
    for bad in (["--policies", "rr"], ["--device", "3x0"], ["--size", "big"], ["--codec", "av1"]):
        e = subprocess.run([sys.executable, str(script), *bad], capture_output=True, text=True, timeout=60)
        assert e.returncode == 2, (bad, e.stderr)


def test_timed_blocks_sums_each_paths_counters_and_refuses_a_short_decode() -> None:
    calls: list[str] = []

    def path(name: str, seconds: float, n: int = 10) -> Any:
        def go() -> tuple[float, int, float, float]:
            calls.append(name)
            return seconds, n, 1.0, 0.5
        return go

    seen: list[int] = []
    times, sums = lbench.timed_blocks({"a": path("a", 2.0), "b": path("b", 3.0)}, 3, 10,
                                      lambda b, t: seen.append(b))
    assert times == {"a": [2.0, 2.0, 2.0], "b": [3.0, 3.0, 3.0]}
    assert sums == {"a": [3.0, 1.5], "b": [3.0, 1.5]}
    assert calls == ["a", "b", "a", "b", "a", "b"] and seen == [1, 2, 3]  # order of block_order
    with pytest.raises(RuntimeError, match="b gave 9 frames, not 10"):
        lbench.timed_blocks({"a": path("a", 1.0), "b": path("b", 1.0, 9)}, 2, 10)
