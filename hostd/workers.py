"""Spawning and reaping per-guest codec worker processes (an edge module)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from vmediad import abi
from vmediad.shm import MappedRegion


@dataclass
class WorkerHandle:
    slot: int
    vm_id: int
    proc: subprocess.Popen[bytes]
    generation: int
    started_ns: int
    tasks: int = 0
    exited: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def rss_bytes(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0


# glibc's malloc gives the worker's codec threads (not the main thread) arenas that it
# trims back to the kernel, and it serves big blocks with mmap: a codec context allocates
# and zeroes megabytes when it opens (720p H.264: ~11 MB with frame threads), so every new
# session re-faulted them page by page.  Measured in 120-frame sessions: 24 minor faults
# per decoded frame and 23 per x264-encoded frame in the worker, against 0.6 and 0.3 for
# the same work on a main thread.  A fixed mmap threshold (32 MiB) and trim threshold
# (128 MiB) take the worker to 0.3 and 0.1, with the same RSS after a dozen sessions.
# Read by glibc at exec; other libcs ignore it.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728"


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    own = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{MALLOC_TUNABLES}:{own}" if own else MALLOC_TUNABLES  # the operator's win
    return env


def spawn_worker(*, slot: int, vm_id: int, generation: int, region_fd: int, region_size: int,
                 bank_fd: int, channels: int, limits: abi.WorkerLimits, fault_injection: bool,
                 started_ns: int, on_exit: Callable[[WorkerHandle, int], None]) -> WorkerHandle:
    """Start a worker; ``on_exit(handle, returncode)`` runs on a reaper thread when it dies.

    Call this from a long-lived thread: the worker's PDEATHSIG fires when the
    *thread* that forked it exits.
    """
    # In a hostd started with stdin, stdout or stderr closed, the region or the bank can be fd 0,
    # 1 or 2, which the child's own stdio replaces before exec (the worker then maps /dev/null:
    # ENODEV, and dies before every task).  Such an fd is passed as a copy above 2.
    low = {fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in (region_fd, bank_fd) if fd <= 2}
    region_fd, bank_fd = low.get(region_fd, region_fd), low.get(bank_fd, bank_fd)
    cmd = [
        sys.executable, "-m", "codec_backend.worker",
        "--slot", str(slot), "--vm", str(vm_id),
        "--region-fd", str(region_fd), "--region-size", str(region_size),
        "--bank-fd", str(bank_fd), "--channels", str(channels),
        "--parent", str(os.getpid()), "--limits", limits.to_json(),
    ]
    if fault_injection:
        cmd.append("--fault-injection")
    try:
        proc = subprocess.Popen(cmd, pass_fds=(region_fd, bank_fd), stdin=subprocess.DEVNULL, close_fds=True,
                                env=_worker_env())
    finally:
        for fd in low.values():
            os.close(fd)
    handle = WorkerHandle(slot, vm_id, proc, generation, started_ns)

    def reap() -> None:
        rc = proc.wait()
        handle.exited.set()
        on_exit(handle, rc)

    threading.Thread(target=reap, daemon=True, name=f"reaper-vm{vm_id}").start()
    return handle


def kick_worker(bank: MappedRegion, slot: int) -> None:
    """Tell worker ``slot`` a channel is programmed; a syscall only if it sleeps."""
    bank.kick(abi.worker_kick_offset(slot), abi.worker_need_wakeup_offset(slot))


def kick_channel(bank: MappedRegion, channels: int, index: int, slot: int) -> None:
    """Tell worker ``slot``'s thread for channel ``index`` that a codec task is programmed there."""
    bank.kick(abi.channel_kick_offset(channels, index, slot), abi.channel_need_wakeup_offset(channels, index, slot))
