"""The one error tree of vmediad.

* ``GuestFault``: the guest's fault; reported in the task status, never raised past the device loop.
* ``BackendFailure``: the codec backend failed; the task fails and the daemon lives.
* ``InternalError``: a bug in hostd; hostd exits non-zero so systemd restarts it.
* ``ConfigError``: a bad configuration, reported at start-up naming the key.
* ``ProtocolError``: a malformed control-plane request.
"""

from __future__ import annotations

from vmediad.abi import ErrorCode


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
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key {key!r}: {message}")
        self.key = key


class ProtocolError(VmediadError):
    """A control-plane request hostd refuses; the text goes back to the peer."""

    def __init__(self, message: str, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.kind = kind
