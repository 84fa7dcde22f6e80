"""The one error tree of vmediad.

Every error vmediad raises on purpose derives from ``VmediadError``; where it ends up is fixed
by its branch::

    VmediadError
    ├── GuestFault        the guest's fault: a task status code (BAD_RANGE, BAD_ARG, ...) or an
    │                     attach refusal.  hostd lives; never raised past the device loop.
    ├── BackendFailure    the codec backend failed (BACKEND, INVALID_DATA, TIMEOUT, ...): the
    │                     task fails with its code and FFmpeg's reason; hostd lives.
    ├── InternalError     a broken invariant in hostd: hostd logs it and exits EXIT_INTERNAL (70),
    │                     and systemd restarts it.
    ├── ConfigError       a bad configuration value, named by its key: exit EXIT_CONFIG (78).
    ├── StartupError      hostd cannot start as configured (socket taken, port in use, missing
    │                     directory): one line, exit EXIT_CONFIG (78); a restart cannot fix it.
    ├── ProtocolError     a control-plane request hostd refuses: the text goes back to the peer.
    ├── CodecError        (codec_backend.av_sessions) the backend's verdict on one task: its code,
    │                     a guest's fault or a backend failure, and the reason go into the task
    │                     status.  Any other exception in a worker is a bug there: the worker's
    │                     boundary fails the task BACKEND with the exception's text.
    └── ClientError       raised to a guest program by guestlib:
        ├── DeviceError       a task ended in ERROR (``code``, and the backend's ``reason``)
        │   ├── DeviceGone    hostd went away and did not come back
        │   └── SessionLost   the session died with its worker or with hostd
        ├── AttachError       hostd refused the attach (``kind``)
        ├── ControlError      a control request failed (``kind``)
        ├── OutOfMemory       the guest's heap is full (also a MemoryError)
        └── MediaError        an input file that cannot be used

Any other exception inside hostd is a bug, treated as InternalError: each thread boundary
(device loop, control connections, worker reapers) catches it, logs it, and makes hostd exit 70.
"""

from __future__ import annotations

from vmediad.abi import ErrorCode

EXIT_INTERNAL = 70  # EX_SOFTWARE: systemd's Restart=on-failure brings hostd back
EXIT_CONFIG = 78  # EX_CONFIG: the unit's RestartPreventExitStatus=78 stops restart loops


class VmediadError(Exception):
    """Root of every error vmediad raises on purpose."""


class GuestFault(VmediadError):
    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(message or code.name)
        self.code = code


class BackendFailure(VmediadError):
    def __init__(self, code: ErrorCode = ErrorCode.BACKEND, message: str = "") -> None:
        super().__init__(message or code.name)
        self.code = code


class InternalError(VmediadError):
    """A broken invariant inside hostd."""


class ConfigError(VmediadError):
    exit_code = EXIT_CONFIG

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key {key!r}: {message}")
        self.key = key


class StartupError(VmediadError):
    """hostd cannot start as configured (socket taken, port in use, missing directory).

    Not a bug and not fixed by a restart: hostd logs the message as one line and exits 78."""

    exit_code = EXIT_CONFIG


class ProtocolError(VmediadError):
    """A control-plane request hostd refuses; the text goes back to the peer."""

    def __init__(self, message: str, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.kind = kind


class ClientError(VmediadError):
    """Base of the errors guestlib raises to guest programs."""
