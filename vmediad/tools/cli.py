"""The vmediad command line (click + rich)."""

from __future__ import annotations

import json
import os
import signal
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
from vmediad.tools.bench.common import LAYERS

# Not a terminal (pipes, CI logs): wide enough that tables do not truncate names.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
# Progress and notes: stdout stays clean for results (a table, or JSON with --json).
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

NO_HOSTD_HINT = "start `vmediad hostd` or pass --socket / set VMEDIAD_SOCKET"
SOFT_STOP_S = 5.0  # a clean stop may take this long (an encoder's flush) before the VMs get SIGTERM
HARD_STOP_S = 2.0  # after SIGTERM, before SIGKILL
PLAIN_PROGRESS_S = 2.0  # period of the progress lines when stderr is not a terminal


class ConfigExit(click.ClickException):
    exit_code = 78  # EX_CONFIG: the unit's RestartPreventExitStatus=78 stops restart loops


def _socket_default() -> str:
    env = os.environ.get("VMEDIAD_SOCKET")
    if env:
        return env
    from vmediad.protocol import default_socket_path

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
def hostd(socket_path: Path | None, channels: int | None, config_path: Path | None, policy: str | None,
          metrics: str | None, log_level: str, fault_injection: bool | None, ivshmem_dir: Path | None) -> None:
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
        })
    except ConfigError as e:
        raise ConfigExit(str(e)) from None
    sys.exit(run_foreground(cfg))


# --- fake VMs ----------------------------------------------------------------------------
class _ProgressView:
    """Live rows on a terminal (rich), else one plain line per VM every PLAIN_PROGRESS_S seconds."""

    def __init__(self, reports: list[Any], out: Console) -> None:
        self.out = out
        self.live = out.is_terminal
        self.next_lines = time.monotonic() + PLAIN_PROGRESS_S
        self.t0 = time.monotonic()
        self.progress = Progress(
            TextColumn("[bold]{task.fields[name]}"), TextColumn("{task.fields[workload]:>9} {task.fields[codec]:<5}"),
            BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[fps]:>6.1f} fps"),
            TextColumn("err {task.fields[errors]}"), TextColumn("{task.fields[state]}"), TimeElapsedColumn(),
            console=out, transient=False, disable=not self.live,
        )
        self.ids = {r.name: self.progress.add_task(r.name, total=r.total, name=r.name, workload=r.workload,
                                                   codec=r.codec, fps=0.0, errors=0, state=r.state)
                    for r in reports}

    def __enter__(self) -> _ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def note(self, text: str) -> None:
        self.out.print(text)

    def update(self, r: Any) -> None:
        self.progress.update(self.ids[r.name], completed=r.frames, total=r.total, codec=r.codec, fps=r.fps,
                             errors=r.errors, state=r.state)
        if not self.live and r.state in ("done", "failed", "stopped"):
            self.out.print(self._line(r), markup=False, highlight=False)

    def tick(self, reports: list[Any]) -> None:
        if self.live or time.monotonic() < self.next_lines:
            return
        self.next_lines += PLAIN_PROGRESS_S
        for r in reports:
            if r.state not in ("done", "failed", "stopped"):
                self.out.print(self._line(r), markup=False, highlight=False)

    def _line(self, r: Any) -> str:
        of = f"/{r.total}" if r.total else ""
        return (f"[{time.monotonic() - self.t0:6.1f}s] {r.name} {r.workload} {r.codec} {r.state} "
                f"{r.frames}{of} frames {r.fps:.1f} fps {r.errors} errors")


def run_fleet(specs: list[Any], out: Console, fleet: Any = None) -> tuple[list[Any], int | None]:
    """Spawn the VMs, show their progress on ``out``, return (final reports, stop signal or None).

    SIGINT or SIGTERM stops the VMs cleanly (each finishes its frame and closes its output);
    a second signal, or SOFT_STOP_S without an end, stops them hard (SIGTERM: their device
    calls fail at once), and HARD_STOP_S later they are killed.  Must run in the main thread.
    """
    from vmediad.tools.fakevm import FINAL_STATES, Fleet

    fleet = fleet if fleet is not None else Fleet(specs)
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        fleet.start()
        seen = 0
        stage = 0  # 0 running, 1 clean stop asked, 2 SIGTERM sent, 3 SIGKILL sent
        deadline: float | None = None
        with _ProgressView(fleet.results(), out) as view:
            while not all(r.state in FINAL_STATES for r in fleet.results()):
                for r in fleet.poll(0.25):
                    view.update(r)
                view.tick(fleet.results())
                escalate = len(received) > seen and stage > 0
                if len(received) > seen and stage == 0:
                    stage, deadline = 1, time.monotonic() + SOFT_STOP_S
                    view.note(f"[yellow]{signal.Signals(received[0]).name}: stopping the VMs cleanly... "
                              "(again to stop them at once)[/]")
                    fleet.signal_all(signal.SIGINT)
                seen = len(received)
                if escalate or (deadline is not None and time.monotonic() >= deadline):
                    if stage == 1:
                        stage, deadline = 2, time.monotonic() + HARD_STOP_S
                        view.note("[yellow]stopping the VMs at once (SIGTERM)[/]")
                        fleet.signal_all(signal.SIGTERM)
                    elif stage == 2:
                        stage, deadline = 3, None
                        view.note("[red]killing the VMs (SIGKILL)[/]")
                        fleet.signal_all(signal.SIGKILL)
    except BaseException:
        fleet.signal_all(signal.SIGTERM)  # a bug here: stop the VMs at once, close() reaps them
        raise
    finally:
        fleet.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return fleet.results(), (received[0] if received else None)


