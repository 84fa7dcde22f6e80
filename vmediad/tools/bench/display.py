"""Shared-screen benchmark: composition cost, end to end through hostd, and the codec beside it.

Three parts, every figure against a floor or a goal measured or stated in the same run:

1. ``compose``: 4 VMs' pictures of the screen's size scaled into a grid (bgra and nv12) by
   ``hostd.display.compose.compose_floor_vs_core``: the floor is the very swscale calls
   ``Compositor.compose`` makes, in-process on the same pictures; ``compose_ms`` when every
   picture is new, ``kept_ms`` when none is (kept scaled images); ``max_fps`` = 1000 / compose_ms.
2. ``end_to_end``: a hostd whose screen is shown at ``refresh_hz`` (each picture is composed as
   soon as it is scaled; the refresh paces only the page and the recorder, and its interval is
   the latency goal), and guest *processes* (multiprocessing "spawn") that each open a bgra
   display of ``buffers`` buffers, fill the back buffer with a changing colour and commit it at
   ``guest_fps``, their phases spread evenly over a frame (guest i starts i/n of a frame late:
   VMs are not in step).  Each guest waits for its commits' tasks in commit order between its
   frames, so it sees each completion when it happens (a futex wake), never later than its next
   frame.  Latency ``complete`` is from the ``commit()`` call to the task's completion (the flip
   is written after the composition that showed it); ``latch`` is from the same instant to the
   tick that latched it (``DisplayFlip.composed_ns``, the same CLOCK_MONOTONIC).  The first
   ``warm_s`` seconds (scalers being built) are not counted.  The goals are judged on the run
   with ``threads`` scaling threads; a second run with ``compare_threads`` is reported next to
   it, and a third (``threads``) at ``alt_refresh_hz``, hostd's default refresh, whose interval
   is its goal.
3. ``codec``: one decode case of ``vmediad.tools.bench.codec`` (its pictures, its direct PyAV
   floor and its device path) against a hostd whose screen refreshes at 30 Hz, with the display
   idle and with guest processes committing 1080p at 30 fps; the conditions alternate round by
   round and direct/device swap places every round, as in ``bench codec``.  ``ratio`` is the
   median over that condition's rounds of device fps / direct fps of the same round.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vmediad.tools.bench.common import cpu_seconds, machine, pct

GOAL_LATENCY_REFRESHES = 1.0  # commit-to-composed p99 within one refresh interval


@dataclass(frozen=True, slots=True)
class Plan:
    """The sizes and durations of one run (``FULL`` or ``QUICK``)."""

    screen: tuple[int, int]
    guest: tuple[int, int]
    vms: int
    guest_fps: float
    refresh_hz: float
    threads: int  # display_threads of the judged end-to-end run
    compare_threads: int  # display_threads of a second end-to-end run, for comparison
    alt_refresh_hz: float  # refresh of a third end-to-end run (``threads``), hostd's default
    buffers: int
    seconds: float
    warm_s: float
    compose_frames: int
    codec_case: tuple[str, int, int]  # codec, width, height (a decode case of bench codec)
    codec_frames: int
    codec_rounds: int  # counted rounds per condition
    codec_guests: int
    codec_refresh_hz: float


FULL = Plan(screen=(1920, 1080), guest=(1920, 1080), vms=4, guest_fps=30.0, refresh_hz=60.0, threads=1,
            compare_threads=2, alt_refresh_hz=30.0, buffers=3, seconds=20.0, warm_s=2.0, compose_frames=30,
            codec_case=("h264", 1280, 720), codec_frames=300, codec_rounds=8, codec_guests=2, codec_refresh_hz=30.0)
QUICK = Plan(screen=(320, 180), guest=(160, 96), vms=4, guest_fps=30.0, refresh_hz=60.0, threads=1,
             compare_threads=2, alt_refresh_hz=30.0, buffers=3, seconds=1.5, warm_s=0.3, compose_frames=3,
             codec_case=("h264", 320, 240), codec_frames=24, codec_rounds=1, codec_guests=2, codec_refresh_hz=30.0)


# --- a guest process ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GuestSpec:
    socket: str
    name: str
    width: int
    height: int
    fps: float
    buffers: int
    warm_s: float  # commits in the first warm_s seconds after ``go`` first rose are not counted
    phase_s: float = 0.0  # the first commit after ``go`` rises waits this long


def guest_main(spec: GuestSpec, go: Any, stop: Any, out: Any) -> None:
    """Attach, open a display, then while ``go`` is set commit a freshly filled buffer every
    1/fps seconds until ``stop``; put a result dict (or {"name", "error"}) on ``out``."""
    try:
        out.put(_guest(spec, go, stop, out))
    except BaseException as e:  # the parent reports it; a guest must not hang the bench
        out.put({"name": spec.name, "error": f"{type(e).__name__}: {e}"})


def _guest(spec: GuestSpec, go: Any, stop: Any, out: Any) -> dict[str, Any]:
    import numpy as np

    import guestlib
    from guestlib.display import Display
    from vmediad import abi, logs
    from vmediad.abi import DisplayFlip, FlipFlag
    from vmediad.shm import monotonic_ns

    logs.configure("warning", json=True)
    region = abi.display_arena_size(abi.PixFmt.BGRA, spec.width, spec.height, spec.buffers) + (8 << 20)
    period = 1.0 / spec.fps
    colours = np.array([0xFF000000 | (i * 0x0F1D33) & 0xFFFFFF for i in range(256)], dtype=np.uint32)
    complete_ms: list[float] = []
    latch_ms: list[float] = []
    counts = {"commits": 0, "presented": 0, "dropped": 0, "late_frames": 0, "warm_commits": 0}
    with guestlib.attach(spec.socket, name=spec.name, region_size=max(region, 16 << 20)) as dev:
        disp: Display = dev.display(spec.width, spec.height, "bgra", spec.buffers)
        mem = dev.region.mem
        flip_at = abi.align(abi.DISPLAY_COMMIT_MAX)
        out.put({"name": spec.name, "ready": True})
        # (task, its flip's offset, commit ns, counted)
        waiting: deque[tuple[Any, int, int, bool]] = deque()

        def settle(task: Any, at: int, t0: int, counted: bool) -> None:
            done_ns = monotonic_ns()
            # The flip is read here, before Display reaps the task and reuses its record block.
            flip = DisplayFlip.unpack_from(mem, at)
            if not counted:
                return
            if flip.flags & FlipFlag.DROPPED:
                counts["dropped"] += 1
            else:
                counts["presented"] += 1
                complete_ms.append((done_ns - t0) / 1e6)
                latch_ms.append((flip.composed_ns - t0) / 1e6)

        def wait_until(deadline: float) -> None:
            """Settle the commits that complete before ``deadline`` (time.monotonic), oldest first."""
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0 and not waiting[0][0].done():
                    return
                try:
                    waiting[0][0].completion(max(left, 0.0))
                except TimeoutError:
                    return
                settle(*waiting.popleft())

        count_from: float | None = None
        i = 0
        while not stop.is_set():
            if not go.wait(0.05):
                continue
            if count_from is None:
                count_from = time.monotonic() + spec.warm_s
            next_t = time.monotonic() + spec.phase_s
            time.sleep(spec.phase_s)
            while go.is_set() and not stop.is_set():
                frame = disp.back()
                frame.planes[0].view(np.uint32)[...] = colours[i % 256]
                i += 1
                counted = time.monotonic() >= count_from
                t0 = monotonic_ns()
                task = disp.commit(frame)
                # The task's dst: the flip record hostd writes before completing it.
                at = disp._inflight[-1].record + flip_at
                waiting.append((task, at, t0, counted))
                if counted:
                    counts["commits"] += 1
                else:
                    counts["warm_commits"] += 1
                next_t += period
                wait_until(next_t)
                now = time.monotonic()
                if now > next_t + period:
                    counts["late_frames"] += 1
                    next_t = now  # behind by more than a frame: no burst to catch up
                elif now < next_t:
                    time.sleep(next_t - now)
                    wait_until(time.monotonic())
        wait_until(time.monotonic() + 5.0)
        if waiting:
            raise RuntimeError(f"{len(waiting)} commits not completed 5 s after the last one")
        held = disp.held  # reaps: its counters now include every flip
        shown, dropped = disp.presented, disp.dropped
        disp.close()
    return {"name": spec.name, "pid": os.getpid(), **counts, "all_presented": shown, "all_dropped": dropped,
            "held_at_end": len(held), "complete_ms": complete_ms, "latch_ms": latch_ms}


class Guests:
    """Guest processes (spawned, not forked: hostd's threads live in this process)."""

    def __init__(self, specs: list[GuestSpec], say: Callable[[str], None]) -> None:
        ctx = mp.get_context("spawn")
        self.go = ctx.Event()
        self.stop = ctx.Event()
        self.out: Any = ctx.Queue()
        self.specs = specs
        self.procs = [ctx.Process(target=guest_main, args=(s, self.go, self.stop, self.out), name=s.name, daemon=True)
                      for s in specs]
        self._say = say
        self.results: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> Guests:
        for p in self.procs:
            p.start()
        ready = 0
        while ready < len(self.procs):
            msg = self._get(60.0)
            if msg.get("ready"):
                ready += 1
        self._say(f"{len(self.procs)} guests attached, displays open")
        return self

    def _get(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg: dict[str, Any] = self.out.get(timeout=0.25)
                break
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None and p.name not in self.results]
                if dead:
                    raise RuntimeError(f"display guest {dead[0].name} exited with code {dead[0].exitcode} "
                                       "before reporting") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("a display guest did not answer in time") from None
        if "error" in msg:
            raise RuntimeError(f"display guest {msg['name']} failed: {msg['error']}")
        return msg

    def finish(self) -> dict[str, dict[str, Any]]:
        self.stop.set()
        while len(self.results) < len(self.procs):
            msg = self._get(30.0)
            self.results[msg["name"]] = msg
        for p in self.procs:
            p.join(10.0)
        return self.results

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(5.0 if not self.results else 1.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)


def _hostd(d: str, screen: tuple[int, int], refresh_hz: float, threads: int) -> Any:
    from hostd.config import Config
    from hostd.daemon import Hostd

    return Hostd(Config(socket=Path(d) / "h.sock", channels=2, region_max=1024 << 20,
                        display_width=screen[0], display_height=screen[1], display_refresh_hz=refresh_hz,
                        display_threads=threads))


# --- part 1: composition cost ----------------------------------------------------------------
def compose_part(plan: Plan, say: Callable[[str], None]) -> list[dict[str, Any]]:
    from hostd.display.compose import compose_floor_vs_core
    from vmediad.abi import PixFmt

    rows = []
    w, h = plan.screen
    for fmt in (PixFmt.BGRA, PixFmt.NV12):
        say(f"compose: {plan.vms} x {w}x{h} {fmt.name.lower()} into {w}x{h}, {plan.compose_frames} frames")
        r = compose_floor_vs_core(plan.compose_frames, vms=plan.vms, width=w, height=h, fmt=fmt)
        rows.append({
            "format": fmt.name.lower(), "vms": plan.vms, "picture": f"{w}x{h}", "screen": f"{w}x{h}",
            "frames": plan.compose_frames, "floor_ms": round(r["floor_ms"], 3),
            "floor_one_call_ms": round(r["floor_one_call_ms"], 3), "compose_ms": round(r["compose_ms"], 3),
            "kept_ms": round(r["compose_kept_ms"], 3), "ratio": round(r["ratio"], 3),
            "max_fps": round(1000.0 / r["compose_ms"], 1) if r["compose_ms"] else 0.0,
        })
    return rows


# --- part 2: end to end ------------------------------------------------------------------------
def _lat(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(samples, 50), 2), "p99_ms": round(pct(samples, 99), 2),
            "max_ms": round(max(samples), 2) if samples else 0.0, "n": len(samples)}


