"""What every ``vmediad`` command module shares: the consoles, ``--socket``, size parsing, exit helpers."""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console

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


def _control_exit(e: Exception) -> click.ClickException:
    kind = getattr(e, "kind", "")
    return click.ClickException(f"{e} ({NO_HOSTD_HINT})" if kind == "unreachable" else str(e))
