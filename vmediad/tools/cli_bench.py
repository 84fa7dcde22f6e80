"""The ``vmediad bench`` group: transport, codec, layers, combine, display (ratios against a same-run floor)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from vmediad import logs
from vmediad.tools.bench.common import CODEC_CASES, LAYERS
from vmediad.tools.cli_common import _size, console, err_console


# --- benchmarks -----------------------------------------------------------------------------
@click.group()
def bench() -> None:
    """Benchmarks: ratios against a floor measured in the same run."""


@bench.command("transport")
@click.option("--n", default=5000, show_default=True, help="nop round trips")
@click.option("--idle", "idle_s", default=30.0, show_default=True, help="seconds of idle CPU measurement")
@click.option("--json-out", type=click.Path(path_type=Path), help="write the results as JSON")
@click.option("--kind", type=click.Choice(["process", "qemu"]), default="process", show_default=True,
              help="qemu: NOP round trips from a QEMU VM over ivshmem (poll and interrupt) against the raw "
                   "ivshmem ping-pong floors, in one VM booted for it (TCG unless KVM is real)")
def bench_transport(n: int, idle_s: float, json_out: Path | None, kind: str) -> None:
    """nop round trip, batched nop/s, COPY vs memcpy, idle CPU (--kind qemu: VM <-> hostd)."""
    from vmediad.tools.bench import transport
    from vmediad.tools.bench.common import save

    logs.configure("warning")
    if kind == "qemu":
        _bench_transport_qemu(n, json_out)
        return
    res = transport.run(n=n, idle_s=idle_s, progress=lambda m: console.print(f"[dim]{m}[/]"))
    save(res, json_out)
    t = Table(title="transport (µs; ratios against floors from this run)")
    for col in ("measure", "value"):
        t.add_column(col)
    t.add_row("floor: spin+futex ping-pong p50 / p99", f"{res['floor_pingpong_spin']['p50_us']} / "
              f"{res['floor_pingpong_spin']['p99_us']}")
    t.add_row("floor: pure futex ping-pong p50 / p99", f"{res['floor_pingpong_futex']['p50_us']} / "
              f"{res['floor_pingpong_futex']['p99_us']}")
    t.add_row("nop round trip p50 / p99", f"{res['nop_roundtrip']['p50_us']} / {res['nop_roundtrip']['p99_us']}")
    t.add_row("nop batched tasks/s", str(res["nop_batched"]["tasks_per_s"]))
    t.add_row("doorbell syscalls per batched task", str(res["nop_batched"]["doorbell_syscalls_per_task"]))
    t.add_row(f"COPY {res['copy']['bytes'] >> 20} MiB device / memcpy",
              f"{res['copy']['device_us']} / {res['copy']['memcpy_us']} (x{res['copy']['ratio_vs_memcpy']})")
    if "idle" in res:
        t.add_row(f"idle CPU over {res['idle']['seconds']} s: hostd / worker",
                  f"{res['idle']['hostd_cpu_percent']}% / {res['idle']['worker_cpu_percent']}%")
    console.print(t)


def _bench_transport_qemu(n: int, json_out: Path | None) -> None:
    from vmediad.tools import vmimage
    from vmediad.tools.bench.common import save
    from vmediad.tools.qemu import QemuError, bench_transport

    if vmimage.qemu_binary() is None:
        raise click.ClickException("qemu-system-x86_64 is not installed (run scripts/setup-vm.sh as root)")
    try:
        res = bench_transport(min(n, 2000), progress=lambda m: console.print(f"[dim]{m}[/]"))
    except (QemuError, TimeoutError, vmimage.VmImageError) as e:
        raise click.ClickException(f"the benchmark VM failed: {str(e).splitlines()[0]}") from None
    save(res, json_out)
    accel = res["accel"].upper()
    t = Table(title=f"transport VM <-> hostd over ivshmem (µs, {accel} figures: {res['accel_reason']})")
    for col in ("measure", "p50", "p99"):
        t.add_column(col)
    rows = [("floor: shared memory, both sides spinning", "floor_spin"),
            ("floor: Doorbell to a host eventfd, guest spinning", "floor_doorbell"),
            ("NOP round trip, guest polling", "nop_poll"), ("NOP round trip, MSI-X interrupt", "nop_interrupt")]
    for label, key in rows:
        if key in res:
            t.add_row(label, str(res[key]["p50_us"]), str(res[key]["p99_us"]))
    t.caption = (f"{res['n']} round trips each; poll p50 = {res['poll_vs_floor']}x the Doorbell floor"
                 + ("" if "nop_interrupt" in res else "; no igb_uio in the guest: no interrupt mode"))
    console.print(t)


@bench.command("codec")
@click.option("--frames", default=120, show_default=True)
@click.option("--quick", is_flag=True, help="fewer frames and rounds (a smoke run, not figures); 720p H.264 "
                                           "unless --case picks other cases")
@click.option("--case", "only", multiple=True,
              help='run only cases whose name has all these words, e.g. "decode", "h264 720p" or "10-bit" '
                   f'(repeatable); cases: {", ".join(c.name for c in CODEC_CASES)}')
@click.option("--json-out", type=click.Path(path_type=Path))
def bench_codec(frames: int, quick: bool, only: tuple[str, ...], json_out: Path | None) -> None:
    """fps through the device vs direct in-process PyAV with identical options."""
    from vmediad.tools.bench import codec as cbench
    from vmediad.tools.bench.common import save

    logs.configure("warning")
    try:
        cbench.select(cbench.QUICK if quick and not only else cbench.FULL, list(only))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--case") from None
    try:
        res = cbench.run(frames=frames, quick=quick, only=list(only),
                         progress=lambda m: console.print(f"[dim]{m}[/]"))
    except RuntimeError as e:  # a path decoded other frames or formats than the case's
        raise click.ClickException(str(e)) from None
    save(res, json_out)
    t = Table(title="codec: device fps / direct PyAV fps (same run, same options)")
    for col in ("case", "direct fps", "device fps", "ratio", "bytes copied/frame",
                "CPU us/frame direct", "device: guest + hostd + worker"):
        t.add_column(col)
    for c in res["cases"]:
        cpu = c["cpu_us_per_frame"]
        dv = cpu["device"]
        t.add_row(c["case"], f"{c['direct_fps']:.1f}", f"{c['device_fps']:.1f}", f"{c['ratio']:.3f}",
                  str(c.get("bytes_copied_per_frame", "")), f"{cpu['direct']['direct']:.0f}",
                  f"{dv['guest']:.0f} + {dv['hostd']:.0f} + {dv['worker']:.0f} = {dv['total']:.0f}")
    console.print(t)


@bench.command("layers")
@click.option("--codec", default="h264", show_default=True, type=click.Choice(["h264", "hevc", "vp9"]))
@click.option("--size", default="1280x720", show_default=True)
@click.option("--frames", default=120, show_default=True, type=click.IntRange(24))
@click.option("--blocks", default=60, show_default=True, type=click.IntRange(2),
              help="rounds; each decodes the stream once per layer")
@click.option("--layer", "layers", multiple=True, type=click.Choice(LAYERS),
              help="only these layers (repeatable; direct, the floor, is always run)")
@click.option("--json-out", type=click.Path(path_type=Path))
def bench_layers(codec: str, size: str, frames: int, blocks: int, layers: tuple[str, ...],
                 json_out: Path | None) -> None:
    """Decode speed layer by layer, from direct PyAV to the whole device, against the same floor."""
    from vmediad.tools.bench import layers as lbench
    from vmediad.tools.bench.common import save

    logs.configure("warning")
    width, height = _size(size)
    res = lbench.run(codec=codec, width=width, height=height, frames=frames, blocks=blocks,
                     layers=layers or LAYERS, progress=lambda m: console.print(f"[dim]{m}[/]"))
    save(res, json_out)
    t = Table(title=f"{codec} decode {width}x{height}: speed of each layer / direct PyAV "
                    f"({blocks} rounds of {frames} frames, same run)")
    for col in ("layer", "fps (median)", "speed", "95 % interval", "step", "calling thread CPU us/frame"):
        t.add_column(col)
    prev = None
    for r in res["layers"]:
        step = "" if prev is None else f"{r['speed'] - prev:+.3f}"
        t.add_row(r["layer"], f"{r['fps']:.1f}", f"{r['speed']:.3f}", f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}",
                  step, f"{r['thread_us_per_frame']:.0f}")
        prev = r["speed"]
    console.print(t)


@bench.command("combine")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--target", default=0.97, show_default=True, help="ratio to check each case against")
@click.option("--case", "only", multiple=True,
              help='pool only cases whose name has all these words, e.g. "decode" (repeatable); '
                   'files that also hold other cases then pool with files that do not')
@click.option("--json-out", type=click.Path(path_type=Path))
def bench_combine(files: tuple[Path, ...], target: float, only: tuple[str, ...], json_out: Path | None) -> None:
    """Pool the paired rounds of several `bench codec --json-out` files: median and 95 % interval."""
    from dataclasses import asdict

    from vmediad.tools.bench.combine import CombineError, combine
    from vmediad.tools.bench.common import save

    loaded = []
    for f in files:
        try:
            loaded.append((str(f), json.loads(f.read_text())))
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"{f}: not JSON ({e})", param_hint="FILES") from None
    try:
        pooled = combine(loaded, target=target, only=only)
    except CombineError as e:
        raise click.BadParameter(str(e), param_hint="FILES") from None
    save({"files": [str(f) for f in files], "target": target, "only": list(only),
          "cases": [asdict(p) for p in pooled]}, json_out)
    t = Table(title=f"codec ratios pooled over {len(files)} runs (target {target})")
    for col in ("case", "runs", "rounds", "each run's ratio", "pooled median", "95 % interval", "runs >= target"):
        t.add_column(col)
    for p in pooled:
        style = "green" if p.meets else "red"
        t.add_row(p.case, str(p.runs), str(p.rounds), " ".join(f"{x:.3f}" for x in p.run_ratios),
                  f"[{style}]{p.median:.3f}[/]", f"{p.ci95[0]:.3f}-{p.ci95[1]:.3f}", f"{p.runs_meeting}/{p.runs}")
    console.print(t)


@bench.command("display")
@click.option("--quick", is_flag=True, help="tiny screen and pictures, a few frames (a smoke run, not figures)")
@click.option("--seconds", type=click.FloatRange(1.0, 600.0), default=None,
              help="length of each end-to-end run  [default: 20, 1.5 with --quick]")
@click.option("--json-out", type=click.Path(path_type=Path))
def bench_display(quick: bool, seconds: float | None, json_out: Path | None) -> None:
    """The shared screen: composition cost, 4 guests end to end, the codec beside it."""
    from vmediad.tools.bench import display as dbench
    from vmediad.tools.bench.common import save

    logs.configure("warning")
    try:
        res = dbench.run(quick=quick, seconds=seconds, progress=lambda m: err_console.print(f"[dim]{m}[/]"))
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    save(res, json_out)
    t = Table(title="display: composition per screen frame (ms; floor = the same swscale calls, same run)")
    for col in ("pictures", "floor", "compose (all new)", "kept (none new)", "ratio", "max screen fps"):
        t.add_column(col)
    for c in res["compose"]:
        t.add_row(f"{c['vms']} x {c['picture']} {c['format']}", f"{c['floor_ms']:.2f}", f"{c['compose_ms']:.2f}",
                  f"{c['kept_ms']:.2f}", f"{c['ratio']:.3f}", f"{c['max_fps']:.1f}")
    console.print(t)
    e2e = res["end_to_end"]
    t = Table(title=f"display end to end: {e2e['vms']} guests x {e2e['guest']} at {e2e['guest_fps']:g} fps, "
                    f"screen {e2e['screen']} @ {e2e['refresh_hz']:g} Hz, {e2e['display_threads']} scaling threads, "
                    f"{e2e['seconds']} s")
    for col in ("measure", "value", "goal", "met"):
        t.add_column(col)
    g = e2e["goals"]

    def met(ok: bool) -> str:
        return "[green]yes[/]" if ok else "[red]no[/]"

    lc, ll = e2e["latency_complete"], e2e["latency_latch"]
    t.add_row("screen fps (compositions/s)", f"{e2e['screen_fps']:.2f}", g["screen_fps"]["goal"],
              met(g["screen_fps"]["met"]))
    t.add_row("commit -> composed (task done) p50 / p99", f"{lc['p50_ms']:.2f} / {lc['p99_ms']:.2f} ms",
              g["latency_p99"]["goal"] + " (p99)", met(g["latency_p99"]["met"]))
    t.add_row("commit -> latched (tick) p50 / p99", f"{ll['p50_ms']:.2f} / {ll['p99_ms']:.2f} ms", "", "")
    t.add_row("compose wall p50 / p99", f"{e2e['compose_wall_ms_p50']:.2f} / {e2e['compose_wall_ms_p99']:.2f} ms",
              "", "")
    t.add_row("compositor CPU per composition", f"{e2e['compose_cpu_ms_per_frame']:.2f} ms", "", "")
    t.add_row("late / skipped ticks", f"{e2e['late']} / {e2e['skipped']}", "", "")
    t.add_row("commits: presented + dropped", f"{e2e['commits']}: {e2e['presented']} + {e2e['dropped']}", "", "")
    t.add_row("hostd process CPU", f"{e2e['hostd_process_cpu_percent']:.1f} %", "", "")
    cmp = res["end_to_end_compare"]
    t.add_row(f"with {cmp['display_threads']} scaling thread(s): screen fps, p99, late",
              f"{cmp['screen_fps']:.2f}, {cmp['latency_complete']['p99_ms']:.2f} ms, {cmp['late']}", "", "")
    alt = res["end_to_end_alt_refresh"]
    ag, al = alt["goals"], alt["latency_complete"]
    t.add_row(f"at {alt['refresh_hz']:g} Hz: screen fps; commit -> composed p50 / p99",
              f"{alt['screen_fps']:.2f}; {al['p50_ms']:.2f} / {al['p99_ms']:.2f} ms",
              f"{ag['screen_fps']['goal']}; {ag['latency_p99']['goal']} (p99)",
              met(ag["screen_fps"]["met"] and ag["latency_p99"]["met"]))
    t.add_row("pictures scaled at commit / by a composition", f"{e2e['prescaled']} / {e2e['scaled_at_refresh']}",
              "", "")
    t.add_row("tick lag (slot -> latch) p50 / p99", f"{e2e['tick_lag_ms_p50']:.2f} / {e2e['tick_lag_ms_p99']:.2f} ms",
              "", "")
    console.print(t)
    c = res["codec"]
    t = Table(title=f"codec beside the display: {c['case']}, device fps / direct fps ({c['rounds']} paired rounds "
                    f"per condition; loaded = {c['display_guests']} guests x {c['guest']} at {c['guest_fps']:g} fps, "
                    f"screen @ {c['refresh_hz']:g} Hz)")
    for col in ("display", "direct fps", "device fps", "ratio"):
        t.add_column(col)
    for cond in ("idle", "loaded"):
        t.add_row(cond, f"{c[cond]['direct_fps']:.1f}", f"{c[cond]['device_fps']:.1f}", f"{c[cond]['ratio']:.3f}")
    t.caption = (f"loaded ratio / idle ratio = {c['loaded_vs_idle_ratio']:.3f}; "
                 f"device fps loaded / idle = {c['device_fps_loaded_vs_idle']:.3f}")
    console.print(t)
