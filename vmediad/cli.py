"""The vmediad command line (click + rich)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmediad import logs
from vmediad.bench.common import LAYERS

# Not a terminal (pipes, CI logs): wide enough that tables do not truncate names.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)


class ConfigExit(click.ClickException):
    exit_code = 78  # EX_CONFIG: the unit's RestartPreventExitStatus=78 stops restart loops


def _socket_default() -> str:
    env = os.environ.get("VMEDIAD_SOCKET")
    if env:
        return env
    from hostd.config import default_socket_path

    return str(default_socket_path())


socket_option = click.option("--socket", "socket_path", default=_socket_default, show_default="$VMEDIAD_SOCKET or "
                             "hostd's default path", help="hostd control socket")


def _size(value: str) -> tuple[int, int]:
    try:
        w, h = value.lower().split("x")
        width, height = int(w), int(h)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise click.BadParameter("width and height must be even and at least 16")
    return width, height


@click.group()
@click.version_option(package_name="vmediad")
def main() -> None:
    """vmediad: an emulated mediated video-codec device shared by many guests."""


@main.command()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), help="control socket path")
@click.option("--channels", type=int, help="hardware channels (default: CPU count)")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file "
              "(default /etc/vmediad/config.toml if present)")
@click.option("--policy", type=click.Choice(["fifo", "round-robin", "weighted"]))
@click.option("--metrics", help="serve Prometheus metrics on HOST:PORT")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--fault-injection", is_flag=True, default=None, hidden=True)
def hostd(socket_path: Path | None, channels: int | None, config_path: Path | None, policy: str | None,
          metrics: str | None, log_level: str, fault_injection: bool | None) -> None:
    """Run the host daemon in the foreground (systemd: Type=notify)."""
    from hostd import config as hconfig
    from hostd.daemon import run_foreground
    from vmediad.errors import ConfigError

    logs.configure(log_level)
    try:
        cfg = hconfig.load(config_path or hconfig.DEFAULT_CONFIG_PATH, {
            "socket": socket_path, "channels": channels, "policy": policy, "metrics": metrics,
            "fault_injection": fault_injection,
        })
    except ConfigError as e:
        raise ConfigExit(str(e)) from None
    sys.exit(run_foreground(cfg))


# --- fake VMs ----------------------------------------------------------------------------
def run_fleet(specs: list[Any], out: Console) -> list[Any]:
    """Spawn the VMs, show a live row per VM, return their final reports (Ctrl-C stops them cleanly)."""
    from vmediad.fakevm import VmReport, spawn

    procs, q, stop = spawn(specs)
    reports: dict[str, VmReport] = {s.name: VmReport(s.name, s.workload, s.codec) for s in specs}
    progress = Progress(
        TextColumn("[bold]{task.fields[name]}"), TextColumn("{task.fields[workload]:>9} {task.fields[codec]:<5}"),
        BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[fps]:>6.1f} fps"),
        TextColumn("err {task.fields[errors]}"), TextColumn("{task.fields[state]}"), TimeElapsedColumn(),
        console=out, transient=False,
    )
    ids = {s.name: progress.add_task(s.name, total=s.frames, name=s.name, workload=s.workload, codec=s.codec,
                                     fps=0.0, errors=0, state="starting") for s in specs}
    finished: set[str] = set()
    interrupted = False
    with progress:
        while len(finished) < len(specs):
            try:
                msg = q.get(timeout=0.5)
            except KeyboardInterrupt:
                if not interrupted:
                    interrupted = True
                    out.print("[yellow]Ctrl-C: stopping the VMs cleanly...[/]")
                    stop.set()
                continue
            except Exception:  # queue.Empty
                for s, p in zip(specs, procs, strict=True):
                    if not p.is_alive() and s.name not in finished and p.exitcode not in (0, None):
                        reports[s.name].state = "failed"
                        reports[s.name].detail = f"process exited {p.exitcode}"
                        finished.add(s.name)
                continue
            r = VmReport(**msg)
            reports[r.name] = r
            progress.update(ids[r.name], completed=r.frames, fps=r.fps, errors=r.errors, state=r.state)
            if r.state in ("done", "failed", "stopped"):
                finished.add(r.name)
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
    return [reports[s.name] for s in specs]


def summary_table(reports: list[Any], title: str = "fake VMs") -> Table:
    t = Table(title=title)
    for col in ("vm", "workload", "codec", "state", "frames", "fps", "errors", "output"):
        t.add_column(col, justify="right" if col in ("frames", "fps", "errors") else "left")
    for r in reports:
        style = {"done": "green", "failed": "red", "stopped": "yellow"}.get(r.state, "")
        t.add_row(r.name, r.workload, r.codec, f"[{style}]{r.state}[/]" if style else r.state, str(r.frames),
                  f"{r.fps:.1f}", str(r.errors), Path(r.output).name if r.output else r.detail)
    return t


@main.group()
def vm() -> None:
    """Fake VMs: guest processes that use the device."""


@vm.command("spawn")
@socket_option
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--name-prefix", default="vm", show_default=True)
@click.option("--workload", type=click.Choice(["encode", "decode", "transcode"]), default="encode",
              show_default=True)
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              help="input file for decode/transcode (default: built-in moving pattern)")
@click.option("--codec", default="h264", show_default=True,
              type=click.Choice(["h264", "hevc", "vp9", "av1", "mjpeg", "mpeg4"]))
@click.option("--size", default="1280x720", show_default=True)
@click.option("--frames", default=120, show_default=True, type=click.IntRange(1))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("vmediad-out"),
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def vm_spawn(socket_path: str, count: int, name_prefix: str, workload: str, input_path: str | None, codec: str,
             size: str, frames: int, output: Path, as_json: bool) -> None:
    """Spawn COUNT guest processes, each with its own region, and run WORKLOAD on the device."""
    from vmediad.fakevm import VmSpec

    width, height = _size(size)
    if not Path(socket_path).exists():
        raise click.ClickException(f"no hostd socket at {socket_path} (start `vmediad hostd` or pass --socket)")
    specs = [VmSpec(f"{name_prefix}{i}", socket_path, workload, codec, width, height, frames, input=input_path,
                    output=str(output)) for i in range(count)]
    reports = run_fleet(specs, console)
    if as_json:
        click.echo(json.dumps([{**r.__dict__, "fps": r.fps} for r in reports], indent=2))
    else:
        console.print(summary_table(reports))
    if any(r.state == "failed" for r in reports):
        for r in reports:
            if r.state == "failed":
                console.print(f"[red]{r.name}: {r.detail}[/]")
        sys.exit(1)


# --- status / caps -----------------------------------------------------------------------
def status_tables(s: dict[str, Any]) -> list[Table]:
    dev = Table(title=f"device: {s['state']}, policy {s['policy']}, cap {s['cap']}, uptime {s['uptime_s']:.0f}s, "
                      f"epoch {s['epoch']:#x}")
    for col in ("channel", "busy", "vm", "op", "sessions", "tasks", "busy s"):
        dev.add_column(col)
    for c in s["channels"]:
        dev.add_row(str(c["index"]), "yes" if c["busy"] else "-", str(c["vm"] or "-"), c["op"] or "-",
                    str(c["bound_sessions"]), str(c["tasks"]), f"{c['busy_seconds']:.3f}")
    vms = Table(title=f"{s['guests']} guests")
    for col in ("vm", "name", "done", "failed", "queued", "inflight", "p50 µs", "p99 µs", "MB moved", "sessions",
                "errors"):
        vms.add_column(col)
    for v in s["vms"]:
        errs = ", ".join(f"{k}={n}" for k, n in sorted(v["errors"].items())) or "-"
        vms.add_row(str(v["vm"]), v["name"], str(v["tasks_done"]), str(v["tasks_failed"]), str(v["queue_depth"]),
                    str(v["inflight"]), f"{v['latency']['p50_us']:.0f}", f"{v['latency']['p99_us']:.0f}",
                    f"{v['bytes_moved'] / 1e6:.1f}", str(v["sessions"]), errs)
    return [dev, vms]


@main.command()
@socket_option
@click.option("--json", "as_json", is_flag=True, help="print the raw statistics() snapshot")
@click.option("--watch", is_flag=True, help="refresh every second until Ctrl-C")
def status(socket_path: str, as_json: bool, watch: bool) -> None:
    """Per-VM and device status from a running hostd."""
    from guestlib.device import DeviceGone, hostd_status

    def fetch() -> dict[str, Any]:
        try:
            return hostd_status(socket_path)
        except DeviceGone as e:
            raise click.ClickException(str(e)) from None

    if as_json and not watch:
        click.echo(json.dumps(fetch(), indent=2))
        return
    if not watch:
        for t in status_tables(fetch()):
            console.print(t)
        return
    from rich.console import Group

    try:
        with Live(Group(*status_tables(fetch())), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(1)
                s = fetch()
                if as_json:
                    click.echo(json.dumps(s))
                else:
                    live.update(Group(*status_tables(s)))
    except KeyboardInterrupt:
        pass


@main.command()
@socket_option
@click.option("--json", "as_json", is_flag=True)
def caps(socket_path: str, as_json: bool) -> None:
    """The codecs and pixel formats the device offers (asks the device with a CAPS task)."""
    import guestlib

    try:
        with guestlib.attach(socket_path, name="caps", region_size=2 << 20, ring_entries=16) as dev:
            doc = dev.caps()
    except guestlib.DeviceGone as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    t = Table(title=f"device codecs (FFmpeg via PyAV {doc.get('pyav_version', '?')})")
    for col in ("codec", "encoder", "enc", "decoder", "dec", "input pix_fmts", "output pix_fmts"):
        t.add_column(col)
    for c in doc["codecs"]:
        enc, dec = c["encoder"], c["decoder"]
        t.add_row(c["name"], enc["impl"], "yes" if enc["available"] else "[red]no[/]", dec["impl"],
                  "yes" if dec["available"] else "[red]no[/]", ",".join(enc["pix_fmts"]), ",".join(dec["pix_fmts"]))
    console.print(t)
    g = doc.get("geometry", {})
    console.print(f"geometry caps: {g.get('max_width')}x{g.get('max_height')}, {g.get('max_pixels')} pixels")


# --- demo ----------------------------------------------------------------------------------
@contextmanager
def embedded_hostd(channels: int = 0, **overrides: Any) -> Iterator[Any]:
    """hostd in-process in a private temporary runtime directory (no root, no service)."""
    from hostd.config import Config
    from hostd.daemon import Hostd

    with tempfile.TemporaryDirectory(prefix="vmediad-") as rt:
        cfg = Config(socket=Path(rt) / "hostd.sock", channels=channels, region_max=512 << 20, **overrides)
        with Hostd(cfg) as h:
            yield h


@main.command()
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("vmediad-demo-out"),
              show_default=True)
@click.option("--size", default="640x360", show_default=True)
@click.option("--frames", default=90, show_default=True, type=click.IntRange(1))
@click.option("--channels", default=0, show_default=True, help="0: CPU count")
def demo(output: Path, size: str, frames: int, channels: int) -> None:
    """Start hostd in-process, run 4 fake VMs (encode, decode, transcode) at once, print the summary."""
    from vmediad.fakevm import VmSpec

    logs.configure("warning")
    width, height = _size(size)
    output.mkdir(parents=True, exist_ok=True)
    with embedded_hostd(channels) as h:
        console.print(f"[bold]vmediad demo[/]: hostd in-process at {h.socket_path}, "
                      f"{h.device.channels_n} channels, 4 fake VMs, {frames} frames at {width}x{height}")
        plan = [("vm0", "encode", "h264"), ("vm1", "decode", "h264"), ("vm2", "transcode", "h264"),
                ("vm3", "encode", "vp9")]
        specs = [VmSpec(n, h.socket_path, w, c, width, height, frames, output=str(output), region_size=64 << 20)
                 for n, w, c in plan]
        reports = run_fleet(specs, console)
        stats = h.device.statistics()
    console.print(summary_table(reports, "demo summary"))
    console.print(f"device: {sum(c['tasks'] for c in stats['channels'])} tasks on {len(stats['channels'])} channels; "
                  f"outputs in {output.resolve()}")
    if any(r.state != "done" for r in reports):
        for r in reports:
            if r.state != "done":
                console.print(f"[red]{r.name}: {r.state} {r.detail}[/]")
                if r.extra.get("traceback"):
                    console.print(r.extra["traceback"])
        sys.exit(1)


# --- benchmarks -----------------------------------------------------------------------------
@main.group()
def bench() -> None:
    """Benchmarks: ratios against a floor measured in the same run."""


@bench.command("transport")
@click.option("--n", default=5000, show_default=True, help="nop round trips")
@click.option("--idle", "idle_s", default=30.0, show_default=True, help="seconds of idle CPU measurement")
@click.option("--json-out", type=click.Path(path_type=Path), help="write the results as JSON")
def bench_transport(n: int, idle_s: float, json_out: Path | None) -> None:
    """nop round trip, batched nop/s, COPY vs memcpy, idle CPU."""
    from vmediad.bench import transport
    from vmediad.bench.common import save

    logs.configure("warning")
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


@bench.command("codec")
@click.option("--frames", default=120, show_default=True)
@click.option("--quick", is_flag=True, help="720p H.264 only, fewer frames")
@click.option("--case", "only", multiple=True,
              help='run only cases whose name has all these words, e.g. "decode" or "h264 720p" (repeatable)')
@click.option("--json-out", type=click.Path(path_type=Path))
def bench_codec(frames: int, quick: bool, only: tuple[str, ...], json_out: Path | None) -> None:
    """fps through the device vs direct in-process PyAV with identical options."""
    from vmediad.bench import codec as cbench
    from vmediad.bench.common import save

    logs.configure("warning")
    try:
        cbench.select(cbench.QUICK if quick else cbench.FULL, list(only))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--case") from None
    res = cbench.run(frames=frames, quick=quick, only=list(only),
                     progress=lambda m: console.print(f"[dim]{m}[/]"))
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
    from vmediad.bench import layers as lbench
    from vmediad.bench.common import save

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

    from vmediad.bench.combine import CombineError, combine
    from vmediad.bench.common import save

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


@main.command()
@click.option("--tasks", default=100_000, show_default=True, help="mixed tasks in total")
@click.option("--guests", default=8, show_default=True)
@click.option("--corrupt", "corrupt_ratio", default=0.05, show_default=True, help="share of corrupt tasks")
@click.option("--restarts", default=0, show_default=True, help="hostd SIGKILL+restart cycles during the run")
@click.option("--json-out", type=click.Path(path_type=Path))
def soak(tasks: int, guests: int, corrupt_ratio: float, restarts: int, json_out: Path | None) -> None:
    """Long mixed run with corrupt input: RSS, fd and shm counts must stay flat."""
    from vmediad import soak as soak_mod
    from vmediad.bench.common import save

    logs.configure("warning")
    with Progress(TextColumn("[bold]soak"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("", total=tasks)

        def cb(done: int, note: str = "") -> None:
            progress.update(bar, completed=done, description=note)

        res = soak_mod.run(tasks=tasks, guests=guests, corrupt_ratio=corrupt_ratio, restarts=restarts,
                           progress_cb=cb)
    save(res, json_out)
    click.echo(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