def summary_table(reports: list[Any], title: str = "fake VMs") -> Table:
    t = Table(title=title)
    for col in ("vm", "workload", "codec", "state", "frames", "fps", "errors", "output"):
        t.add_column(col, justify="right" if col in ("frames", "fps", "errors") else "left")
    for r in reports:
        style = {"done": "green", "failed": "red", "stopped": "yellow"}.get(r.state, "")
        t.add_row(r.name, r.workload, r.codec, f"[{style}]{r.state}[/]" if style else r.state, str(r.frames),
                  f"{r.fps:.1f}", str(r.errors),
                  Path(r.output).name if r.output and r.state != "failed" else r.detail)
    return t


@main.group()
def vm() -> None:
    """Fake VMs: guest processes that use the device."""


@vm.command("spawn")
@socket_option
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 64),
              help="number of VMs: guest processes, each with its own region, all running WORKLOAD")
@click.option("--name-prefix", default="vm", show_default=True, help="VMs are named PREFIX0, PREFIX1, ...")
@click.option("--workload", type=click.Choice(["encode", "decode", "transcode"]), default="encode",
              show_default=True, help="encode a moving test pattern; decode or transcode --input")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              help="video file to decode or transcode (default: a built-in test clip, encoded on the device "
                   "first); not allowed with encode")
@click.option("--codec", default="h264", show_default=True,
              type=click.Choice(["h264", "hevc", "vp9", "av1", "mjpeg", "mpeg4", "vp8"]),
              help="encode: the codec to encode; transcode: the OUTPUT codec (the input's is detected); "
                   "decode: the codec of the built-in test clip (with --input, the input's codec is used)")
@click.option("--size", default="1280x720", show_default=True,
              help="WIDTHxHEIGHT (even, at least 16) of the encoded pattern and of the built-in test clip; "
                   "an --input keeps its own size")
@click.option("--frames", type=click.IntRange(1),
              help="encode: frames to encode [default: 120]; decode/transcode: stop after this many frames "
                   "[default: the whole input]")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("vmediad-out"),
              show_default=True, help="directory for the VMs' output files")
@click.option("--json", "as_json", is_flag=True,
              help="print only the summary, as JSON, on stdout (progress always goes to stderr)")
@click.option("--kind", type=click.Choice(["process", "qemu"]), default="process", show_default=True,
              help="process: each VM a host process; qemu: each VM a real QEMU guest reaching hostd through "
                   "ivshmem (hostd needs --ivshmem-dir; TCG unless KVM is real; docs/vms.md)")
def vm_spawn(socket_path: str, count: int, name_prefix: str, workload: str, input_path: str | None, codec: str,
             size: str, frames: int | None, output: Path, as_json: bool, kind: str) -> None:
    """Spawn COUNT guest processes, each with its own region, and run WORKLOAD on the device.

    Progress goes to stderr: live rows on a terminal, else one line per VM every 2 s.
    Ctrl-C (SIGINT) or SIGTERM stops the VMs cleanly (outputs finished); a second one stops
    them at once.

    Exit status: 0 when every VM is done (a VM that skipped damaged input packets, as ffmpeg
    does, is done; they count as errors), 1 when a VM failed or the input cannot be used,
    2 for a usage error, 128+N when stopped by signal N (130 Ctrl-C, 143 SIGTERM).
    """
    from vmediad.tools.fakevm import ENCODE_FRAMES, VmSpec

    width, height = _size(size)
    if workload == "encode" and input_path is not None:
        raise click.UsageError("--input is for decode and transcode; encode draws its own test pattern")
    if not Path(socket_path).exists():
        raise click.ClickException(f"no hostd socket at {socket_path} ({NO_HOSTD_HINT})")
    input_codec = None
    if input_path is not None:
        input_codec = _probe_input(input_path)
    if workload == "encode" and frames is None:
        frames = ENCODE_FRAMES
    specs = [VmSpec(f"{name_prefix}{i}", socket_path, workload, codec, width, height, frames, input=input_path,
                    output=str(output), input_codec=input_codec) for i in range(count)]
    fleet = _qemu_fleet(specs, socket_path) if kind == "qemu" else None
    reports, stopped_by = run_fleet(specs, err_console, fleet)
    title = "fake VMs" if fleet is None else f"QEMU VMs ({fleet.accel.name.upper()}: {fleet.accel.reason})"
    if as_json:
        click.echo(json.dumps([{**r.__dict__, "fps": r.fps, "kind": kind} for r in reports], indent=2))
    else:
        console.print(summary_table(reports, title))
    for r in reports:
        if r.state == "failed":
            err_console.print(f"{r.name}: failed: {r.detail}", style="red", markup=False, highlight=False)
        elif r.errors and r.detail:
            err_console.print(f"{r.name}: {r.state} with {r.errors} error(s): {r.detail}", style="yellow",
                              markup=False, highlight=False)
    if stopped_by is not None:
        sys.exit(128 + stopped_by)
    if any(r.state == "failed" for r in reports):
        sys.exit(1)


