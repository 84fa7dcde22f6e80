"""The one error tree: every error raised on purpose has one root, and a bug in a control
thread makes a real hostd exit 70 instead of dying silently in that thread."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import guestlib
import guestlib.control
import guestlib.heap
import guestlib.media
from vmediad import errors
from vmediad.abi import ErrorCode
from vmediad.errors import EXIT_INTERNAL, ClientError, VmediadError


def test_every_public_error_has_the_one_root() -> None:
    client = [guestlib.DeviceError, guestlib.DeviceGone, guestlib.SessionLost, guestlib.AttachError,
              guestlib.OutOfMemory, guestlib.control.ControlError, guestlib.media.MediaError]
    for cls in client:
        assert issubclass(cls, ClientError), cls
    from codec_backend.av_sessions import CodecError

    host = [CodecError, errors.GuestFault, errors.BackendFailure, errors.InternalError, errors.ConfigError,
            errors.StartupError, errors.ProtocolError, ClientError]
    for cls in host:
        assert issubclass(cls, VmediadError) and cls is not VmediadError, cls
    # OutOfMemory stays catchable as the built-in it used to be.
    assert issubclass(guestlib.OutOfMemory, MemoryError)
    assert guestlib.DeviceGone().code == ErrorCode.DEVICE_GONE
    # The tree in the module docstring names every class the module defines.
    names = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert names <= set((errors.__doc__ or "").split()) | {n + "," for n in names}, names


BUGGY_HOSTD = textwrap.dedent("""
    import sys
    from hostd import control, config
    from hostd.daemon import run_foreground
    from vmediad import logs

    logs.configure("info")

    def broken(self):
        raise RuntimeError("a bug in list_vms")

    control.ControlServer.list_vms = broken
    sys.exit(run_foreground(config.Config(socket=sys.argv[1], channels=1)))
""")


def test_a_bug_in_a_control_thread_makes_hostd_exit_70(tmp_path: Path) -> None:
    sock = tmp_path / "h.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "VMEDIAD_SOCKET")}
    p = subprocess.Popen([sys.executable, "-c", BUGGY_HOSTD, str(sock)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        end = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < end:
            time.sleep(0.02)
        assert sock.exists(), p.stderr.read() if p.poll() is not None and p.stderr else "no socket"
        # A plain request is still served before the bug is hit.
        assert guestlib.hostd_status(str(sock))["state"] == "running"
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b'{"cmd":"list"}\n')
            s.settimeout(10)
            assert s.recv(4096) == b""  # the connection dies with the bug, unanswered
        rc = p.wait(timeout=20)
        _out, err = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == EXIT_INTERNAL, err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    bug = [r for r in records if r.get("event") == "internal error in a control thread"]
    assert len(bug) == 1 and "a bug in list_vms" in bug[0].get("exception", ""), err
    assert any(r.get("event") == "internal error; exiting for a restart" for r in records), err
    assert not sock.exists()  # stopped in order: the socket it bound is gone
