"""The vmediad command line (click + rich): ``main``, the entry point, with hostd, status, caps, demo, soak.

The ``vm`` group lives in ``vmediad.tools.cli_vm``, ``bench`` in ``vmediad.tools.cli_bench``, the shared
consoles and options in ``vmediad.tools.cli_common``; all are registered on ``main`` here and re-exported.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmediad import logs
from vmediad.tools.cli_bench import bench, bench_codec, bench_combine, bench_layers, bench_transport
from vmediad.tools.cli_common import (
    HARD_STOP_S,
    NO_HOSTD_HINT,
    PLAIN_PROGRESS_S,
    SOFT_STOP_S,
    ConfigExit,
    _size,
    console,
    err_console,
    socket_option,
)
from vmediad.tools.cli_display import display
from vmediad.tools.cli_vm import run_fleet, summary_table, vm, vm_kill, vm_list, vm_spawn

__all__ = [
    "HARD_STOP_S", "NO_HOSTD_HINT", "PLAIN_PROGRESS_S", "SOFT_STOP_S", "ConfigExit", "bench", "bench_codec",
    "bench_combine", "bench_layers", "bench_transport", "caps", "console", "demo", "embedded_hostd",
    "err_console", "hostd", "main", "run_fleet", "soak", "socket_option", "status", "status_tables",
    "summary_table", "vm", "vm_kill", "vm_list", "vm_spawn",
]


@click.group()
@click.version_option(package_name="vmediad")
def main() -> None:
    """vmediad: an emulated mediated video-codec device shared by many guests."""


@main.command()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              help="control socket path [default: $RUNTIME_DIRECTORY/hostd.sock under systemd, else "
                   "/run/vmediad/hostd.sock when writable (root), else $XDG_RUNTIME_DIR/vmediad/hostd.sock "
                   "(/tmp/vmediad-UID/vmediad/hostd.sock without XDG_RUNTIME_DIR)]. Guests and client "
                   "commands use $VMEDIAD_SOCKET, else the same rule: export VMEDIAD_SOCKET when you pass "
                   "--socket")
@click.option("--channels", type=int, help="hardware channels (default: CPU count)")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file "
              "(default /etc/vmediad/config.toml if present)")
@click.option("--policy", type=click.Choice(["fifo", "round-robin", "weighted"]))
@click.option("--metrics", help="serve Prometheus metrics on HOST:PORT")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--fault-injection", is_flag=True, default=None, hidden=True)
@click.option("--ivshmem-dir", type=click.Path(path_type=Path, file_okay=False),
              help="serve QEMU VMs: one ivshmem-server socket per VM in this directory (docs/vms.md)")
@click.option("--display-http", metavar="[HOST:]PORT",
              help="serve the shared screen's live page, e.g. 8080 (loopback) or 0.0.0.0:8080")
@click.option("--display-size", metavar="WxH", help="the shared screen's size [default: 1280x720]")
@click.option("--display-refresh", type=float, metavar="HZ",
              help="the rate the screen is shown at (live page, recorder) [default: 30]")
@click.option("--display-layout", metavar="WORDS", help="the layout at start, e.g. \"main vm0\" [default: grid]")
def hostd(socket_path: Path | None, channels: int | None, config_path: Path | None, policy: str | None,
          metrics: str | None, log_level: str, fault_injection: bool | None, ivshmem_dir: Path | None,
          display_http: str | None, display_size: str | None, display_refresh: float | None,
          display_layout: str | None) -> None:
    """Run the host daemon in the foreground (systemd: Type=notify).

    Run as an ordinary user, the socket is $XDG_RUNTIME_DIR/vmediad/hostd.sock (see --socket); the
    same path is what guestlib.attach() and the client commands find without VMEDIAD_SOCKET.
    """
    from hostd import config as hconfig
    from hostd.daemon import run_foreground
    from vmediad.errors import ConfigError

    logs.configure(log_level)
    try:
        cfg = hconfig.load(config_path or hconfig.DEFAULT_CONFIG_PATH, {
            "socket": socket_path, "channels": channels, "policy": policy, "metrics": metrics,
            "fault_injection": fault_injection,
            "ivshmem_dir": str(ivshmem_dir.absolute()) if ivshmem_dir is not None else None,
            "display_http": display_http, "display_refresh_hz": display_refresh, "display_layout": display_layout,
            **_display_size(display_size),
        })
    except ConfigError as e:
        raise ConfigExit(str(e)) from None
    sys.exit(run_foreground(cfg))



def _display_size(value: str | None) -> dict[str, int]:
    if value is None:
        return {}
    w, h = _size(value)
    return {"display_width": w, "display_height": h}


# --- status / caps -----------------------------------------------------------------------
def status_tables(s: dict[str, Any]) -> list[Table]:
    dev = Table(title=f"device: {s['state']}, policy {s['policy']}, cap {s['cap']}, uptime {s['uptime_s']:.0f}s, "
                      f"epoch {s['epoch']:#x}")
    for col in ("channel", "busy", "vm", "op", "sessions", "tasks", "busy s"):
        dev.add_column(col)
    for c in s["channels"]:
        dev.add_row(str(c["index"]), "yes" if c["busy"] else "-", str(c["vm"] or "-"), c["op"] or "-",
                    str(c["bound_sessions"]), str(c["tasks"]), f"{c['busy_seconds']:.3f}")
    totals = s.get("totals")
    if isinstance(totals, dict):
        tasks = totals.get("tasks", [])
        failed = sum(t["count"] for t in tasks if t.get("result") != "OK")
        dev.caption = (f"since start: {sum(t['count'] for t in tasks)} tasks ({failed} failed), "
                       f"{totals.get('frames', 0)} frames, {totals.get('timeouts', 0)} timeouts, "
                       f"{totals.get('worker_restarts', 0)} worker restarts")
    vms = Table(title=f"{s['guests']} guests")
    for col in ("vm", "name", "kind", "transport", "done", "failed", "timeouts", "queued", "inflight", "p50 µs",
                "p99 µs", "MB moved", "sessions", "errors"):
        vms.add_column(col)
    for v in s["vms"]:
        errs = ", ".join(f"{k}={n}" for k, n in sorted(v["errors"].items())) or "-"
        vms.add_row(str(v["vm"]), v["name"], v.get("kind", "process"), v.get("transport", "memfd"),
                    str(v["tasks_done"]), str(v["tasks_failed"]), str(v.get("timeouts", 0)),
                    str(v["queue_depth"]), str(v["inflight"]), f"{v['latency']['p50_us']:.0f}",
                    f"{v['latency']['p99_us']:.0f}", f"{v['bytes_moved'] / 1e6:.1f}", str(v["sessions"]), errs)
    d = s.get("display")
    if not isinstance(d, dict):
        return [dev, vms]
    shown = [v for v in d.get("vms", []) if v.get("commits") or v.get("output")]
    screen = Table(title=f"shared screen {d['width']}x{d['height']} at {d['refresh_hz']:g} Hz: "
                         f"{d['compositions']} compositions, {d['screen_fps']:.0f} fps now, compose p50 "
                         f"{d['compose_ms_p50']:.1f} ms, {d['compose_cpu_s']:.1f} s CPU")
    for col in ("vm", "name", "state", "commit fps", "presented", "dropped", "rejected", "latch p99 ms"):
        screen.add_column(col)
    for v in shown:
        screen.add_row(str(v["vm"]), v["name"], v["state"], f"{v['commit_fps']:.1f}", str(v["presented"]),
                       str(v["dropped"]), str(v["rejected"]), f"{v['latency_p99_ms']:.1f}")
    return [dev, vms, screen]


class _Stopped(Exception):
    """SIGINT or SIGTERM ended an endless command (status --watch)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise _Stopped in the main thread (restored afterwards)."""

    def raise_stopped(signum: int, _frame: object) -> None:
        raise _Stopped(signum)

    old = {sig: signal.signal(sig, raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@main.command()
@socket_option
@click.option("--json", "as_json", is_flag=True,
              help="print the raw statistics() snapshot; with --watch, a stream of JSON lines")
@click.option("--watch", is_flag=True,
              help="refresh every second until Ctrl-C; with --json, one {\"status\": snapshot} line a second "
                   "and each hostd event (attach, detach, worker crash, timeout, ...) as its own line when it "
                   "happens")
def status(socket_path: str, as_json: bool, watch: bool) -> None:
    """Per-VM and device status from a running hostd.

    Exit status: 0, 1 when hostd cannot be reached; --watch ends with 130 on Ctrl-C (SIGINT)
    and 143 on SIGTERM, as `vm spawn` does.
    """
    from guestlib.device import DeviceGone, hostd_status

    def fetch() -> dict[str, Any]:
        try:
            return hostd_status(socket_path)
        except DeviceGone as e:
            raise click.ClickException(f"{e} ({NO_HOSTD_HINT})") from None

    if as_json and not watch:
        click.echo(json.dumps(fetch(), indent=2))
        return
    if not watch:
        for t in status_tables(fetch()):
            console.print(t)
        return
    try:
        with _stop_on_signals():
            if as_json:
                _watch_json(socket_path, fetch)
            else:
                from rich.console import Group

                with Live(Group(*status_tables(fetch())), console=console, refresh_per_second=2) as live:
                    while True:
                        time.sleep(1)
                        live.update(Group(*status_tables(fetch())))
    except _Stopped as e:
        sys.exit(128 + e.signum)


def _watch_json(socket_path: str, fetch: Any) -> None:
    """One JSON object per line on stdout: a status snapshot each second, and each event as it
    arrives (a reader thread); every line is flushed at once."""
    import threading

    from guestlib.control import ControlError, events

    try:
        stream = events(socket_path)  # subscribed before the first snapshot: no event falls between
    except ControlError as e:
        raise click.ClickException(f"{e} ({NO_HOSTD_HINT})" if e.kind == "unreachable" else str(e)) from None
    out_lock = threading.Lock()

    def emit(obj: dict[str, Any]) -> None:
        line = json.dumps(obj, default=str) + "\n"
        with out_lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    def relay() -> None:
        for ev in stream:
            emit(ev)

    reader = threading.Thread(target=relay, name="vmediad-events", daemon=True)
    reader.start()
    try:
        while True:
            emit({"status": fetch()})
            time.sleep(1)
    finally:
        stream.close()  # the reader then sees the end of the stream
        reader.join(2)


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


# --- demo -------------------------------------------------------------------------------------
class _ScreenCapture(threading.Thread):
    """While the demo's VMs run: a PNG of the screen once they all show something, then an MP4."""

    def __init__(self, socket_path: str, output: Path, seconds: float = 3.0) -> None:
        super().__init__(name="screen-capture", daemon=True)
        self.socket_path, self.output, self.seconds = socket_path, output, seconds
        self.saved: list[str] = []
        self.error = ""
        self._stop_event = threading.Event()

    def run(self) -> None:
        from guestlib.control import display_list
        from vmediad.tools.screen import record, snapshot

        try:
            deadline = time.monotonic() + 30
            while not self._stop_event.is_set() and time.monotonic() < deadline:
                vms = display_list(self.socket_path)["vms"]
                if len(vms) >= 4 and all(v["presented"] for v in vms):
                    break
                self._stop_event.wait(0.1)
            png = self.output / "screen.png"
            snapshot(self.socket_path, png)
            self.saved.append(f"{png.name} saved")
            mp4 = self.output / "screen.mp4"
            got = record(self.socket_path, mp4, self.seconds)
            self.saved.append(f"{mp4.name}: {got['frames']} frames")
        except Exception as e:  # the demo goes on without its screen files, and says why
            self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        self._stop_event.set()
        self.join(self.seconds + 10)


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
    """Start hostd in-process, run 4 fake VMs (encode, decode, transcode, play) at once, each showing
    its pictures on the shared screen; print the live page's URL and the summary, and leave the
    VMs' outputs plus screen.png and screen.mp4 (the screen, encoded through the device) in OUTPUT."""
    from vmediad.tools.fakevm import VmSpec

    logs.configure("warning")
    width, height = _size(size)
    output.mkdir(parents=True, exist_ok=True)
    with embedded_hostd(channels, display_http="127.0.0.1:0", display_layout="grid aspect=fit") as h:
        url = h.display_http.url if h.display_http is not None else "-"
        console.print(f"[bold]vmediad demo[/]: hostd in-process at {h.socket_path}, "
                      f"{h.device.channels_n} channels, 4 fake VMs, {frames} frames at {width}x{height}")
        console.print(f"the shared screen, live: [bold]{url}[/]")
        plan = [("vm0", "encode", "h264"), ("vm1", "decode", "h264"), ("vm2", "transcode", "h264"),
                ("vm3", "play", "h264")]
        specs = [VmSpec(n, h.socket_path, w, c, width, height, frames, output=str(output), region_size=64 << 20,
                        display=True) for n, w, c in plan]
        screen = _ScreenCapture(h.socket_path, output)
        screen.start()
        try:
            reports, stopped_by = run_fleet(specs, err_console)
        finally:
            screen.stop()
        stats = h.device.statistics()
        shown = h.display.statistics()
    console.print(summary_table(reports, "demo summary"))
    console.print(f"device: {sum(c['tasks'] for c in stats['channels'])} tasks on {len(stats['channels'])} channels; "
                  f"outputs in {output.resolve()}")
    console.print(f"screen: {shown['compositions']} compositions ({shown['compose_ms_p50']:.1f} ms p50); "
                  + "; ".join(screen.saved or ["no screen saved: " + (screen.error or "the VMs ended first")]))
    if stopped_by is not None:
        sys.exit(128 + stopped_by)
    if any(r.state != "done" for r in reports):
        for r in reports:
            if r.state != "done":
                console.print(f"[red]{r.name}: {r.state} {r.detail}[/]")
                if r.extra.get("traceback"):
                    console.print(r.extra["traceback"])
        sys.exit(1)




@main.command()
@click.option("--tasks", default=100_000, show_default=True, help="mixed tasks in total")
@click.option("--guests", default=8, show_default=True)
@click.option("--corrupt", "corrupt_ratio", default=0.05, show_default=True, help="share of corrupt tasks")
@click.option("--restarts", default=0, show_default=True, help="hostd SIGKILL+restart cycles during the run")
@click.option("--json-out", type=click.Path(path_type=Path))
def soak(tasks: int, guests: int, corrupt_ratio: float, restarts: int, json_out: Path | None) -> None:
    """Long mixed run with corrupt input: RSS, fd and shm counts must stay flat."""
    from vmediad.tools import soak as soak_mod
    from vmediad.tools.bench.common import save

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

main.add_command(vm)
main.add_command(display)
main.add_command(bench)


if __name__ == "__main__":
    main()