def end_to_end_part(plan: Plan, seconds: float, say: Callable[[str], None]) -> dict[str, Any]:
    """One end-to-end run with ``plan.threads`` scaling threads (see the module's docstring)."""
    gw, gh = plan.guest
    with tempfile.TemporaryDirectory(prefix="vmd-bd-") as d, \
            _hostd(d, plan.screen, plan.refresh_hz, plan.threads) as h:
        specs = [GuestSpec(str(h.socket_path), f"vm{i}", gw, gh, plan.guest_fps, plan.buffers, plan.warm_s,
                           i / plan.vms / plan.guest_fps) for i in range(plan.vms)]
        say(f"end to end: hostd screen {plan.screen[0]}x{plan.screen[1]} @ {plan.refresh_hz:g} Hz, "
            f"{plan.threads} scaling threads; starting {plan.vms} guest processes")
        with Guests(specs, say) as guests:
            guests.go.set()
            time.sleep(plan.warm_s)
            comp_tid = h.display._thread.native_id if h.display._thread is not None else None
            s0, t0 = h.display.statistics(), time.monotonic()
            c0 = cpu_seconds(tid=comp_tid) if comp_tid else 0.0
            p0 = cpu_seconds()
            samples: list[float] = []
            say(f"end to end: {plan.vms} guests committing {gw}x{gh} bgra at {plan.guest_fps:g} fps for {seconds:g} s")
            end = t0 + seconds
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(1.0, left))
                if left >= 1.0:
                    samples.append(h.display.statistics()["screen_fps"])
            s1, t1 = h.display.statistics(), time.monotonic()
            c1 = cpu_seconds(tid=comp_tid) if comp_tid else 0.0
            p1 = cpu_seconds()
            results = guests.finish()
        core = {v["name"]: v for v in h.display.display_statistics()["vms"]}
    wall = t1 - t0
    comps = s1["compositions"] - s0["compositions"]
    skipped = s1["skipped"] - s0["skipped"]
    late = s1["late"] - s0["late"]
    prescaled = s1["prescaled"] - s0["prescaled"]
    prescale_shown = s1["prescale_shown"] - s0["prescale_shown"]
    scaled_at_refresh = (s1["scaled"] - s0["scaled"]) - prescaled
    interval_ms = 1000.0 / plan.refresh_hz
    complete = [x for r in results.values() for x in r["complete_ms"]]
    latch = [x for r in results.values() for x in r["latch_ms"]]
    per_guest = []
    for name in sorted(results):
        r = results[name]
        c = core.get(name, {})
        per_guest.append({
            "name": name, "commits": r["commits"], "presented": r["presented"], "dropped": r["dropped"],
            "commit_fps": round(r["commits"] / wall, 2), "late_frames": r["late_frames"],
            "complete": _lat(r["complete_ms"]), "latch": _lat(r["latch_ms"]),
            "all_commits": r["commits"] + r["warm_commits"], "all_presented": r["all_presented"],
            "all_dropped": r["all_dropped"],
            "hostd": {k: c.get(k) for k in ("commits", "presented", "dropped", "rejected", "latency_p50_ms",
                                            "latency_p99_ms")},
        })
    refreshes = (comps + skipped) / wall
    cpu_per = (s1["compose_cpu_s"] - s0["compose_cpu_s"]) / comps if comps else 0.0
    thread_per = (c1 - c0) / comps if comps else 0.0
    lat = _lat(complete)
    return {
        "screen": f"{plan.screen[0]}x{plan.screen[1]}", "refresh_hz": plan.refresh_hz,
        "refresh_interval_ms": round(interval_ms, 2), "display_threads": plan.threads, "vms": plan.vms,
        "guest": f"{gw}x{gh} bgra", "guest_fps": plan.guest_fps, "buffers": plan.buffers,
        "seconds": round(wall, 2), "warm_s": plan.warm_s,
        "compositions": comps, "skipped": skipped, "late": late,
        "screen_fps": round(comps / wall, 2), "refreshes_per_s": round(refreshes, 2),
        "screen_fps_1s_samples": samples,
        "compose_wall_ms_p50": round(s1["compose_ms_p50"], 2), "compose_wall_ms_p99": round(s1["compose_ms_p99"], 2),
        # Pictures scaled when committed (ahead of the refresh), of them shown, and scaled at a refresh.
        "prescaled": prescaled, "prescale_shown": prescale_shown, "scaled_at_refresh": scaled_at_refresh,
        # From a refresh slot to the tick that latched it (the device thread's round trip and wake-ups).
        "tick_lag_ms_p50": round(s1["tick_lag_ms_p50"], 2), "tick_lag_ms_p99": round(s1["tick_lag_ms_p99"], 2),
        "compose_cpu_ms_per_frame": round(cpu_per * 1e3, 2),
        "compositor_thread_cpu_ms_per_frame": round(thread_per * 1e3, 2),
        "hostd_process_cpu_percent": round((p1 - p0) / wall * 100, 1),
        "latency_complete": lat, "latency_latch": _lat(latch),
        "latency_p99_vs_interval": round(lat["p99_ms"] / interval_ms, 3),
        "commits": sum(g["commits"] for g in per_guest), "presented": sum(g["presented"] for g in per_guest),
        "dropped": sum(g["dropped"] for g in per_guest),
        "goals": {
            # Compositions are counted between two snapshots ``wall`` apart: one either way is the edge.
            "screen_fps": {"goal": f">= {plan.refresh_hz:g}", "value": round(comps / wall, 2),
                           "met": comps + 1 >= plan.refresh_hz * round(wall, 2)},  # as reported
            "latency_p99": {"goal": f"<= {interval_ms:.2f} ms", "value": lat["p99_ms"],
                            # Judged on the reported (rounded) figures, as the screen fps is.
                            "met": lat["p99_ms"] <= round(interval_ms * GOAL_LATENCY_REFRESHES, 2)},
        },
        "guests": per_guest,
    }


