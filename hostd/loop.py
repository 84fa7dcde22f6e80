"""The device thread's task path: doorbells, the SQ, dispatch, register files, completions.

One thread (the device thread) owns every piece of device state.  Other threads
(control connections, worker reapers, signal handlers) only ``post()`` closures to
it; posting bumps BANK_HOST_EVENT so a sleeping device thread wakes.  The decisions
are the core's (hostd/core/); this module does the memory work they call for.

Per task, in order:
  1. guest: descriptor into a free slot, status=SUBMITTED, slot index into the
     SQ, SQ_TAIL release-stored, DOORBELL=KICK; futex-wake DOORBELL only if
     NEED_WAKEUP is set.
  2. hostd: swaps DOORBELL back to 0 and acts only if it held KICK; reads
     SQ_TAIL (acquire) and moves the new slot indices into the scheduler.
  3. hostd: when the scheduler picks the task, copies the descriptor once,
     validates the copy, programs a channel's register file, kicks the worker.
  4. worker: runs from the registers, writes result registers, CTRL=DONE, IRQ.
  5. hostd: writes the result fields, flips status (seq-cst exchange), bumps
     IRQ_COUNT, and futex-wakes that slot's status word only, and only if the
     slot's WAITERS word says a thread sleeps there.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from hostd.config import Config
from hostd.core import validate
from hostd.core.dispatch import ACTIVE_WINDOW_NS, Dispatcher, RegFile, Running, Staged
from hostd.core.lifecycle import Life, LifeEvent
from hostd.core.scheduler import Pending, Scheduler
from hostd.core.sessions import SessionIds
from hostd.core.watchdog import DEFAULT_DECODE_MPX, NEVER, session_mpx, task_budget_s
from hostd.display import layout as display_layout
from hostd.display.port import DisplayPort
from hostd.events import EventBus
from hostd.guest import AttachRequest, Guest, RunState, log
from hostd.regions import create_bank
from hostd.workers import kick_channel, kick_worker
from vmediad import abi
from vmediad.abi import Ctrl, Doorbell, ErrorCode, Op, Status
from vmediad.shm import fence, futex_waitv, monotonic_ns

__all__ = ["AttachRequest", "Guest", "Loop", "RunState", "log"]

U32 = 0xFFFFFFFF
_DYING = Life.DYING
_SERVING = Life.SERVING
# An idle worker spins this many pause iterations for its next kick (~0.1 ms here) while its
# guest is the only active one: it saves the ~40 us futex wake-up of back-to-back short
# tasks.  With several guests active it sleeps at once: measured on 2 cores with a flooder
# and two probes, spinning workers doubled the probes' p99.
WORKER_SPINS = 4000
# Failures that are not the guest's doing: logged at warning level with their reason.
_BACKEND_ERRORS = frozenset({ErrorCode.BACKEND, ErrorCode.TIMEOUT, ErrorCode.WORKER_CRASHED})


class Loop:
    """The device state and one pass of the device thread over it (``_poll_once``, ``_sleep``)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.channels_n = cfg.channel_count()
        self.state = RunState.STARTING
        self.bank_fd, self.bank = create_bank(self.channels_n)
        self.scheduler = Scheduler(cfg.policy, cfg.max_inflight_per_guest)
        self.core = Dispatcher(self.channels_n, self.scheduler)
        self.channels = self.core.channels
        self.files = self.core.files
        self.limits = abi.GeometryLimits(cfg.max_width, cfg.max_height, cfg.max_pixels)
        # The shared screen's device-thread half: display tasks run here, never on a worker.
        self.display = DisplayPort.create(cfg.display_width, cfg.display_height,
                                          display_layout.parse(cfg.display_layout.split()), self.limits,
                                          self._display_complete)
        self.guests: dict[int, Guest] = {}
        self.events = EventBus()
        # Session ids start at a random point per hostd run: a guest that re-adopts its
        # region after a restart still holds ids of the old run, and none of them may name
        # a session of this run (hostd/core/sessions.py).
        self.session_ids = SessionIds(secrets.randbits(32) or 1)
        self._events: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._post_lock = threading.Lock()
        self._closed = False
        self._task_seq = 0  # CH_SEQ of programmed files and the completion sequence, one count
        self._ev_seen = 0
        self._last_heartbeat = 0
        self._loop_iterations = 0
        self._sleeps = 0
        self._wakes_sent = 0
        self._kicks_saved = 0  # shadow loads the worker picked up without a kick
        self._last_short = True  # the last task retired was a NOP/COPY/CRC32 (hostd may spin)
        self._collects = 0  # passes that found finished files
        self._files_retired = 0  # ... and how many (a worker may hold back IRQs: BANK_IRQ_HOLDOFF)
        self._spin_checked_ns = 0
        self._worker_spins = WORKER_SPINS
        self.bank.store32(abi.BANK_WORKER_SPIN, WORKER_SPINS)
        self.bank.store32(abi.BANK_IRQ_HOLDOFF, cfg.worker_irq_holdoff)
        self.on_loop: Callable[[], None] | None = None  # e.g. the systemd watchdog ping

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the device thread (thread-safe).

        Worker reapers and control connections post until the very end; close()
        unmaps the bank, and a store to it after that would be a SIGSEGV, not an
        exception.  The lock orders every bank access here before the unmap."""
        with self._post_lock:
            if self._closed:
                return  # the device is gone: nobody would run fn
            self._events.put(fn)
            self.bank.kick(abi.BANK_HOST_EVENT, abi.BANK_HOST_NEED_WAKEUP)

    def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn`` on the device thread and return its result (None if it did not run within
        ``timeout``: the device is stopping or gone).  An exception in ``fn`` is a bug of ours
        and ends the device thread (hostd exits non-zero)."""
        box: list[Any] = []
        done = threading.Event()

        def run() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self.post(run)
        return box[0] if done.wait(timeout) and box else None

    def wake(self) -> None:
        """Wake a sleeping device thread (thread-safe): an ivshmem Doorbell fired.  The
        doorbell word itself (REG_DOORBELL) is read by the next pass, as for any guest."""
        with self._post_lock:
            if self._closed:
                return
            self.bank.kick(abi.BANK_HOST_EVENT, abi.BANK_HOST_NEED_WAKEUP)

    # -- one pass -----------------------------------------------------------------------------
    def _poll_once(self) -> bool:
        self._ev_seen = self.bank.load32(abi.BANK_HOST_EVENT)
        busy = False
        while True:
            try:
                fn = self._events.get_nowait()
            except queue.Empty:
                break
            fn()
            busy = True
        for g in list(self.guests.values()):
            if g.life.state is not _DYING and self._doorbell(g):
                busy = True
        if self._collect_irqs():
            busy = True
        now = monotonic_ns()
        if now >= self.core.watchdog.next_ns:
            self._check_deadlines(now)
        if self.state == RunState.RUNNING and self._dispatch():
            busy = True
        now = monotonic_ns()
        if now - self._spin_checked_ns >= 1_000_000:
            self._spin_checked_ns = now
            active = sum(1 for g in self.guests.values() if now - g.last_submit_ns < ACTIVE_WINDOW_NS)
            self.core.active_guests = active
            spins = WORKER_SPINS if active <= 1 else 0
            if spins != self._worker_spins:
                self._worker_spins = spins
                self.bank.store32(abi.BANK_WORKER_SPIN, spins)
        if now - self._last_heartbeat >= abi.HEARTBEAT_PERIOD_S * 1e9 / 2:
            self._last_heartbeat = now
            for g in self.guests.values():
                g.region.mapped.store64(abi.REG_HEARTBEAT, now)
        return busy

    def _ready(self, guests: Iterable[Guest] | None = None) -> bool:
        """Work arrived since the last pass: an IRQ or post, or a rung doorbell."""
        if self.bank.load32(abi.BANK_HOST_EVENT) != self._ev_seen or not self._events.empty():
            return True
        gs = self.guests.values() if guests is None else guests
        return any(g.life.state is not _DYING and g.region.mapped.load32(abi.REG_DOORBELL) for g in gs)

    def _sleep(self) -> None:
        """NEED_WAKEUP handshake: publish the flag, fence, re-check, then futex_waitv."""
        guests = [g for g in self.guests.values() if g.life.state is not _DYING]
        self.bank.store32(abi.BANK_HOST_NEED_WAKEUP, 1)
        for g in guests:
            g.region.mapped.store32(abi.REG_NEED_WAKEUP, 1)
        fence()
        if not self._ready(guests):
            words = [(self.bank.address(abi.BANK_HOST_EVENT), self._ev_seen)]
            words += [(g.region.mapped.address(abi.REG_DOORBELL), 0) for g in guests]
            self._sleeps += 1
            # A hung task raises no IRQ: wake up for the watchdog's next deadline.
            timeout = abi.HEARTBEAT_PERIOD_S / 2
            next_ns = self.core.watchdog.next_ns
            if next_ns != NEVER:
                timeout = min(timeout, max(0, next_ns - monotonic_ns()) / 1e9)
            futex_waitv(words, timeout)
        self.bank.store32(abi.BANK_HOST_NEED_WAKEUP, 0)
        for g in guests:
            g.region.mapped.store32(abi.REG_NEED_WAKEUP, 0)

    # -- doorbell and SQ ----------------------------------------------------------------------
    def _doorbell(self, g: Guest) -> bool:
        reg = g.region.mapped
        bell = reg.xchg32(abi.REG_DOORBELL, 0)
        if bell == 0:
            return False
        if bell == Doorbell.RESET:
            tail = reg.load32(abi.REG_SQ_TAIL)
            g.ring.reset(tail)
            reg.store32(abi.REG_SQ_HEAD, tail)
            reg.store32(abi.REG_RING_ERROR, 0)
            g.log.info("ring reset", tail=tail)
            return True
        if bell != Doorbell.KICK:
            g.stats.bad_doorbells += 1  # only the flag value starts work; any other is ignored
            return True
        g.stats.doorbells += 1
        if not g.ring.broken:
            self._drain_sq(g)
        return True

    def _drain_sq(self, g: Guest) -> None:
        reg = g.region.mapped
        ring = g.ring
        tail = reg.load32(abi.REG_SQ_TAIL)  # acquire: the SQ entries before it are visible
        n = ring.arrived(tail)
        if n < 0:
            self._ring_error(g, ErrorCode.RING_OVERRUN, tail=tail, head=ring.head)
            return
        now = monotonic_ns()
        g.last_submit_ns = now
        if n:
            sq_entry, head = g.region.layout.sq_entry, ring.head
            arrivals, errors = ring.take([reg.load32(sq_entry(head + i)) for i in range(n)], g.held_slots)
            for code, slot in errors:
                self._ring_error(g, code, slot=slot)
            if arrivals:
                g.arrival_ns.update(dict.fromkeys(arrivals, now))
                self.scheduler.arrive_many(g.vm_id, arrivals)
        reg.store32(abi.REG_SQ_HEAD, ring.head)

    def _ring_error(self, g: Guest, code: ErrorCode, **kw: int) -> None:
        reg = g.region.mapped
        reg.store32(abi.REG_RING_ERROR, code)
        reg.fadd32(abi.REG_RING_ERROR_COUNT, 1)
        g.stats.ring_errors[code.name] += 1
        g.log.warning("ring error", error=code.name, **kw)

    # -- dispatch -----------------------------------------------------------------------------
    def _dispatch(self) -> bool:
        core = self.core
        progressed = False
        if core.staged:
            for held in core.staged_in_order():
                vm = held.pending.vm
                g = self.guests[vm]
                if g.life.state is _SERVING and core.staged.get(vm) is held \
                        and (ch := core.place(held, held.order)) is not None:
                    core.unstage(vm)
                    self.scheduler.block(vm, False)
                    self._start(g, held, ch)
                    progressed = True
        # Picks go on while all files are loaded: a picked task that finds no file is
        # staged (its guest blocked, so this ends), and staging takes back the shadow
        # loads of other guests it would otherwise wait behind.
        while True:
            p = self.scheduler.next()
            if p is None:
                break
            progressed = True
            g = self.guests[p.vm]
            st = self._prepare(g, p)
            if st is None:
                continue
            ch = core.place(st)
            if ch is None:
                core.stage(st)
                if core.policy.revokes_shadows:
                    # Under FIFO the shadow task arrived first and goes first; the
                    # fair-share policies give the waiting guest its turn instead.
                    self._revoke_shadows(g, st.channel)
                continue
            self._start(g, st, ch)
        return progressed

    def _revoke_shadows(self, g: Guest, channel: int | None) -> None:
        """Take back the shadow loads the core names, each with one CAS START -> IDLE that
        races the worker's claim CAS (START|owner -> RUNNING): exactly one wins."""
        core = self.core
        for owner, files in core.shadows_to_revoke(g.vm_id, channel):
            h = self.guests[owner]
            start = abi.ctrl_start(h.slot + 1)
            back: list[Running] = []
            for rf in files:  # newest first
                if self.bank.cas32(rf.offset + abi.CH_CTRL, start, Ctrl.IDLE) != start:
                    break  # the worker claimed it first: it runs, and so do the older ones
                back.append(core.revoked(rf))
            if back:
                core.give_back(owner, back, h.sessions)

    def _prepare(self, g: Guest, p: Pending) -> Staged | None:
        """Copy the descriptor once (D1: just before it runs) and validate the copy."""
        layout = g.region.layout
        mem = g.region.mapped.mem
        at = layout.desc(p.slot) + abi.D_INPUT
        desc = abi.Descriptor.unpack(bytes(mem[at : at + abi.DESC_INPUT.size]))
        prog = validate.check(desc, layout)
        if isinstance(prog, ErrorCode):
            self._fail(g, p.slot, desc.tag, prog, op=desc.opcode)
            return None
        op = prog.opcode
        if op in abi.DISPLAY_OPS:
            # Run here, now: the task holds its slot (a commit until its flip) but no longer
            # counts against the guest's in-flight cap.
            self.scheduler.finished(g.vm_id)
            self.display.run(g.vm_id, p.slot, prog, monotonic_ns())
            return None
        config = b""
        channel: int | None = None
        if op == Op.SESSION_OPEN:
            if g.sessions.full:
                self._fail(g, p.slot, desc.tag, ErrorCode.BUSY, op=op)
                return None
            config = bytes(mem[prog.src_off : prog.src_off + prog.src_len])
            cfg = validate.check_session_config(config, self.limits)
            if isinstance(cfg, ErrorCode):
                self._fail(g, p.slot, desc.tag, cfg, op=op)
                return None
            chan = self.core.session_channel()
            sid = g.sessions.bind(chan, abi.CODEC_NAMES[abi.Codec(cfg.codec)], session_mpx(cfg))
            channel = chan.index
            prog = replace(prog, session=sid)
        elif op in abi.SESSION_OPS:
            if prog.flags & abi.F_MULTI:
                # Copied once, like the descriptor; the worker reads only this copy.
                multi = validate.check_multi(bytes(mem[prog.src_off : prog.src_off + prog.src_len]), op, layout)
                if isinstance(multi, ErrorCode):
                    self._fail(g, p.slot, desc.tag, multi, op=op)
                    return None
                config = multi
            routed = g.sessions.route(prog.session, op)
            if isinstance(routed, ErrorCode):
                self._fail(g, p.slot, desc.tag, routed, op=op)
                return None
            channel = routed
        return Staged(p, prog, config, channel, g.arrival_ns.get(p.slot, monotonic_ns()))

    def _start(self, g: Guest, st: Staged, k: int) -> None:
        """Program a register file of channel ``k`` and start the codec unit (or queue the
        program behind the one running, in the shadow file)."""
        prog = st.prog
        bank = self.bank
        self._task_seq += 1
        inputs = len(st.config) // abi.MultiEntry.SIZE if prog.flags & abi.F_MULTI else 1
        s = g.sessions.open.get(prog.session)
        budget = task_budget_s(self.cfg, prog.opcode, DEFAULT_DECODE_MPX if s is None else s.mpx, inputs)
        run = Running(g.vm_id, st.pending.slot, 0, prog.opcode, prog.session, self._task_seq, monotonic_ns(),
                      st.arrival_ns, st.pending.seq, inputs, prog.dst_off, prog.dst_len, int(budget * 1e9))
        rf = self.core.load(k, run)
        ch = rf.offset
        if st.config:
            off = abi.channel_config_offset(self.channels_n, k, rf.file)
            bank.mem[off : off + len(st.config)] = st.config
        abi.ChannelProgram.write(
            bank.mem, ch + abi.CH_PROGRAM, opcode=prog.opcode, flags=prog.flags, session=prog.session,
            config_len=len(st.config), src_off=prog.src_off, src_len=prog.src_len, dst_off=prog.dst_off,
            dst_len=prog.dst_len, arg0=prog.arg0, arg1=prog.arg1, arg2=prog.arg2, arg3=prog.arg3,
        )
        bank.store32(ch + abi.CH_OWNER, g.slot + 1)
        bank.store64(ch + abi.CH_SEQ, run.seq)
        # Release: the registers above are visible first.  Only worker g.slot+1 can claim it.
        bank.store32(ch + abi.CH_CTRL, abi.ctrl_start(g.slot + 1))
        others = [o.offset for o in self.channels[k].files if o is not rf and o.running is not None]
        if others:
            # Dekker with the worker's "store DONE; fence; look at the channel's files":
            # if another file is still RUNNING, the worker claims this one when that one
            # ends, so the kick (and the worker's wake-up) is saved.  Otherwise kick.
            fence()
            if any(bank.load32(off + abi.CH_CTRL) == Ctrl.RUNNING for off in others):
                self._kicks_saved += 1
                return
        if prog.opcode in abi.SHORT_OPS:
            kick_worker(bank, g.slot)  # the worker's main loop runs these inline
        else:
            kick_channel(bank, self.channels_n, k, g.slot)  # straight to the channel's thread

    # -- completion ---------------------------------------------------------------------------
    def _collect_irqs(self) -> bool:
        done = 0
        bank = self.bank
        for rf in self.files:
            if rf.running is None:
                continue
            ch = rf.offset
            if bank.load32(ch + abi.CH_CTRL) != Ctrl.DONE:
                continue
            res = abi.ChannelResult.unpack_from(bank.mem, ch + abi.CH_RESULT)
            result, result_len, error, text_len, copied = (res.result, res.result_len, res.error, res.text_len,
                                                           res.copied)
            reason = ""
            if error and text_len:
                # The worker's reason, on its file's config page (abi.CH_RESULT).  The worker
                # runs hostile input: the text is bounded and decoded leniently.
                off = abi.channel_config_offset(self.channels_n, rf.channel, rf.file)
                raw = bytes(bank.mem[off : off + min(text_len, abi.ERROR_TEXT_MAX)])
                reason = " ".join(raw.decode("utf-8", "replace").split())  # one line
            self._retire(rf, ErrorCode(error) if error in ErrorCode._value2member_map_ else ErrorCode.BACKEND,
                         result, result_len, copied, reason)
            done += 1
        if done:
            self._collects += 1  # with IRQ moderation one pass retires several files
            self._files_retired += done
        return done > 0

    def _retire(self, rf: RegFile, error: ErrorCode, result: int = 0, result_len: int = 0,
                copied: int = 0, reason: str = "") -> None:
        self.bank.store32(rf.offset + abi.CH_CTRL, Ctrl.IDLE)
        now = monotonic_ns()
        run = self.core.retire(rf, now)
        self._last_short = run.op in abi.SHORT_OPS
        g = self.guests.get(run.vm_id)
        if g is None:
            return
        g.worker_tasks += 1
        s = g.sessions.open.get(run.session)
        codec = "" if s is None else s.codec
        if run.op == Op.SESSION_OPEN and error != ErrorCode.OK:
            g.sessions.unbind(run.session)
        elif run.op == Op.SESSION_CLOSE and error == ErrorCode.OK:
            g.sessions.unbind(run.session)
        if run.op in (Op.ENCODE_FRAME, Op.DECODE) and error == ErrorCode.OK:
            g.stats.frames += run.inputs
        g.stats.bytes_copied += copied
        if error == ErrorCode.OK and run.op in (Op.COPY, Op.CRC32, Op.ENCODE_FRAME, Op.DECODE):
            g.stats.bytes_moved += result_len
        self._complete(g, run.slot, error, result, result_len, rf.channel, now - run.dispatch_ns,
                       op=run.op, codec=codec, submit_ns=run.submit_ns, reason=reason,
                       dst=(run.dst_off, run.dst_len))
        self._maybe_recycle(g)

    def _display_complete(self, vm: int, slot: int, op: Op, error: ErrorCode, result: int, result_len: int) -> None:
        g = self.guests.get(vm)
        if g is None or slot not in g.held_slots:
            return
        self._complete(g, slot, error, result, result_len, U32, 0, op=op, submit_ns=g.arrival_ns.get(slot, 0),
                       counted=True)

    def _fail(self, g: Guest, slot: int, tag: int, code: ErrorCode, op: int = 0) -> None:
        """A task that never reached a channel ends with ``code``."""
        self.scheduler.finished(g.vm_id)
        self._complete(g, slot, code, 0, 0, U32, 0, op=op, submit_ns=g.arrival_ns.get(slot, 0), counted=True)
        g.log.debug("task rejected", task=slot, tag=tag, error=code.name)

    def _complete(self, g: Guest, slot: int, error: ErrorCode, result: int, result_len: int, channel: int,
                  device_ns: int, *, op: int, submit_ns: int, codec: str = "", counted: bool = False,
                  reason: str = "", dst: tuple[int, int] = (0, 0)) -> None:
        reg = g.region.mapped
        desc = g.region.layout.desc(slot)
        # Bookkeeping first: whoever sees the status flip also sees the counters.
        g.held_slots.discard(slot)
        g.arrival_ns.pop(slot, None)
        if not counted:
            self.scheduler.finished(g.vm_id)
        now = monotonic_ns()
        if submit_ns:
            g.stats.latency.observe((now - submit_ns) / 1e9)
        try:
            op_name = Op(op).name
        except ValueError:
            op_name = "INVALID"
        g.stats.tasks[(op_name, codec, error.name)] += 1
        if error == ErrorCode.OK:
            g.stats.tasks_done += 1
            reg.fadd64(abi.REG_TASKS_DONE, 1)
        else:
            g.stats.tasks_failed += 1
            g.stats.errors[error.name] += 1
            reg.fadd64(abi.REG_TASKS_FAILED, 1)
            if error != ErrorCode.NO_SPACE:
                if reason and dst[1] and op in abi.ERROR_RECORD_OPS:
                    # dst was range-checked against the heap when the task started, and the
                    # worker that could write there is done with this task (DONE, or dead).
                    record = abi.pack_error_record(error, reason, dst[1])
                    reg.mem[dst[0] : dst[0] + len(record)] = record
                    result_len = len(record)
                if error in _BACKEND_ERRORS:
                    g.log.warning("task failed", task=slot, op=op_name, codec=codec, error=error.name,
                                  reason=reason)
                else:
                    g.log.info("task failed", task=slot, op=op_name, error=error.name, reason=reason)
        self._task_seq += 1
        abi.DescResult.write(reg.mem, desc + abi.D_RESULT, result=result & (2**64 - 1), result_len=result_len,
                             error=error, channel=channel, device_ns=device_ns, seq=self._task_seq)
        # Exchange (seq-cst) orders the result fields before the flip and the
        # WAITERS load after it; the guest increments WAITERS before it re-reads
        # the status and sleeps, so one side always sees the other.
        reg.xchg32(desc + abi.D_STATUS, Status.DONE if error == ErrorCode.OK else Status.ERROR)
        reg.fadd64(abi.REG_IRQ_COUNT, 1)
        if reg.load32(desc + abi.D_WAITERS):
            self._wakes_sent += 1
            if g.irq_fd < 0:
                reg.futex_wake(desc + abi.D_STATUS)
            else:
                # A VM: no futex reaches it.  Its completion vector's eventfd, which QEMU turns
                # into MSI-X vector GUEST_VECTOR_COMPLETION (only interrupt-mode waiters, which
                # bound a driver and enabled MSI-X first, ever raise D_WAITERS).
                os.eventfd_write(g.irq_fd, 1)

    # -- the watchdog and recycling -----------------------------------------------------------
    def _check_deadlines(self, now: int) -> None:
        """End the tasks past their deadline: the worker is killed, and its reaper's
        _worker_exited retires them with TIMEOUT (only then: a worker still running could
        write into their buffers after the guest saw them end)."""
        watchdog = self.core.watchdog
        for rf in watchdog.overdue(self.files, now):
            run = rf.running
            assert run is not None
            if self.bank.load32(rf.offset + abi.CH_CTRL) == Ctrl.DONE:
                watchdog.recheck(now)  # finished after all (its IRQ is on the way or held back)
            else:
                self._time_out(rf, run, now)

    def _time_out(self, rf: RegFile, run: Running, now: int) -> None:
        g = self.guests.get(run.vm_id)
        if g is None or g.life.state is not _SERVING:
            return  # its reclaim, or the death of the worker being killed, retires it
        run.timed_out = True
        seconds = round((now - run.started_ns) / 1e9, 3)
        g.stats.timeouts += 1
        g.log.warning("task timed out; killing its worker", task=run.slot, op=run.op.name, seconds=seconds,
                      deadline_s=round(run.budget_ns / 1e9, 3), channel=rf.channel)
        self.events.emit("timeout", vm=g.vm_id, name=g.name, task=run.slot, op=run.op.name, seconds=seconds)
        # Nothing more of this guest's starts until the respawn (_spawn lifts the block); a
        # file loaded meanwhile is still at START when the worker is reaped, and is requeued.
        g.life.fire(LifeEvent.TIME_OUT)
        self.scheduler.block(g.vm_id, True)
        if g.worker is not None:
            g.worker.kill()

    def _maybe_recycle(self, g: Guest) -> None:
        """Recycle a worker by task count or RSS, only between tasks and with no sessions.

        The guest's queue is held (scheduler.block) until the new worker is spawned: a
        task started now would be claimed by a worker that is being killed."""
        w = g.worker
        if w is None or w.exited.is_set() or g.life.state is not _SERVING or len(g.sessions) \
                or g.vm_id in self.core.staged or self.core.holds(g.vm_id):
            return
        by_count = self.cfg.worker_recycle_tasks and g.worker_tasks >= self.cfg.worker_recycle_tasks
        by_rss = self.cfg.worker_recycle_rss_mb and w.rss_bytes() > self.cfg.worker_recycle_rss_mb << 20
        if by_count or by_rss:
            g.life.fire(LifeEvent.RECYCLE)
            self.scheduler.block(g.vm_id, True)
            g.log.info("recycling worker", tasks=g.worker_tasks, rss=w.rss_bytes())
            w.kill()
