"""The ``vmediad vm`` group (spawn, list, kill) and the fake-VM fleet runner ``run_fleet`` that ``demo`` shares."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vmediad.tools.cli_common import (
    HARD_STOP_S,
    NO_HOSTD_HINT,
    PLAIN_PROGRESS_S,
    SOFT_STOP_S,
    _control_exit,
    _size,
    console,
    err_console,
    socket_option,
)


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




@click.group()
def vm() -> None:
    """Fake VMs: guest processes that use the device."""


@vm.command("spawn")
@socket_option
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 64),
              help="number of VMs: guest processes, each with its own region, all running WORKLOAD")
@click.option("--name-prefix", default="vm", show_default=True, help="VMs are named PREFIX0, PREFIX1, ...")
@click.option("--workload", type=click.Choice(["encode", "decode", "transcode", "play"]), default="encode",
              show_default=True, help="encode a moving test pattern; decode or transcode --input; play: "
                                      "decode --input and present it on the shared screen at its frame rate")
@click.option("--audio", type=click.Choice(["copy", "drop"]), default="copy", show_default=True,
              help="transcode: copy the input's audio (and other non-video streams) unchanged, or drop them")
@click.option("--display/--no-display", "show", default=False, show_default=True,
              help="each VM also shows the pictures it works on on the shared screen (play always does)")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False),
              help="video file to decode, transcode or play (default: a built-in test clip, encoded on the "
                   "device first); not allowed with encode")
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
             size: str, frames: int | None, output: Path, as_json: bool, kind: str, audio: str,
             show: bool) -> None:
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
                    output=str(output), input_codec=input_codec, display=show, audio=audio) for i in range(count)]
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
    from vmediad.tools.qemufleet import QemuFleet, vm_socket

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
