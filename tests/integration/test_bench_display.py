"""The shared-screen benchmark's accounting (not its figures: timing claims live in docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vmediad.tools.bench import display as dbench
from vmediad.tools.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One `vmediad bench display --quick` run: its JSON and its stdout."""
    pytest.importorskip("av")
    out = tmp_path_factory.mktemp("bench") / "display.json"
    r = CliRunner().invoke(main, ["bench", "display", "--quick", "--json-out", str(out)])
    assert r.exit_code == 0, (r.output, r.stderr)
    assert "guests attached, displays open" in r.stderr  # progress goes to stderr
    return json.loads(out.read_text()), r.stdout


def test_quick_run_prints_the_three_tables(quick: tuple[dict[str, Any], str]) -> None:
    res, text = quick
    assert "display: composition per screen frame" in text
    assert "display end to end: 4 guests x 160x96 bgra at 30 fps" in text
    assert "codec beside the display: h264 decode 240p" in text
    e2e = res["end_to_end"]
    assert f"{e2e['commits']}: {e2e['presented']} + {e2e['dropped']}" in text
    assert f"{res['codec']['idle']['ratio']:.3f}" in text
    assert res["quick"] is True


def test_composition_cost_against_its_floor(quick: tuple[dict[str, Any], str]) -> None:
    rows = quick[0]["compose"]
    assert [r["format"] for r in rows] == ["bgra", "nv12"]
    for r in rows:
        assert r["vms"] == 4 and r["picture"] == r["screen"] == "320x180"
        assert r["floor_ms"] > 0 and r["compose_ms"] > 0 and r["ratio"] > 0
        assert r["ratio"] == pytest.approx(r["compose_ms"] / r["floor_ms"], rel=0.01)
        assert r["max_fps"] == pytest.approx(1000 / r["compose_ms"], rel=0.01)
        assert 0 < r["kept_ms"] < r["compose_ms"]  # kept scaled images: no swscale call


def _check_end_to_end(e2e: dict[str, Any], threads: int, hz: float = 60.0) -> None:
    assert e2e["display_threads"] == threads and e2e["vms"] == 4 and e2e["refresh_hz"] == hz
    assert e2e["refresh_interval_ms"] == pytest.approx(1000 / hz, abs=0.01)
    assert e2e["compositions"] > 0 and e2e["screen_fps"] > 0
    assert e2e["screen_fps"] == pytest.approx(e2e["compositions"] / e2e["seconds"], rel=0.02)
    assert e2e["compose_cpu_ms_per_frame"] > 0
    for lat in (e2e["latency_complete"], e2e["latency_latch"]):
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert lat["n"] == e2e["presented"]
    # Each commit is latched at a tick before its task completes (after the composition).
    assert e2e["latency_latch"]["p50_ms"] <= e2e["latency_complete"]["p50_ms"]
    assert e2e["latency_latch"]["max_ms"] <= e2e["latency_complete"]["max_ms"]
    goals = e2e["goals"]
    assert set(goals) == {"screen_fps", "latency_p99"}
    assert goals["latency_p99"]["met"] is (e2e["latency_complete"]["p99_ms"] <= e2e["refresh_interval_ms"])
    assert goals["screen_fps"]["met"] is (e2e["compositions"] + 1 >= hz * e2e["seconds"])
    # Pictures are scaled when committed; a composition shows such an image or scales it itself.
    # (An image scaled just before the first snapshot may be shown just after it: one per VM.)
    assert e2e["prescaled"] > 0 and 0 < e2e["prescale_shown"] <= e2e["prescaled"] + e2e["vms"]
    assert e2e["scaled_at_refresh"] >= 0
    assert e2e["tick_lag_ms_p50"] <= e2e["tick_lag_ms_p99"]
    assert [g["name"] for g in e2e["guests"]] == ["vm0", "vm1", "vm2", "vm3"]
    for g in e2e["guests"]:
        # Every commit ends as exactly one flip: presented or dropped, counted the same by the
        # guest (from its flip records) and by hostd.
        assert g["commits"] == g["presented"] + g["dropped"]
        assert g["all_commits"] == g["all_presented"] + g["all_dropped"]
        assert g["all_presented"] >= g["presented"] and g["all_dropped"] >= g["dropped"]
        assert g["hostd"]["commits"] == g["all_commits"]
        assert g["hostd"]["presented"] == g["all_presented"]
        assert g["hostd"]["dropped"] == g["all_dropped"]
        assert g["hostd"]["rejected"] == 0
        assert g["commits"] >= 15  # 1.5 s at 30 fps is 45
        assert g["complete"]["n"] == g["presented"]
    assert e2e["commits"] == sum(g["commits"] for g in e2e["guests"])
    assert e2e["commits"] == e2e["presented"] + e2e["dropped"]


def test_end_to_end_counts_add_up(quick: tuple[dict[str, Any], str]) -> None:
    _check_end_to_end(quick[0]["end_to_end"], 1)
    _check_end_to_end(quick[0]["end_to_end_compare"], 2)
    _check_end_to_end(quick[0]["end_to_end_alt_refresh"], 1, 30.0)


def test_codec_beside_the_display(quick: tuple[dict[str, Any], str]) -> None:
    c = quick[0]["codec"]
    assert c["case"] == "h264 decode 240p" and c["frames"] == 24 and c["rounds"] == 1
    assert c["display_guests"] == 2 and c["refresh_hz"] == 30.0
    assert c["display_commits"] > 0  # the loaded rounds really committed
    for cond in ("idle", "loaded"):
        assert c[cond]["direct_fps"] > 0 and c[cond]["device_fps"] > 0 and c[cond]["ratio"] > 0
        assert [len(v) for v in c[cond]["runs"].values()] == [1, 1]
    assert c["loaded_vs_idle_ratio"] == pytest.approx(c["loaded"]["ratio"] / c["idle"]["ratio"], rel=0.01)


def test_a_guest_that_cannot_attach_is_one_clear_error(tmp_path: Path) -> None:
    spec = dbench.GuestSpec(str(tmp_path / "none.sock"), "lost", 64, 64, 30.0, 2, 0.0)
    with pytest.raises(RuntimeError, match=r"^display guest lost failed: \w+"), \
            dbench.Guests([spec], lambda _m: None):
        pass