# --- part 3: the codec beside the display ------------------------------------------------------
def codec_part(plan: Plan, say: Callable[[str], None]) -> dict[str, Any]:
    import guestlib
    from guestlib.codec import decoder_config, encoder_config
    from vmediad.tools.bench import codec as cbench

    codec, cw, ch = plan.codec_case
    case = cbench.Case(codec, "decode", cw, ch)
    depth, batch = cbench.STREAM["decode"]
    pics = cbench.pictures(cw, ch, min(cbench.RING, plan.codec_frames))
    stream = cbench._direct_encode(encoder_config(codec, cw, ch), pics, plan.codec_frames)[1]
    dcfg = decoder_config(codec)
    runs: dict[str, dict[str, list[float]]] = {c: {"direct": [], "device": []} for c in ("idle", "loaded")}
    gw, gh = plan.guest
    with tempfile.TemporaryDirectory(prefix="vmd-bd-") as d, \
            _hostd(d, plan.screen, plan.codec_refresh_hz, plan.threads) as h, \
            guestlib.attach(str(h.socket_path), name="bench", region_size=256 << 20) as dev:
        specs = [GuestSpec(str(h.socket_path), f"show{i}", gw, gh, plan.guest_fps, plan.buffers, 0.0,
                           i / plan.codec_guests / plan.guest_fps) for i in range(plan.codec_guests)]
        say(f"codec: {case.name}, {plan.codec_frames} frames; starting {plan.codec_guests} display guests "
            f"({gw}x{gh} at {plan.guest_fps:g} fps, screen at {plan.codec_refresh_hz:g} Hz)")
        with Guests(specs, say) as guests:
            # Round 0 warms both paths up in both conditions and is not counted.
            for r in range(plan.codec_rounds + 1):
                conds = ["idle", "loaded"] if r % 2 == 0 else ["loaded", "idle"]
                for cond in conds:
                    comps0 = h.display.statistics()["compositions"]
                    if cond == "loaded":
                        guests.go.set()
                        time.sleep(0.3)  # the guests are committing and the screen composing
                    fps: dict[str, float] = {}
                    order = ["direct", "device"] if r % 2 else ["device", "direct"]
                    for path in order:
                        if path == "direct":
                            dt, n = cbench._direct_decode(dcfg, stream)
                        else:
                            dt, n, _ = cbench._device_decode(dev, case, stream, depth, batch)
                        if n != plan.codec_frames:
                            raise RuntimeError(f"{case.name}: {path} gave {n} frames, not {plan.codec_frames}")
                        fps[path] = n / dt
                    guests.go.clear()
                    comps = h.display.statistics()["compositions"] - comps0
                    if r:
                        for path, v in fps.items():
                            runs[cond][path].append(v)
                        say(f"codec: round {r} {cond}: direct {fps['direct']:.1f} fps, device {fps['device']:.1f} fps"
                            f" ({comps} screen compositions)")
                    time.sleep(0.1)  # the guests saw go fall
            results = guests.finish()
    out: dict[str, Any] = {"case": case.name, "frames": plan.codec_frames, "rounds": plan.codec_rounds,
                           "stream": {"depth": depth, "batch": batch},
                           "display_guests": plan.codec_guests, "guest": f"{gw}x{gh} bgra",
                           "guest_fps": plan.guest_fps, "refresh_hz": plan.codec_refresh_hz,
                           "display_commits": sum(r["commits"] for r in results.values())}
    for cond, paths in runs.items():
        ratios = [b / a for a, b in zip(paths["direct"], paths["device"], strict=True)]
        out[cond] = {"direct_fps": round(statistics.median(paths["direct"]), 1),
                     "device_fps": round(statistics.median(paths["device"]), 1),
                     "ratio": round(statistics.median(ratios), 3),
                     "runs": {k: [round(x, 1) for x in v] for k, v in paths.items()}}
    out["loaded_vs_idle_ratio"] = round(out["loaded"]["ratio"] / out["idle"]["ratio"], 3)
    out["device_fps_loaded_vs_idle"] = round(out["loaded"]["device_fps"] / out["idle"]["device_fps"], 3)
    return out


def run(quick: bool = False, seconds: float | None = None,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """All three parts; ``seconds`` overrides the plan's end-to-end duration."""
    say = progress or (lambda _m: None)
    plan = QUICK if quick else FULL
    secs = plan.seconds if seconds is None else seconds
    load0 = os.getloadavg()[0]
    result: dict[str, Any] = {"machine": machine(), "quick": quick}
    t = time.monotonic()
    result["compose"] = compose_part(plan, say)
    result["end_to_end"] = end_to_end_part(plan, secs, say)
    result["end_to_end_compare"] = end_to_end_part(replace(plan, threads=plan.compare_threads), secs, say)
    result["end_to_end_alt_refresh"] = end_to_end_part(replace(plan, refresh_hz=plan.alt_refresh_hz), secs, say)
    result["codec"] = codec_part(plan, say)
    result["machine"]["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # before, after
    result["wall_s"] = round(time.monotonic() - t, 1)
    return result
