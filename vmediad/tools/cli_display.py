"""``vmediad display``: the shared screen of a running hostd (list, layout, snapshot, record)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from vmediad.tools.cli_common import _control_exit, console, err_console, socket_option


@click.group()
def display() -> None:
    """The shared screen: every VM's display output composed into one picture by hostd."""


@display.command("list")
@socket_option
@click.option("--json", "as_json", is_flag=True, help="print hostd's display snapshot as JSON")
def display_list(socket_path: str, as_json: bool) -> None:
    """The VMs on the screen: state, viewport, commit rate, presented and dropped commits.

    Exit status: 0, 1 when hostd cannot be reached."""
    from guestlib.control import ControlError
    from guestlib.control import display_list as get

    try:
        state = get(socket_path)
    except ControlError as e:
        raise _control_exit(e) from None
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    t = Table(title=f"screen {state['width']}x{state['height']} at {state['refresh_hz']:g} Hz, layout "
                    f"{state['layout']['kind']}, {state['screen_fps']:.0f} screen fps, compose p50 "
                    f"{state['compose_ms_p50']:.1f} ms")
    for col in ("vm", "name", "state", "output", "viewport", "z", "commit fps", "presented", "dropped", "p99 ms"):
        t.add_column(col)
    for v in state["vms"]:
        vp, out = v["viewport"], v["output"]
        t.add_row(str(v["vm"]), v["name"], v["state"],
                  f"{out['width']}x{out['height']} {out['format']}" if out else "-",
                  f"{vp['w']}x{vp['h']}+{vp['x']}+{vp['y']}" + ("" if vp["visible"] else " (hidden)"), str(vp["z"]),
                  f"{v['commit_fps']:.1f}", str(v["presented"]), str(v["dropped"]), f"{v['latency_p99_ms']:.1f}")
    console.print(t)


@display.command("layout")
@socket_option
@click.argument("words", nargs=-1, required=True)
def display_layout(socket_path: str, words: tuple[str, ...]) -> None:
    """Change the layout: ``grid``, ``main [VM]`` or ``rects VM=X,Y,W,H[,Z] ...``, each with
    optional ``aspect=fit|fill|stretch`` and (grid, main) ``hide=VM,...``.

    Exit status: 0, 1 when hostd refuses the layout (one line: why) or cannot be reached."""
    from guestlib.control import ControlError
    from guestlib.control import display_layout as put

    try:
        state = put(list(words), socket_path)
    except ControlError as e:
        raise _control_exit(e) from None
    for v in state["vms"]:
        vp = v["viewport"]
        console.print(f"{v['name']}: {vp['w']}x{vp['h']}+{vp['x']}+{vp['y']} z={vp['z']}"
                      + ("" if vp["visible"] else " hidden"))


@display.command("snapshot")
@socket_option
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def display_snapshot(socket_path: str, out: Path) -> None:
    """Save the current screen as a lossless PNG.  Exit status: 0, 1 on failure."""
    from guestlib.control import ControlError
    from vmediad.tools.screen import snapshot

    try:
        seq, w, h = snapshot(socket_path, out)
    except ControlError as e:
        raise _control_exit(e) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror or e}") from None
    console.print(f"{out}: {w}x{h} screen #{seq}")


@display.command("record")
@socket_option
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(0.1, 3600))
@click.option("--fps", default=30, show_default=True, type=click.IntRange(1, 120))
def display_record(socket_path: str, out: Path, seconds: float, fps: int) -> None:
    """Record the screen for --seconds into OUT (H.264 in MP4), encoded through the device.

    Exit status: 0, 1 on failure."""
    import guestlib
    from guestlib.control import ControlError
    from vmediad.tools.screen import record

    def progress(frames: int, at: float) -> None:
        if frames % fps == 0:
            err_console.print(f"recording: {at:.0f}/{seconds:g} s, {frames} frames")

    try:
        got = record(socket_path, out, seconds, fps=fps, on_frame=progress)
    except (ControlError, guestlib.DeviceError, guestlib.AttachError, guestlib.DeviceGone) as e:
        raise _control_exit(e) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror or e}") from None
    console.print(f"{out}: {got['frames']} frames of {got['width']}x{got['height']} in {seconds:g} s")
