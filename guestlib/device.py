"""guestlib: the guest side of the vmediad device.

Submitting (any thread; ``_lock`` serialises the producer side of the ring):
  descriptor input block -> status=SUBMITTED -> SQ entry -> SQ_TAIL (release)
  -> DOORBELL=KICK (seq-cst exchange) -> futex-wake DOORBELL only if hostd
  published NEED_WAKEUP.  Under load hostd is awake and no syscall is made.
Waiting (the submitting thread, on its own slot's status word only):
  spin briefly; then WAITERS += 1 (seq-cst), re-check status, futex_wait on
  the status word; WAITERS -= 1.  hostd flips status with a seq-cst exchange
  and then reads WAITERS, so a sleeper is never missed and nobody else is woken.
Losing hostd (the monitor thread sees control-socket EOF):
  with ``auto_reattach`` the monitor re-attaches for ``reattach_window_s``; tasks
  wait meanwhile.  When the window ends (or re-attaching is refused for good, or
  ``give_up()`` is called) ``_gone`` is set, every sleeping waiter is woken, and
  every waiter and every later call raises DeviceGone.  A waiter that misses the
  wake still re-checks ``_gone`` after each SLEEP_SLICE_S futex slice.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from guestlib.heap import Heap, OutOfMemory
from guestlib.tasks import (
    SLEEP_SLICE_S,
    AttachError,
    Batch,
    Buffer,
    Completion,
    DeviceError,
    DeviceGone,
    SessionLost,
    Task,
    _fields,
    read_completion,
    sleep_slice,
)
from vmediad import abi, protocol
from vmediad.abi import Doorbell, Op, Status
from vmediad.shm import EAGAIN, MappedRegion, monotonic_ns

if TYPE_CHECKING:
    from guestlib.codec import Decoder, Encoder
    from guestlib.display import Display

SPINS = 200  # pause-spins before sleeping; longer spins lose on 2 cores (docs/benchmarks.md)
LIVENESS_S = 3.0  # a heartbeat older than this means hostd is gone
REATTACH_WINDOW_S = 30.0  # how long the monitor keeps trying to re-attach after hostd went away
REATTACH_RETRY_S = 0.05
ATTACH_TIMEOUT_S = 30.0  # a hostd that accepts the attach but never answers: TimeoutError, not a hang
CLOSE_WAIT_S = 2 * SLEEP_SLICE_S  # close() waits this long for waiting threads to leave the region
# Refusals of a re-adopt attach that no retry can change.
PERMANENT_REFUSALS = frozenset({"killed", "permission"})


def default_socket() -> str:
    env = os.environ.get("VMEDIAD_SOCKET")
    if env:
        return env
    return str(protocol.default_socket_path())


class Device:
    """An attached guest.  Thread-safe: many threads may submit and wait at once."""

    def __init__(self, socket_path: str | None = None, name: str | None = None, region_size: int | None = None,
                 ring_entries: int | None = None, *, named: bool = False, poll_only: bool = False,
                 auto_reattach: bool = True, spins: int = SPINS,
                 reattach_window_s: float = REATTACH_WINDOW_S, attach_timeout: float = ATTACH_TIMEOUT_S) -> None:
        self.socket_path = socket_path or default_socket()
        self.name = name or f"vm{os.getpid()}"
        self.poll_only = poll_only
        self.auto_reattach = auto_reattach
        # Read on every re-attach attempt: lowering it (to 0 when a guest is shutting
        # down) ends a re-attach in progress at once.
        self.reattach_window_s = reattach_window_s
        # None while usable; once set (by the monitor thread, or give_up() from any thread
        # or a signal handler) it never changes back.  A plain attribute store: waiters
        # read it after every futex slice.
        self._gone: str | None = None
        self.spins = spins
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)  # also: a waiter left _wait, for close()
        self._in_wait = 0  # threads inside _wait (under _lock)
        self._closed = False
        self.wakeups = 0
        self.spurious_wakeups = 0
        self.syscalls_doorbell = 0
        self.reattaches = 0
        self._sock, reply, fd = self._connect(
            {"cmd": "attach", "name": self.name, "region_size": region_size,
             "ring_entries": ring_entries, "named": named}, timeout=attach_timeout
        )
        self.fd = fd
        self.vm_id: int = reply["vm"]
        self.epoch: int = reply["epoch"]
        self.shm_name: str | None = reply.get("shm_name")
        self.channels: int = reply.get("channels", 0)
        lay = reply["layout"]
        self.region = MappedRegion(fd, lay["region_size"])
        self.layout = abi.layout_from_registers(bytes(self.region.mem[: abi.PAGE_SIZE]))
        if self.layout.as_dict() != lay:
            raise AttachError("region registers disagree with the attach reply")
        self.heap = Heap(self.layout.heap_offset, self.layout.heap_size)
        self._free_slots = list(range(self.layout.ring_entries))[::-1]
        self._tail = self.region.load32(abi.REG_SQ_TAIL)
        self._monitor = threading.Thread(target=self._watch_control, daemon=True, name="vmediad-monitor")
        self._monitor.start()

    # -- control plane -------------------------------------------------------------------
    def _connect(self, request: dict[str, Any], pass_fd: int | None = None,
                 timeout: float | None = None) -> tuple[socket.socket, dict[str, Any], int]:
        """Attach handshake; ``timeout`` bounds it (a hung hostd raises TimeoutError)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            raise DeviceGone(f"cannot reach hostd at {self.socket_path}: {e}") from None
        msg = protocol.encode(request)
        buf = b""
        fds: list[int] = []
        try:
            if pass_fd is None:
                sock.sendall(msg)
            else:
                socket.send_fds(sock, [msg], [pass_fd])
            while b"\n" not in buf:
                data, new_fds, _f, _a = socket.recv_fds(sock, 65536, 2)
                fds.extend(new_fds)
                if not data:
                    raise DeviceGone("hostd closed the connection during attach")
                buf += data
        except BaseException:
            sock.close()
            for fd in fds:
                os.close(fd)
            raise
        sock.settimeout(None)
        reply = json.loads(buf.partition(b"\n")[0])
        if not reply.get("ok"):
            sock.close()
            for fd in fds:
                os.close(fd)
            raise AttachError(reply.get("error", "refused"), reply.get("kind", ""))
        if not fds:
            sock.close()
            raise AttachError("hostd sent no region fd")
        for extra in fds[1:]:
            os.close(extra)
        return sock, reply, fds[0]

    def _watch_control(self) -> None:
        """Socket EOF means hostd died: re-attach by passing our region fd back.

        Without ``auto_reattach``, or when no hostd takes the region back within
        ``reattach_window_s``, the device is gone (see ``_set_gone``).
        """
        pause = threading.Event()
        while not self._closed and self._gone is None:
            try:
                data = self._sock.recv(4096)
            except OSError:
                data = b""
            if data:
                continue
            if self._closed or self._gone is not None:
                return
            if not self.auto_reattach:
                self._set_gone("hostd closed the control connection")
                return
            lost = monotonic_ns()
            while True:
                if self._closed or self._gone is not None:
                    return
                window = self.reattach_window_s
                if monotonic_ns() - lost >= window * 1e9:
                    self._set_gone(f"hostd did not come back within {window:g}s "
                                   f"(the re-attach window)")
                    return
                try:
                    # A hostd that accepts but never answers must not outlast the window.
                    self._reattach(max(REATTACH_RETRY_S, window - (monotonic_ns() - lost) / 1e9))
                    break
                except AttachError as e:
                    if e.kind in PERMANENT_REFUSALS:
                        self._set_gone(f"hostd refused the re-attach: {e}")
                        return
                except (DeviceGone, OSError):
                    pass
                pause.wait(REATTACH_RETRY_S)

    def _set_gone(self, reason: str) -> None:
        """Monitor thread: mark the device gone and wake every sleeping waiter."""
        # Under the producer lock: close() takes it before unmapping, so the wakes
        # below never touch an unmapped region.
        with self._lock:
            if self._closed:
                return
            self._gone = reason
            self._wake_waiters()
            self._slot_free.notify_all()

    def _wake_waiters(self) -> None:
        # Waiters sleep on their slot's status word with expected == SUBMITTED; a wake
        # without a status change makes them re-check _gone.  Only slots whose
        # WAITERS count is non-zero have a sleeper; the count is only ever changed by
        # this process, so a stale read merely costs a slice (they re-check anyway).
        for slot in range(self.layout.ring_entries):
            at = self._desc(slot)
            if self.region.load32(at + abi.D_WAITERS):
                self.region.futex_wake(at + abi.D_STATUS)

    def give_up(self, reason: str = "the guest gave up on the device") -> None:
        """Make the device unusable now: every waiter and every later call raises DeviceGone.

        Safe from any thread and from a signal handler (it takes no lock): a waiter in
        this thread is interrupted by the signal, others notice within SLEEP_SLICE_S.
        The device must still be closed.
        """
        if self._gone is None:
            self._gone = reason

    @property
    def gone(self) -> str | None:
        """Why the device is gone (DeviceGone is raised for every call), else None."""
        return self._gone

    def _raise_if_gone(self) -> None:
        if self._gone is not None:
            raise DeviceGone(self._gone)
        if self._closed:
            raise DeviceGone("device closed")

    def _reattach(self, timeout: float | None = None) -> None:
        # The producer lock is held while the new hostd takes over the region: it then
        # sees no slot half written, and no slot SUBMITTED whose SQ entry is not yet
        # published (it would run that slot as "in flight", and once more when the entry
        # is published).  Submitters wait here, as they would for a slot.
        # close() takes the lock too, so the region is still mapped while this runs.
        with self._lock:
            if self._closed:
                return
            sock, reply, fd = self._connect({"cmd": "attach", "name": self.name, "adopt": True},
                                            pass_fd=self.fd, timeout=timeout)
            os.close(fd)  # the same memfd we already map
            old = self._sock
            self._sock = sock
            old.close()
            self.vm_id = reply["vm"]
            self.epoch = reply["epoch"]
            self.reattaches += 1
            self._ring()  # tasks submitted while hostd was down

    def status(self) -> dict[str, Any]:
        return hostd_status(self.socket_path)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Detach.  Threads still waiting on tasks raise DeviceGone("device closed")."""
        # Under the producer lock: a re-attach in progress finishes (or sees _closed)
        # before the region is unmapped under it.  Waiters are woken and given up to
        # CLOSE_WAIT_S to leave _wait; one that does not keeps the mapping alive.
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._in_wait:
                self._wake_waiters()
                self._slot_free.wait_for(lambda: not self._in_wait, CLOSE_WAIT_S)
            unmap = not self._in_wait
            self._slot_free.notify_all()  # submitters waiting for a slot see _closed
        try:
            self._sock.sendall(protocol.encode({"cmd": "detach"}))
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if unmap:
            try:
                self.region.close()
            except BufferError:
                pass  # views handed to the caller keep the mapping alive until collected
        os.close(self.fd)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- heap ------------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> Buffer:
        self._raise_if_gone()
        with self._lock:
            off = self.heap.alloc(nbytes)
        return Buffer(self, off, nbytes)

    def free(self, buf: Buffer) -> None:
        buf.release()
        with self._lock:
            self.heap.free(buf.offset)

    def put(self, data: bytes | bytearray | memoryview | npt.NDArray[Any]) -> Buffer:
        """Copy private memory into the region once."""
        mv = memoryview(data).cast("B")  # type: ignore[arg-type]
        buf = self.alloc(max(1, mv.nbytes))
        buf.mem[: mv.nbytes] = mv
        if mv.nbytes == 0:
            buf.size = 0
        return buf

    # -- submission ------------------------------------------------------------------------------
    def _desc(self, slot: int) -> int:
        return self.layout.desc(slot)

    def _check_alive(self) -> None:
        self._raise_if_gone()
        st = self.region.load32(abi.REG_DEVICE_STATE)
        if st in (abi.DeviceState.STOPPING, abi.DeviceState.GONE) and not self.auto_reattach:
            raise DeviceGone("hostd is stopping")

    def _claim_slot(self, timeout: float | None) -> int:
        # Caller holds _lock.  Waits in slices so a give_up() (which takes no lock and so
        # cannot notify) is seen.
        deadline = None if timeout is None else monotonic_ns() + int(timeout * 1e9)
        while not self._free_slots:
            self._raise_if_gone()
            slice_s = SLEEP_SLICE_S
            if deadline is not None:
                left = (deadline - monotonic_ns()) / 1e9
                if left <= 0:
                    raise TimeoutError("no free ring slot")
                slice_s = min(slice_s, left)
            self._slot_free.wait(slice_s)
        self._raise_if_gone()
        return self._free_slots.pop()

    def _write(self, slot: int, d: abi.Descriptor) -> None:
        # Caller holds _lock.  Plain stores for the input block: the SQ_TAIL
        # release store below publishes them.
        at = self._desc(slot)
        abi.DESC_INPUT.pack_into(self.region.mem, at + abi.D_INPUT, *_fields(d))
        self.region.store32(at + abi.D_STATUS, Status.SUBMITTED)
        self.region.store32(self.layout.sq_entry(self._tail), slot)
        self._tail = (self._tail + 1) & 0xFFFFFFFF

    def _publish(self) -> None:
        self.region.store32(abi.REG_SQ_TAIL, self._tail)  # release: entries and descriptors first

    def _ring(self) -> None:
        # Exchange is seq-cst: the NEED_WAKEUP load cannot pass the doorbell store.
        self.region.xchg32(abi.REG_DOORBELL, Doorbell.KICK)
        if not self.poll_only and self.region.load32(abi.REG_NEED_WAKEUP):
            self.syscalls_doorbell += 1
            self.region.futex_wake(abi.REG_DOORBELL, 1)

    def submit(self, op: Op, *, flags: int = 0, session: int = 0, src: tuple[int, int] = (0, 0),
               dst: tuple[int, int] = (0, 0), args: tuple[int, int, int, int] = (0, 0, 0, 0),
               tag: int = 0, timeout: float | None = None) -> Task:
        """Submit one raw descriptor (for ops guestlib has no wrapper for)."""
        self._raise_if_gone()
        d = abi.Descriptor(tag, int(op), flags, session, src[0], src[1], dst[0], dst[1], *args)
        with self._lock:
            slot = self._claim_slot(timeout)
            self._write(slot, d)
            self._publish()
        self._ring()
        return Task(self, slot, Op(op) if op in Op._value2member_map_ else op)

    def submit_many(self, descs: list[abi.Descriptor]) -> list[Task]:
        """Submit descriptors in order, as many per SQ_TAIL store and doorbell as slots allow."""
        self._raise_if_gone()
        tasks: list[Task] = []
        todo = descs
        while todo:
            with self._lock:
                # Take as many slots as are free (at least one) and publish them together.
                n = max(1, min(len(todo), len(self._free_slots)))
                for d in todo[:n]:
                    slot = self._claim_slot(None)
                    self._write(slot, d)
                    tasks.append(Task(self, slot, Op(d.opcode) if d.opcode in Op._value2member_map_ else Op.NOP))
                self._publish()
            self._ring()
            todo = todo[n:]
        return tasks

    def submit_raw(self, d: abi.Descriptor) -> Task:
        """Submit a descriptor exactly as given (fuzzing, other-language guests)."""
        self._raise_if_gone()
        with self._lock:
            slot = self._claim_slot(None)
            self._write(slot, d)
            self._publish()
        self._ring()
        return Task(self, slot, Op(d.opcode) if d.opcode in Op._value2member_map_ else Op.NOP)

    def nop(self) -> Task:
        return self.submit(Op.NOP)

    def copy(self, src: Buffer, dst: Buffer, nbytes: int | None = None) -> Task:
        n = src.size if nbytes is None else nbytes
        return self.submit(Op.COPY, src=(src.offset, n), dst=(dst.offset, dst.size))

    def crc32(self, buf: Buffer, nbytes: int | None = None) -> Task:
        return self.submit(Op.CRC32, src=(buf.offset, buf.size if nbytes is None else nbytes))

    def encoder(self, codec: str = "h264", width: int = 0, height: int = 0, fps: float | Fraction = 30,
                bitrate: int | None = None, crf: float | None = None, gop: int | None = None,
                pix_fmt: str = "yuv420p", **options: Any) -> Encoder:
        """Open an encode session (a context manager); see guestlib.codec.Encoder."""
        from guestlib.codec import Encoder

        return Encoder(self, codec, width, height, fps, bitrate, crf, gop, pix_fmt, **options)

    def decoder(self, codec: str = "h264", **options: Any) -> Decoder:
        """Open a decode session (a context manager); see guestlib.codec.Decoder."""
        from guestlib.codec import Decoder

        return Decoder(self, codec, **options)

    def display(self, width: int, height: int, fmt: str = "bgra", buffers: int = 2) -> Display:
        """Open a display output on the shared screen; see guestlib.display.Display."""
        from guestlib.display import Display

        return Display(self, width, height, fmt, buffers)

    def caps(self) -> dict[str, Any]:
        from guestlib.codec import caps

        return caps(self)

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """Descriptors added inside go out with one SQ_TAIL store and one doorbell."""
        b = Batch(self)
        yield b
        b.submit()

    # -- completion ------------------------------------------------------------------------------
    def _wait(self, task: Task, timeout: float | None) -> Completion:
        # _in_wait counts the threads in here, all of which touch the region: close()
        # unmaps it only once they have left (it wakes them and they raise DeviceGone).
        with self._lock:
            if self._closed:
                raise DeviceGone("device closed")
            self._in_wait += 1
        freed = False
        try:
            c = self._wait_mapped(task, timeout)
            freed = True
        finally:
            with self._lock:
                self._in_wait -= 1
                if freed:
                    self._free_slots.append(task.slot)
                if self._closed:
                    self._slot_free.notify_all()  # close() waits for _in_wait to drop to 0
                elif freed:
                    self._slot_free.notify()
        return c

    def _wait_mapped(self, task: Task, timeout: float | None) -> Completion:
        reg = self.region
        at = self._desc(task.slot)
        st_off = at + abi.D_STATUS
        deadline = None if timeout is None else monotonic_ns() + int(timeout * 1e9)
        status = reg.spin32(st_off, Status.SUBMITTED, self.spins) if self.spins else reg.load32(st_off)
        if status == Status.SUBMITTED:
            reg.fadd32(at + abi.D_WAITERS, 1)
            try:
                while (status := reg.load32(st_off)) == Status.SUBMITTED:
                    self._raise_if_gone()
                    slice_s = sleep_slice(deadline, task.slot)
                    r = reg.futex_wait(st_off, Status.SUBMITTED, slice_s)
                    if r == 0:
                        task.wakeups += 1
                        self.wakeups += 1
                        if reg.load32(st_off) == Status.SUBMITTED:
                            self.spurious_wakeups += 1
                    elif r != EAGAIN:
                        self._liveness()
            finally:
                reg.fadd32(at + abi.D_WAITERS, -1)
        c = read_completion(reg.mem, at, status)
        reg.store32(st_off, Status.FREE)
        return c

    def _liveness(self) -> None:
        self._raise_if_gone()
        if self.auto_reattach:
            return  # the monitor re-attaches (the task completes then) or sets _gone
        hb = self.region.load64(abi.REG_HEARTBEAT)
        if self.region.load32(abi.REG_DEVICE_STATE) == abi.DeviceState.GONE:
            raise DeviceGone("hostd shut down")
        if monotonic_ns() - hb > LIVENESS_S * 1e9:
            raise DeviceGone("hostd heartbeat stopped")

    def statistics(self) -> dict[str, Any]:
        return {
            "vm": self.vm_id, "epoch": self.epoch, "wakeups": self.wakeups,
            "spurious_wakeups": self.spurious_wakeups, "doorbell_syscalls": self.syscalls_doorbell,
            "reattaches": self.reattaches, "heap_free": self.heap.available(),
            "free_slots": len(self._free_slots),
        }


def attach(socket: str | None = None, name: str | None = None, region_size: int | None = None,
           ring_entries: int | None = None, **kw: Any) -> Device:
    """Attach to hostd; the returned Device is also a context manager.

    The transport is picked here: inside a VM with the ivshmem device (1af4:1110) and no
    control socket at the default path, the region is the device's BAR2 (guestlib.ivshmem;
    hostd then sets name, size and ring); otherwise the process transport over the control
    socket.  ``VMEDIAD_TRANSPORT=ivshmem`` or ``=process`` forces one."""
    forced = os.environ.get("VMEDIAD_TRANSPORT", "")
    if forced == "ivshmem" or (not forced and socket is None and not os.path.exists(default_socket())):
        from guestlib import ivshmem

        pci = ivshmem.find_device()
        if pci is not None:
            return ivshmem.IvshmemDevice(pci, name, **kw)
        if forced:
            raise AttachError("VMEDIAD_TRANSPORT=ivshmem, but there is no ivshmem device (1af4:1110)", "no_device")
    return Device(socket, name, region_size, ring_entries, **kw)


def hostd_status(socket_path: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """hostd's statistics() snapshot over the control socket."""
    return _request(socket_path or default_socket(), {"cmd": "status"}, timeout)["status"]  # type: ignore[no-any-return]


def _request(path: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            raise DeviceGone(f"cannot reach hostd at {path}: {e}") from None
        s.sendall(protocol.encode(req))
        buf = b""
        while b"\n" not in buf:
            data = s.recv(1 << 20)
            if not data:
                raise DeviceGone("hostd closed the connection")
            buf += data
    reply: dict[str, Any] = json.loads(buf.partition(b"\n")[0])
    if not reply.get("ok"):
        raise AttachError(reply.get("error", "refused"), reply.get("kind", ""))
    return reply


__all__ = [
    "SLEEP_SLICE_S", "AttachError", "Batch", "Buffer", "Completion", "Device", "DeviceError", "DeviceGone",
    "OutOfMemory", "SessionLost", "Task", "attach", "hostd_status", "read_completion", "sleep_slice",
]