def _qemu_fleet(specs: list[Any], socket_path: str) -> Any:
    """The QEMU fleet of ``vm spawn --kind qemu``; a ClickException (exit 1) when it cannot run."""
    from guestlib.device import AttachError, DeviceGone
    from vmediad.tools import vmimage
    from vmediad.tools.fakevm import QemuFleet, vm_socket

    if vmimage.qemu_binary() is None:
        raise click.ClickException("qemu-system-x86_64 is not installed (run scripts/setup-vm.sh as root)")
    try:
        vm_socket(socket_path, specs[0].name)
    except AttachError as e:
        raise click.ClickException(f"hostd refused the VM socket: {e}") from None
    except DeviceGone as e:
        raise click.ClickException(f"{e} ({NO_HOSTD_HINT})") from None
    try:
        image = vmimage.build_image()
    except vmimage.VmImageError as e:
        raise click.ClickException(f"cannot build the VM image: {e}") from None
    accel = vmimage.detect_accel()
    err_console.print(f"booting {len(specs)} QEMU VM(s) with {accel.name.upper()}: {accel.reason}",
                      markup=False, highlight=False)
    return QemuFleet(specs, socket_path, image, accel)


def _probe_input(path: str) -> str:
    """The codec of the input's video stream; a ClickException (exit 1) when it cannot be used."""
    from guestlib.media import MediaError, open_video

    try:
        container, stream = open_video(path)
    except MediaError as e:
        raise click.ClickException(f"cannot use --input: {e}") from None
    with container:
        return str(stream.codec_context.name)


@vm.command("list")
@socket_option
@click.option("--json", "as_json", is_flag=True, help="print hostd's list as JSON")
def vm_list(socket_path: str, as_json: bool) -> None:
    """The guests attached to hostd: id, name, pid, state, tasks, sessions.

    Exit status: 0, 1 when hostd cannot be reached.
    """
    from guestlib.control import ControlError, list_vms

    try:
        vms = list_vms(socket_path)
    except ControlError as e:
        raise _control_exit(e) from None
    if as_json:
        click.echo(json.dumps(vms, indent=2))
        return
    t = Table(title=f"{len(vms)} guests")
    cols = ("vm", "name", "kind", "transport", "pid", "state", "tasks_done", "tasks_failed", "inflight",
            "sessions", "timeouts", "worker_pid")
    for col in cols:
        t.add_column(col.replace("_", " "), justify="right" if col not in ("name", "state", "kind", "transport")
                     else "left")
    for v in vms:
        t.add_row(*(str(v.get(col, "-")) for col in cols))
    console.print(t)


@vm.command("kill")
@socket_option
@click.argument("vm_ref", metavar="VM")
def vm_kill(socket_path: str, vm_ref: str) -> None:
    """Detach guest VM (its name, or its numeric id) and reclaim its region, worker and sessions.

    The guest's device calls then fail with DeviceGone; it may not re-attach with that region.
    Exit status: 0 killed, 1 when hostd refuses (no such guest, a name several guests share,
    no permission) or cannot be reached.
    """
    from guestlib.control import ControlError, kill_vm

    try:
        r = kill_vm(vm_ref, socket_path)
    except ControlError as e:
        raise _control_exit(e) from None
    state = "reclaimed" if r.get("reclaimed") else "detached; reclaiming is still in progress"
    click.echo(f"killed vm {r.get('vm')} ({r.get('name')}): {state}")


def _control_exit(e: Exception) -> click.ClickException:
    kind = getattr(e, "kind", "")
    return click.ClickException(f"{e} ({NO_HOSTD_HINT})" if kind == "unreachable" else str(e))


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
    return [dev, vms]


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
    from vmediad.tools.fakevm import VmSpec

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
        reports, stopped_by = run_fleet(specs, err_console)
        stats = h.device.statistics()
    console.print(summary_table(reports, "demo summary"))
    console.print(f"device: {sum(c['tasks'] for c in stats['channels'])} tasks on {len(stats['channels'])} channels; "
                  f"outputs in {output.resolve()}")
    if stopped_by is not None:
        sys.exit(128 + stopped_by)
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
@click.option("--quick", is_flag=True, help="720p H.264 only, fewer frames")
@click.option("--case", "only", multiple=True,
              help='run only cases whose name has all these words, e.g. "decode" or "h264 720p" (repeatable)')
@click.option("--json-out", type=click.Path(path_type=Path))
def bench_codec(frames: int, quick: bool, only: tuple[str, ...], json_out: Path | None) -> None:
    """fps through the device vs direct in-process PyAV with identical options."""
    from vmediad.tools.bench import codec as cbench
    from vmediad.tools.bench.common import save

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


if __name__ == "__main__":
    main()
