"""The emulated device: doorbells, the scheduler loop, channel register files, completions.

One thread (the device thread) owns every piece of device state below.  Other
threads (control connections, worker reapers, signal handlers) only ``post()``
events to it; posting bumps BANK_HOST_EVENT so a sleeping device thread wakes.

Per task, in order (seed 000):
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
     slot's WAITERS word says a thread sleeps there (seed 002).
"""

from __future__ import annotations

import enum
import os
import queue
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from hostd import validate
from hostd.config import Config
from hostd.events import EventBus
from hostd.regions import Region, adopt_region, create_bank, create_region
from hostd.scheduler import Pending, Scheduler
from hostd.stats import GuestStats, Totals
from hostd.workers import WorkerHandle, kick_channel, kick_worker, spawn_worker
from vmediad import abi
from vmediad.abi import Ctrl, Doorbell, ErrorCode, Op, Status
from vmediad.errors import GuestFault, InternalError
from vmediad.shm import fence, futex_waitv, monotonic_ns

_SHORT_OPS = frozenset({Op.NOP, Op.COPY, Op.CRC32})
log = structlog.get_logger("hostd.device")

U32 = 0xFFFFFFFF
RESPAWN_BACKOFF_MAX_S = 5.0
# An idle worker spins this many pause iterations for its next kick (~0.1 ms here) while its
# guest is the only active one: it saves the ~40 us futex wake-up of back-to-back short
# tasks.  With several guests active it sleeps at once: measured on 2 cores with a flooder
# and two probes, spinning workers doubled the probes' p99 (docs/reliability.md).
WORKER_SPINS = 4000
ACTIVE_WINDOW_NS = 50_000_000  # a guest that submitted within this window is active
# The watchdog (Config.task_timeout_s, task_timeout_per_mpx_s): the pictures a task is sized by.
# A FLUSH drains what the codec holds (encoder look-ahead, decoder reorder): counted as this many
# frames.  A decode session opened without a size counts as 1080p.
FLUSH_FRAMES = abi.MULTI_MAX
DEFAULT_DECODE_MPX = 1920 * 1080 / 1e6
NEVER = 1 << 63
# Failures that are not the guest's doing: logged at warning level with their reason.
_BACKEND_ERRORS = frozenset({ErrorCode.BACKEND, ErrorCode.TIMEOUT, ErrorCode.WORKER_CRASHED})


def task_budget_s(cfg: Config, op: int, mpx: float, inputs: int) -> float:
    """How long a task may run before the watchdog ends it (0: no deadline).

    ``task_timeout_s + task_timeout_per_mpx_s * megapixels * frames``: frames are the task's
    inputs for ENCODE_FRAME/DECODE (a MULTI list: each), FLUSH_FRAMES for FLUSH, one for
    SESSION_OPEN and none for the other ops; megapixels are the session's picture size."""
    if cfg.task_timeout_s <= 0:
        return 0.0
    if op in (Op.ENCODE_FRAME, Op.DECODE):
        frames = inputs
    elif op == Op.FLUSH:
        frames = FLUSH_FRAMES
    elif op == Op.SESSION_OPEN:
        frames = 1
    else:
        frames = 0
    return cfg.task_timeout_s + cfg.task_timeout_per_mpx_s * mpx * frames


class RunState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Running:
    vm_id: int
    slot: int
    tag: int
    op: Op
    session: int
    seq: int
    dispatch_ns: int
    submit_ns: int
    arrival: int = 0  # the scheduler's seq, to put the task back if its shadow load is revoked
    inputs: int = 1  # frames or chunks the task feeds (a MULTI list has several)
    dst_off: int = 0  # where an error record goes if the task fails (abi.ERROR_RECORD)
    dst_len: int = 0
    budget_ns: int = 0  # the watchdog's allowance (0: none), counted from started_ns
    started_ns: int = 0  # when it became its channel's oldest loaded task (0: waiting behind one)
    timed_out: bool = False  # past its deadline: its worker is being killed


@dataclass
class RegFile:
    """One of a channel's register files, as hostd last programmed it."""

    channel: int
    file: int
    running: Running | None = None  # programmed and not yet retired (START, RUNNING or DONE)
    offset: int = field(init=False)  # of the file in the bank

    def __post_init__(self) -> None:
        self.offset = abi.channel_offset(self.channel, self.file)


@dataclass
class Channel:
    """A hardware channel: a codec unit with abi.CH_FILES register files, loaded in ring
    order (an idle channel starts again at file 0).

    Its loaded files only ever hold tasks of one guest at a time; its worker runs them
    in CH_SEQ order, each the moment the one before ends, while hostd refills the files
    that have ended.  Another guest gets the channel once it is idle."""

    index: int
    files: tuple[RegFile, ...]
    next_file: int = 0
    bound_sessions: int = 0
    busy_ns: int = 0
    busy_until: int = 0
    tasks: int = 0

    @classmethod
    def new(cls, index: int) -> Channel:
        return cls(index, tuple(RegFile(index, f) for f in range(abi.CH_FILES)))

    @property
    def idle(self) -> bool:
        return all(f.running is None for f in self.files)

    def loaded_files(self) -> list[RegFile]:
        """The files holding a programmed task, oldest task first."""
        return sorted((f for f in self.files if f.running is not None),
                      key=lambda f: f.running.seq if f.running is not None else 0)

    def loaded(self) -> list[Running]:
        """The tasks programmed into this channel, oldest first."""
        return [f.running for f in self.loaded_files() if f.running is not None]

    def free_file(self, vm_id: int) -> RegFile | None:
        """The file a task of guest ``vm_id`` may be loaded into now, if any."""
        f = self.files[self.next_file]
        if f.running is not None:
            return None
        return f if all(o.running is None or o.running.vm_id == vm_id for o in self.files) else None


@dataclass
class Staged:
    """A task whose descriptor was copied and validated but whose channel is busy."""

    pending: Pending
    prog: validate.Program
    config: bytes
    channel: int | None  # None: any free channel
    arrival_ns: int
    order: int = 0  # when it was staged: staged tasks start in this order (the policy's)


@dataclass
class Guest:
    vm_id: int
    name: str
    pid: int
    uid: int
    region: Region
    slot: int  # worker mailbox slot
    weight: int = 1
    worker: WorkerHandle | None = None
    generation: int = 0
    sq_head: int = 0  # hostd's private consumer count; REG_SQ_HEAD is only a copy for the guest
    held_slots: set[int] = field(default_factory=set)  # queued, staged or running
    arrival_ns: dict[int, int] = field(default_factory=dict)
    sessions: dict[int, int] = field(default_factory=dict)  # session id -> channel
    session_codec: dict[int, str] = field(default_factory=dict)
    session_mpx: dict[int, float] = field(default_factory=dict)  # picture size, for the watchdog
    lost_sessions: set[int] = field(default_factory=set)
    adopted: bool = False  # region served by an earlier hostd: its older session ids are lost
    staged: Staged | None = None
    ring_broken: bool = False
    dying: bool = False
    recycling: bool = False
    attached_ns: int = 0
    worker_tasks: int = 0
    early_deaths: int = 0  # consecutive workers that died before running any task
    last_submit_ns: int = 0
    respawn_pending: bool = False  # no worker until a backed-off respawn
    timing_out: bool = False  # the watchdog killed the worker; no task starts until the respawn
    recycles: int = 0
    stats: GuestStats = field(default_factory=GuestStats)

    @property
    def log(self) -> Any:
        return log.bind(vm=self.vm_id, name=self.name)


@dataclass
class AttachRequest:
    name: str
    pid: int
    uid: int
    region_size: int
    ring_entries: int
    named: bool
    adopt_fd: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    guest: Guest | None = None
    error: Exception | None = None


class Device:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.channels_n = cfg.channel_count()
        self.epoch = secrets.randbits(63) | 1
        self.state = RunState.STARTING
        self.started_ns = monotonic_ns()
        self.bank_fd, self.bank = create_bank(self.channels_n)
        self.channels = [Channel.new(i) for i in range(self.channels_n)]
        self.files = [f for c in self.channels for f in c.files]
        self.scheduler = Scheduler(cfg.policy, cfg.max_inflight_per_guest)
        self.limits = validate.Limits(cfg.max_width, cfg.max_height, cfg.max_pixels)
        self.caps = int(abi.Caps.FUTEX | abi.Caps.POLL | abi.Caps.CODEC | abi.Caps.MULTI | abi.Caps.FRAME_POOL
                        | abi.Caps.ERROR_TEXT
                        | (abi.Caps.NAMED_REGION if cfg.named_regions else 0))
        self.guests: dict[int, Guest] = {}
        self.events = EventBus()
        self._totals = Totals()  # counters of guests gone (live guests' are added per snapshot)
        self._departed: deque[tuple[int, dict[str, Any]]] = deque()  # (monotonic ns, snapshot)
        self._watch_next_ns = NEVER  # the nearest deadline of a running task
        self._events: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._next_vm = 1
        # Session ids start at a random point per hostd run: a guest that re-adopts its
        # region after a restart still holds ids of the old run, and none of them may name
        # a session of this run (see _session_of_this_run).
        self._session_base = secrets.randbits(32) or 1
        self._next_session = self._session_base
        self._sessions_issued = 0
        self._task_seq = 0
        self._free_slots = list(range(min(cfg.max_guests, abi.BANK_MAX_WORKERS)))[::-1]
        self._ev_seen = 0
        self._last_heartbeat = 0
        self._stop_requested = False
        self._stop_deadline = 0
        self._loop_iterations = 0
        self._sleeps = 0
        self._wakes_sent = 0
        self._kicks_saved = 0  # shadow loads the worker picked up without a kick
        self._last_short = True  # the last task retired was a NOP/COPY/CRC32 (hostd may spin)
        self._shadow_revokes = 0  # shadow loads taken back for a waiting guest
        self._collects = 0  # passes that found finished files
        self._files_retired = 0  # ... and how many (a worker may hold back IRQs: BANK_IRQ_HOLDOFF)
        self._stage_order = 0
        self._spin_checked_ns = 0
        self._active_guests = 0  # guests that submitted within ACTIVE_WINDOW_NS (refreshed every ms)
        self._worker_spins = WORKER_SPINS
        self.bank.store32(abi.BANK_WORKER_SPIN, WORKER_SPINS)
        self.bank.store32(abi.BANK_IRQ_HOLDOFF, cfg.worker_irq_holdoff)
        self.on_loop: Callable[[], None] | None = None  # e.g. the systemd watchdog ping
        self._thread: threading.Thread | None = None
        self._post_lock = threading.Lock()
        self._closed = False
        self.crashed: BaseException | None = None
        self.stopped = threading.Event()

    # -- threads --------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="device", daemon=True)
        self._thread.start()

    def _thread_main(self) -> None:
        try:
            self.run()
        except BaseException as e:  # an internal bug: the daemon must exit non-zero
            self.crashed = e
            log.exception("device loop crashed")
        finally:
            self.stopped.set()

    @property
    def thread_id(self) -> int | None:
        """The device thread's kernel thread id (for per-thread CPU accounting)."""
        return None if self._thread is None else self._thread.native_id

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

    def request_stop(self) -> None:
        self.post(self._begin_stop)

    def join(self, timeout: float | None = None) -> bool:
        return self.stopped.wait(timeout)

    # -- control-plane entry points (called from other threads) ----------------
    def attach(self, req: AttachRequest, timeout: float = 10.0) -> Guest:
        if self.state in (RunState.STOPPING, RunState.STOPPED):
            raise GuestFault(ErrorCode.DEVICE_GONE, "hostd is stopping")
        self.post(lambda: self._do_attach(req))
        if not req.done.wait(timeout):
            raise InternalError("attach not processed by the device thread")
        if req.error is not None:
            raise req.error
        assert req.guest is not None
        return req.guest

    def detach(self, vm_id: int, reason: str) -> None:
        self.post(lambda: self._do_detach(vm_id, reason))

    # -- the loop ---------------------------------------------------------------
    def run(self) -> None:
        self.state = RunState.RUNNING
        spin_ns = self.cfg.spin_us * 1000
        idle_since = 0
        while True:
            self._loop_iterations += 1
            busy = self._poll_once()
            if self.on_loop is not None:
                self.on_loop()
            if self.state == RunState.STOPPING and self._try_finish_stop():
                break
            # A busy pass is followed by another.  (Going idle at once unless _ready() saw new
            # work cut passes per frame from 2.85 to 1.7 but not hostd's CPU, and the flood
            # test's p99 bound then failed 4 times in 58 runs against 0 in 40 with the
            # repeat: docs/reliability.md.)
            if busy:
                idle_since = 0
                continue
            now = monotonic_ns()
            if idle_since == 0:
                idle_since = now
            if self.cfg.poll_only:
                time.sleep(self.cfg.poll_interval_us / 1e6)
            # Spin only after a short task: between codec tasks the codec's threads are
            # still at work (frame threads outlive the task that fed them) and need the
            # CPU more than hostd needs to react a few microseconds sooner.
            elif now - idle_since < spin_ns and self._last_short and not self._codec_busy():
                os.sched_yield()
            else:
                self._sleep()
                idle_since = 0
        self.state = RunState.STOPPED

    def _codec_busy(self) -> bool:
        """A codec task is running: it takes milliseconds, so its IRQ is better awaited asleep.

        Spinning with sched_yield() while codec threads saturate the CPUs leaves this
        thread at the back of the run queue: measured on 2 cores, it then noticed a
        finished task ~0.6 ms late, where a futex wake-up takes ~30 us.
        """
        return any(f.running is not None and f.running.op not in _SHORT_OPS for f in self.files)

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
            if not g.dying and self._doorbell(g):
                busy = True
        if self._collect_irqs():
            busy = True
        now = monotonic_ns()
        if now >= self._watch_next_ns:
            self._check_deadlines(now)
        if self.state == RunState.RUNNING and self._dispatch():
            busy = True
        now = monotonic_ns()
        if now - self._spin_checked_ns >= 1_000_000:
            self._spin_checked_ns = now
            active = sum(1 for g in self.guests.values() if now - g.last_submit_ns < ACTIVE_WINDOW_NS)
            self._active_guests = active
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
        return any(not g.dying and g.region.mapped.load32(abi.REG_DOORBELL) for g in gs)

    def _sleep(self) -> None:
        """NEED_WAKEUP handshake: publish the flag, fence, re-check, then futex_waitv."""
        guests = [g for g in self.guests.values() if not g.dying]
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
            if self._watch_next_ns != NEVER:
                timeout = min(timeout, max(0, self._watch_next_ns - monotonic_ns()) / 1e9)
            futex_waitv(words, timeout)
        self.bank.store32(abi.BANK_HOST_NEED_WAKEUP, 0)
        for g in guests:
            g.region.mapped.store32(abi.REG_NEED_WAKEUP, 0)

    # -- doorbell and SQ ----------------------------------------------------------
    def _doorbell(self, g: Guest) -> bool:
        reg = g.region.mapped
        bell = reg.xchg32(abi.REG_DOORBELL, 0)
        if bell == 0:
            return False
        if bell == Doorbell.RESET:
            tail = reg.load32(abi.REG_SQ_TAIL)
            g.sq_head = tail
            g.ring_broken = False
            reg.store32(abi.REG_SQ_HEAD, tail)
            reg.store32(abi.REG_RING_ERROR, 0)
            g.log.info("ring reset", tail=tail)
            return True
        if bell != Doorbell.KICK:
            g.stats.bad_doorbells += 1  # any other value is ignored (seed 000 claim 4)
            return True
        g.stats.doorbells += 1
        if g.ring_broken:
            return True
        self._drain_sq(g)
        return True

    def _drain_sq(self, g: Guest) -> None:
        reg = g.region.mapped
        entries = g.region.layout.ring_entries
        tail = reg.load32(abi.REG_SQ_TAIL)  # acquire: the SQ entries before it are visible
        avail = (tail - g.sq_head) & U32
        if avail > entries:
            self._ring_error(g, ErrorCode.RING_OVERRUN, tail=tail, head=g.sq_head)
            g.ring_broken = True
            return
        now = monotonic_ns()
        g.last_submit_ns = now
        for _ in range(avail):
            slot = reg.load32(g.region.layout.sq_entry(g.sq_head))
            g.sq_head = (g.sq_head + 1) & U32
            if slot >= entries:
                self._ring_error(g, ErrorCode.BAD_RING_INDEX, slot=slot)
            elif slot in g.held_slots:
                self._ring_error(g, ErrorCode.SLOT_BUSY, slot=slot)
            else:
                g.held_slots.add(slot)
                g.arrival_ns[slot] = now
                self.scheduler.arrive(g.vm_id, slot)
        reg.store32(abi.REG_SQ_HEAD, g.sq_head)

    def _ring_error(self, g: Guest, code: ErrorCode, **kw: int) -> None:
        reg = g.region.mapped
        reg.store32(abi.REG_RING_ERROR, code)
        reg.fadd32(abi.REG_RING_ERROR_COUNT, 1)
        g.stats.ring_errors[code.name] += 1
        g.log.warning("ring error", error=code.name, **kw)

    # -- dispatch -------------------------------------------------------------------
    def _loadable(self, k: int, g: Guest, before: int | None = None) -> bool:
        """Whether a task of ``g`` may be loaded into channel ``k`` now.

        A file must be free for it.  If that file is the shadow of a running task, no
        staged task of another guest may be waiting for this channel: staged tasks were
        picked first (FIFO order, round-robin turns), and the shadow must not let ``g``
        overtake them.  ``before``: only tasks staged earlier than that count (the staged
        pass, which starts them in staging order)."""
        chan = self.channels[k]
        if chan.free_file(g.vm_id) is None:
            return False
        if chan.idle:
            return True
        return not any(s.pending.vm != g.vm_id and s.channel in (None, k)
                       and (before is None or s.order < before)
                       for h in self.guests.values() if (s := h.staged) is not None)

    def _revoke_shadows(self, g: Guest, channel: int | None) -> None:
        """``g`` had to be staged: take back other guests' shadow loads it would wait behind.

        A shadow file the worker has not claimed yet (still START) is reset with one CAS
        (START -> IDLE) that races the worker's claim CAS: exactly one wins.  The task
        (and its guest's staged task, which is later in that guest's order) goes back to
        the head of the guest's queue, so a waiting guest waits for at most the one task
        running on a channel, never for the one queued behind it."""
        for chan in self.channels if channel is None else [self.channels[channel]]:
            loaded = chan.loaded_files()
            if len(loaded) < 2 or loaded[0].running is None or loaded[0].running.vm_id == g.vm_id:
                continue  # no shadow load, or only g's own
            h = self.guests[loaded[0].running.vm_id]
            if h.dying:
                continue  # out of the scheduler already; its reclaim clears the files
            start = abi.ctrl_start(h.slot + 1)
            back: list[Pending] = []
            # Newest first: the worker claims in CH_SEQ order, so once a claim wins the
            # race, every older file is claimed too.  The ring stays contiguous.
            for rf in reversed(loaded[1:]):
                run = rf.running
                assert run is not None
                if self.bank.cas32(rf.offset + abi.CH_CTRL, start, Ctrl.IDLE) != start:
                    break  # the worker claimed it first: it runs
                rf.running = None
                chan.next_file = rf.file
                self._shadow_revokes += 1
                back.append(Pending(h.vm_id, run.slot, run.arrival))
                if run.op == Op.SESSION_OPEN:
                    self._unbind(h, run.session)
            if back:
                if h.staged is not None:
                    st, h.staged = h.staged, None
                    if st.prog.opcode == Op.SESSION_OPEN:
                        self._unbind(h, st.prog.session)
                    back.append(st.pending)
                    self.scheduler.block(h.vm_id, False)
                self.scheduler.put_back(h.vm_id, back)

    def _free_channel(self, g: Guest, before: int | None = None) -> int | None:
        """A channel for a task not bound to one: an idle one, else the shadow file of a
        channel running this guest's tasks."""
        shadow = None
        idle_ok = self._may_take_idle(g)
        shadow_ok = not self._fair_share_contended()
        for ch in self.channels:
            if ch.idle:
                if idle_ok:
                    return ch.index
            elif shadow_ok and shadow is None and self._loadable(ch.index, g, before):
                shadow = ch.index
        return shadow

    def _fair_share_contended(self) -> bool:
        """Round-robin or weighted scheduling with more than one guest active.

        Then a guest's stateless tasks get no shadow loads either: chained back to back
        they keep its worker on a core without a break, and on a small host the other
        guests' processes and workers wait for that core.  Session tasks keep theirs
        (bound to a channel, they gain the most from chaining)."""
        return self.scheduler.policy != "fifo" and self._active_guests >= 2

    def _may_take_idle(self, g: Guest) -> bool:
        """Fair-share policies leave one channel to the others while another guest is active.

        Tasks are not preemptible: a guest holding every channel makes any other guest's
        next task wait for one of its tasks to end, however short that task is.  With
        round-robin or weighted scheduling and another guest active (it submitted within
        ACTIVE_WINDOW_NS), a guest may start tasks not bound to a channel on at most
        channels - 1 channels.  FIFO stays work-conserving; a lone guest gets them all."""
        if self.channels_n < 2 or not self._fair_share_contended():
            return True
        held = sum(1 for c in self.channels
                   if any(f.running is not None and f.running.vm_id == g.vm_id for f in c.files))
        return held < self.channels_n - 1

    def _dispatch(self) -> bool:
        progressed = False
        # Staged tasks first, in the order the scheduler picked them (its policy's order,
        # not arrival: under round-robin a flooder's backlog arrived long before).
        staged = sorted((g.staged for g in self.guests.values() if g.staged), key=lambda s: s.order)
        for held in staged:
            g = self.guests[held.pending.vm]
            ch = held.channel if held.channel is not None else self._free_channel(g, held.order)
            if ch is not None and self._loadable(ch, g, held.order) and self._runnable(g) and g.staged is held:
                g.staged = None
                self.scheduler.block(g.vm_id, False)
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
            ch = st.channel if st.channel is not None else self._free_channel(g)
            if ch is None or not self._loadable(ch, g):
                self._stage_order += 1
                st.order = self._stage_order
                g.staged = st
                self.scheduler.block(g.vm_id, True)
                if self.scheduler.policy != "fifo":
                    # Under FIFO the shadow task arrived first and goes first; the
                    # fair-share policies give the waiting guest its turn instead.
                    self._revoke_shadows(g, st.channel)
                continue
            self._start(g, st, ch)
        return progressed

    def _prepare(self, g: Guest, p: Pending) -> Staged | None:
        """Copy the descriptor once (claim 6: just before it runs) and validate the copy."""
        layout = g.region.layout
        mem = g.region.mapped.mem
        at = layout.desc(p.slot) + abi.D_INPUT
        desc = abi.Descriptor.unpack(bytes(mem[at : at + abi.DESC_INPUT.size]))
        checked = validate.check(desc, layout)
        if isinstance(checked, ErrorCode):
            self._fail(g, p.slot, desc.tag, checked, op=desc.opcode)
            return None
        prog = checked
        config = b""
        channel: int | None = None
        if prog.opcode == Op.SESSION_OPEN:
            if len(g.sessions) >= self.cfg.max_sessions_per_guest:
                self._fail(g, p.slot, desc.tag, ErrorCode.BUSY, op=prog.opcode)
                return None
            config = bytes(mem[prog.src_off : prog.src_off + prog.src_len])
            cfg = validate.check_session_config(config, self.limits)
            if isinstance(cfg, ErrorCode):
                self._fail(g, p.slot, desc.tag, cfg, op=prog.opcode)
                return None
            sid = self._new_session_id(g)
            channel = min(self.channels, key=lambda c: (c.bound_sessions, not c.idle)).index
            g.sessions[sid] = channel
            g.session_codec[sid] = abi.CODEC_NAMES[abi.Codec(cfg.codec)]
            g.session_mpx[sid] = cfg.width * cfg.height / 1e6 if cfg.width and cfg.height else (
                0.0 if cfg.direction == abi.Direction.ENCODE else DEFAULT_DECODE_MPX)
            self.channels[channel].bound_sessions += 1
            prog = validate.Program(prog.opcode, prog.flags, sid, *_tail(prog))
        elif prog.opcode in abi.SESSION_OPS:
            if prog.flags & abi.F_MULTI:
                # Copied once, like the descriptor; the worker reads only this copy.
                multi = validate.check_multi(bytes(mem[prog.src_off : prog.src_off + prog.src_len]),
                                             prog.opcode, layout)
                if isinstance(multi, ErrorCode):
                    self._fail(g, p.slot, desc.tag, multi, op=prog.opcode)
                    return None
                config = multi
            bound = g.sessions.get(prog.session)
            if bound is None:
                lost = prog.session in g.lost_sessions or (
                    g.adopted and prog.session != 0 and not self._session_of_this_run(prog.session))
                if lost and prog.opcode == Op.SESSION_CLOSE:
                    g.lost_sessions.discard(prog.session)  # closing it is the guest's acknowledgement
                self._fail(g, p.slot, desc.tag, ErrorCode.SESSION_LOST if lost else ErrorCode.BAD_SESSION,
                           op=prog.opcode)
                return None
            channel = bound
        return Staged(p, prog, config, channel, g.arrival_ns.get(p.slot, monotonic_ns()))

    def _new_session_id(self, g: Guest) -> int:
        while True:
            sid = self._next_session
            self._next_session = (self._next_session + 1) & U32 or 1
            self._sessions_issued += 1
            if sid not in g.lost_sessions and sid not in g.sessions:
                return sid

    def _session_of_this_run(self, sid: int) -> bool:
        """Whether ``sid`` was handed out by this hostd (ids run from a random base)."""
        return (sid - self._session_base) & U32 < min(self._sessions_issued, U32)

    def _start(self, g: Guest, st: Staged, k: int) -> None:
        """Program a register file of channel ``k`` and start the codec unit (or queue the
        program behind the one running, in the shadow file)."""
        prog = st.prog
        chan = self.channels[k]
        rf = chan.free_file(g.vm_id)
        assert rf is not None
        chan.next_file = (rf.file + 1) % abi.CH_FILES
        ch = rf.offset
        bank = self.bank
        if st.config:
            off = abi.channel_config_offset(self.channels_n, k, rf.file)
            bank.mem[off : off + len(st.config)] = st.config
        abi.CH_PROGRAM_STRUCT.pack_into(
            bank.mem, ch + abi.CH_PROGRAM, prog.opcode, prog.flags, prog.session, len(st.config),
            prog.src_off, prog.src_len, prog.dst_off, prog.dst_len, prog.arg0, prog.arg1, prog.arg2, prog.arg3,
        )
        self._task_seq += 1
        bank.store32(ch + abi.CH_OWNER, g.slot + 1)
        bank.store64(ch + abi.CH_SEQ, self._task_seq)
        now = monotonic_ns()
        tag = 0
        inputs = len(st.config) // abi.MULTI_ENTRY.size if prog.flags & abi.F_MULTI else 1
        budget = task_budget_s(self.cfg, prog.opcode, g.session_mpx.get(prog.session, DEFAULT_DECODE_MPX), inputs)
        run = rf.running = Running(
            g.vm_id, st.pending.slot, tag, prog.opcode, prog.session, self._task_seq, now, st.arrival_ns,
            st.pending.seq, inputs, prog.dst_off, prog.dst_len, int(budget * 1e9),
        )
        if all(o is rf or o.running is None for o in chan.files):
            self._head_started(run, now)  # the channel was idle: the task runs at once
        # Release: the registers above are visible first.  Only worker g.slot+1 can claim it.
        bank.store32(ch + abi.CH_CTRL, abi.ctrl_start(g.slot + 1))
        others = [o.offset for o in chan.files if o is not rf and o.running is not None]
        if others:
            # Dekker with the worker's "store DONE; fence; look at the channel's files":
            # if another file is still RUNNING, the worker claims this one when that one
            # ends, so the kick (and the worker's wake-up) is saved.  Otherwise kick.
            fence()
            if any(bank.load32(off + abi.CH_CTRL) == Ctrl.RUNNING for off in others):
                self._kicks_saved += 1
                return
        if prog.opcode in _SHORT_OPS:
            kick_worker(bank, g.slot)  # the worker's main loop runs these inline
        else:
            kick_channel(bank, self.channels_n, k, g.slot)  # straight to the channel's thread

    # -- completion -------------------------------------------------------------------
    def _collect_irqs(self) -> bool:
        done = 0
        for rf in self.files:
            if rf.running is None:
                continue
            ch = rf.offset
            if self.bank.load32(ch + abi.CH_CTRL) != Ctrl.DONE:
                continue
            result, result_len, error, text_len, copied = abi.CH_RESULT_STRUCT.unpack_from(
                self.bank.mem, ch + abi.CH_RESULT
            )
            reason = ""
            if error and text_len:
                # The worker's reason, on its file's config page (abi.CH_RESULT).  The worker
                # runs hostile input: the text is bounded and decoded leniently.
                off = abi.channel_config_offset(self.channels_n, rf.channel, rf.file)
                raw = bytes(self.bank.mem[off : off + min(text_len, abi.ERROR_TEXT_MAX)])
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
        run = rf.running
        assert run is not None
        rf.running = None
        self._last_short = run.op in _SHORT_OPS
        self.bank.store32(rf.offset + abi.CH_CTRL, Ctrl.IDLE)
        now = monotonic_ns()
        chan = self.channels[rf.channel]
        # Union of the channel's [programmed, retired] spans: a shadow task's span
        # overlaps the one it waited behind, and retirements come in time order.
        chan.busy_ns += now - max(run.dispatch_ns, chan.busy_until)
        chan.busy_until = now
        chan.tasks += 1
        if chan.idle:
            chan.next_file = 0  # one task at a time keeps using the same (cache-warm) file
        else:
            # The worker runs a channel's files in CH_SEQ order: the oldest one left runs next
            # (or already runs), so its deadline counts from now.  (With IRQs held back it
            # may have started earlier: the watchdog errs on the late side, never early.)
            head = min((f.running for f in chan.files if f.running is not None), key=lambda r: r.seq)
            if head.started_ns == 0:
                self._head_started(head, now)
        g = self.guests.get(run.vm_id)
        if g is None:
            return
        g.worker_tasks += 1
        codec = g.session_codec.get(run.session, "")
        if run.op == Op.SESSION_OPEN and error != ErrorCode.OK:
            self._unbind(g, run.session)
        elif run.op == Op.SESSION_CLOSE and error == ErrorCode.OK:
            self._unbind(g, run.session)
        if run.op in (Op.ENCODE_FRAME, Op.DECODE) and error == ErrorCode.OK:
            g.stats.frames += run.inputs
        g.stats.bytes_copied += copied
        if error == ErrorCode.OK and run.op in (Op.COPY, Op.CRC32, Op.ENCODE_FRAME, Op.DECODE):
            g.stats.bytes_moved += result_len
        self._complete(g, run.slot, error, result, result_len, rf.channel, now - run.dispatch_ns,
                       op=run.op, codec=codec, submit_ns=run.submit_ns, reason=reason,
                       dst=(run.dst_off, run.dst_len))
        self._maybe_recycle(g)

    # -- the watchdog ------------------------------------------------------------------------
    def _head_started(self, run: Running, now: int) -> None:
        run.started_ns = now
        if run.budget_ns:
            self._watch_next_ns = min(self._watch_next_ns, now + run.budget_ns)

    def _check_deadlines(self, now: int) -> None:
        """End the tasks past their deadline: the worker is killed, and its reaper's
        _worker_exited retires them with TIMEOUT (only then: a worker still running could
        write into their buffers after the guest saw them end)."""
        nearest = NEVER
        for rf in self.files:
            run = rf.running
            if run is None or not run.started_ns or not run.budget_ns or run.timed_out:
                continue
            deadline = run.started_ns + run.budget_ns
            if now < deadline:
                nearest = min(nearest, deadline)
            elif self.bank.load32(rf.offset + abi.CH_CTRL) == Ctrl.DONE:
                nearest = now  # finished after all (its IRQ is on the way or held back): look again
            else:
                self._time_out(rf, run, now)
        self._watch_next_ns = nearest

    def _time_out(self, rf: RegFile, run: Running, now: int) -> None:
        g = self.guests.get(run.vm_id)
        if g is None or g.dying or g.timing_out:
            return  # its reclaim, or the death of the worker being killed, retires it
        run.timed_out = True
        seconds = round((now - run.started_ns) / 1e9, 3)
        g.stats.timeouts += 1
        g.log.warning("task timed out; killing its worker", task=run.slot, op=run.op.name, seconds=seconds,
                      deadline_s=round(run.budget_ns / 1e9, 3), channel=rf.channel)
        self.events.emit("timeout", vm=g.vm_id, name=g.name, task=run.slot, op=run.op.name, seconds=seconds)
        # Nothing more of this guest's starts until the respawn (_spawn lifts the block); a
        # file loaded meanwhile is still at START when the worker is reaped, and is requeued.
        g.timing_out = True
        self.scheduler.block(g.vm_id, True)
        if g.worker is not None:
            g.worker.kill()

    def _unbind(self, g: Guest, sid: int) -> None:
        ch = g.sessions.pop(sid, None)
        g.session_codec.pop(sid, None)
        g.session_mpx.pop(sid, None)
        if ch is not None:
            self.channels[ch].bound_sessions -= 1

    def _fail(self, g: Guest, slot: int, tag: int, code: ErrorCode, op: int = 0) -> None:
        """A task that never reached a channel ends with ``code``."""
        self.scheduler.finished(g.vm_id)
        self._complete(g, slot, code, 0, 0, U32, 0, op=op, submit_ns=g.arrival_ns.get(slot, 0),
                       counted=True)
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
        abi.DESC_RESULT.pack_into(reg.mem, desc + abi.D_RESULT, result & (2**64 - 1), result_len, error,
                                  channel, device_ns, self._task_seq)
        # Exchange (seq-cst) orders the result fields before the flip and the
        # WAITERS load after it; the guest increments WAITERS before it re-reads
        # the status and sleeps, so one side always sees the other.
        reg.xchg32(desc + abi.D_STATUS, Status.DONE if error == ErrorCode.OK else Status.ERROR)
        reg.fadd64(abi.REG_IRQ_COUNT, 1)
        if reg.load32(desc + abi.D_WAITERS):
            self._wakes_sent += 1
            reg.futex_wake(desc + abi.D_STATUS)

    # -- attach / detach / workers --------------------------------------------------------
    def _do_attach(self, req: AttachRequest) -> None:
        try:
            if self.state != RunState.RUNNING:
                raise GuestFault(ErrorCode.DEVICE_GONE, "hostd is stopping")
            if not self._free_slots:
                raise GuestFault(ErrorCode.BUSY, f"max_guests ({self.cfg.max_guests}) reached")
            vm_id = self._next_vm
            cfg = self.cfg
            if req.adopt_fd is not None:
                # The fd and everything in it come from the guest: the same limits as a
                # fresh attach apply (a forged 2^31-slot ring would stall this thread).
                region = adopt_region(req.adopt_fd, vm_id, self.caps, self.epoch,
                                      sizes=(cfg.region_min, cfg.region_max), rings=(cfg.ring_min, cfg.ring_max))
            else:
                region = create_region(vm_id, req.region_size, req.ring_entries, self.caps, self.epoch,
                                       named=req.named)
            self._next_vm += 1
            g = Guest(vm_id, req.name, req.pid, req.uid, region, self._free_slots.pop(),
                      weight=cfg.weight_of(req.name), attached_ns=monotonic_ns(),
                      adopted=req.adopt_fd is not None)
            try:
                region.mapped.store64(abi.REG_HEARTBEAT, monotonic_ns())
                rerun = self._readopt(g) if req.adopt_fd is not None else []
                self._spawn(g)
            except BaseException:
                self._free_slots.append(g.slot)
                if req.adopt_fd is not None:
                    region.fd = -1  # the control connection still owns (and closes) the adopted fd
                region.close()
                raise
            self.guests[vm_id] = g
            self.scheduler.add_vm(vm_id, g.weight)
            for slot in rerun:
                self.scheduler.arrive(vm_id, slot)
            req.guest = g
            g.log.info("guest attached", pid=req.pid, uid=req.uid, region_size=region.layout.region_size,
                       ring=region.layout.ring_entries, named=region.name is not None,
                       adopted=req.adopt_fd is not None, requeued=len(rerun))
            self.events.emit("attach", vm=vm_id, name=g.name, pid=req.pid)
        except Exception as e:
            req.error = e
        finally:
            req.done.set()

    def _readopt(self, g: Guest) -> list[int]:
        """Resume a region that a previous hostd served (the guest kept the fd).

        Entries between REG_SQ_HEAD and SQ_TAIL were never read: they are queued
        again by the next KICK.  Slots still SUBMITTED outside that window were in
        flight when the old hostd died: stateless ops are re-run (they are
        idempotent, and so is SESSION_OPEN: it opens a fresh session), session ops
        end with SESSION_LOST since their session died with the old worker.  The guest
        (guestlib) holds its producer lock while it re-attaches, so no slot is half
        submitted: every SUBMITTED slot is either in that window or was read before.
        """
        reg = g.region.mapped
        layout = g.region.layout
        g.sq_head = reg.load32(abi.REG_SQ_HEAD)
        tail = reg.load32(abi.REG_SQ_TAIL)
        unread: set[int] = set()
        if (tail - g.sq_head) & U32 <= layout.ring_entries:
            for i in range((tail - g.sq_head) & U32):
                unread.add(reg.load32(layout.sq_entry(g.sq_head + i)))
        reg.store32(abi.REG_RING_ERROR, 0)
        rerun: list[int] = []
        for slot in range(layout.ring_entries):
            if slot in unread or reg.load32(layout.desc(slot) + abi.D_STATUS) != Status.SUBMITTED:
                continue
            at = layout.desc(slot) + abi.D_INPUT
            desc = abi.Descriptor.unpack(bytes(reg.mem[at : at + abi.DESC_INPUT.size]))
            if desc.opcode in abi.SESSION_OPS:
                self._complete(g, slot, ErrorCode.SESSION_LOST, 0, 0, U32, 0, op=desc.opcode,
                               submit_ns=0, counted=True)
            else:
                g.held_slots.add(slot)
                g.arrival_ns[slot] = monotonic_ns()
                rerun.append(slot)
        return rerun

    def _spawn(self, g: Guest) -> None:
        g.generation += 1
        gen = g.generation
        g.respawn_pending = False
        g.timing_out = False
        respawn = g.vm_id in self.guests  # (not on attach)
        if respawn:  # the queue held while there was no worker
            self.scheduler.block(g.vm_id, g.staged is not None)
        limits = {"max_width": self.cfg.max_width, "max_height": self.cfg.max_height,
                  "max_pixels": self.cfg.max_pixels, "max_sessions": self.cfg.max_sessions_per_guest}

        def on_exit(h: WorkerHandle, rc: int) -> None:
            self.post(lambda: self._worker_exited(g.vm_id, gen, rc))

        g.worker = spawn_worker(
            slot=g.slot, vm_id=g.vm_id, generation=gen, region_fd=g.region.fd,
            region_size=g.region.layout.region_size, bank_fd=self.bank_fd, channels=self.channels_n,
            limits=limits, fault_injection=self.cfg.fault_injection, started_ns=monotonic_ns(),
            on_exit=on_exit,
        )
        g.worker_tasks = 0
        if respawn:
            self.events.emit("restart", vm=g.vm_id, name=g.name, generation=gen)

    def _worker_exited(self, vm_id: int, generation: int, rc: int) -> None:
        g = self.guests.get(vm_id)
        if g is None or generation != g.generation:
            return
        self._collect_irqs()  # results the worker posted before it died still count
        held = sorted((f for f in self.files if f.running is not None and f.running.vm_id == vm_id),
                      key=lambda f: f.running.seq if f.running else 0)
        if g.dying:
            for rf in held:
                self._retire(rf, ErrorCode.DEVICE_GONE)
            self._reclaim(g)
            return
        # The worker is reaped, so CTRL can no longer change under us.  A channel still at
        # START was programmed after the worker died (or while it was being recycled) and
        # never ran: its task goes back to the queue.  Only claimed tasks crashed with it.
        claimed = []
        for rf in held:
            if abi.ctrl_is_start(self.bank.load32(rf.offset + abi.CH_CTRL)):
                self._requeue(g, rf)
            else:
                claimed.append(rf)
        timed_out = g.timing_out
        if timed_out:
            crash = "the worker was killed: another task of this guest ran past its deadline"
        elif rc < 0:
            try:
                crash = f"the worker died of {signal.Signals(-rc).name}"
            except ValueError:
                crash = f"the worker died of signal {-rc}"
        else:
            crash = f"the worker exited with status {rc}"
        now = monotonic_ns()
        for rf in claimed:
            run = rf.running
            assert run is not None
            if run.timed_out:
                self._retire(rf, ErrorCode.TIMEOUT, reason=(
                    f"the task ran {(now - run.started_ns) / 1e9:.3g} s, past its deadline of "
                    f"{run.budget_ns / 1e9:.3g} s: its worker was killed and respawned, and this "
                    f"guest's sessions are lost"))
            else:
                self._retire(rf, ErrorCode.WORKER_CRASHED, reason=crash)
        if g.sessions:
            g.lost_sessions.update(g.sessions)
            for sid in list(g.sessions):
                self._unbind(g, sid)
        if g.staged is not None and g.staged.prog.session in g.lost_sessions:
            st, g.staged = g.staged, None
            self._fail(g, st.pending.slot, 0, ErrorCode.SESSION_LOST, op=st.prog.opcode)
        recycled, g.recycling = g.recycling, False
        g.recycles += recycled
        if not recycled:
            g.stats.worker_restarts += 1
            g.log.warning("worker killed by the watchdog; respawning" if timed_out else "worker died; respawning",
                          rc=rc, failed_tasks=len(claimed), requeued=len(held) - len(claimed),
                          lost_sessions=len(g.lost_sessions))
            if not timed_out:
                self.events.emit("worker_crash", vm=g.vm_id, name=g.name, rc=rc)
        # A worker that dies before it ran anything (it cannot map the region, the host
        # is out of memory or fds) would die again at once: back off instead of spinning.
        # A crash on a task is respawned at once; its cost is paid per guest task.
        early = not recycled and not claimed and g.worker_tasks == 0
        g.early_deaths = g.early_deaths + 1 if early else 0
        if self.state != RunState.RUNNING:
            return
        if g.early_deaths < 2:
            self._spawn(g)
            return
        delay = min(RESPAWN_BACKOFF_MAX_S, 0.1 * 2 ** (g.early_deaths - 2))
        g.log.warning("worker keeps dying before running a task; backing off", delay_s=delay)
        g.respawn_pending = True
        self.scheduler.block(g.vm_id, True)

        def respawn() -> None:
            # On the device thread: PDEATHSIG follows the thread that forks the worker.
            if self.guests.get(g.vm_id) is g and not g.dying and g.generation == generation \
                    and self.state == RunState.RUNNING:
                self._spawn(g)

        timer = threading.Timer(delay, lambda: self.post(respawn))
        timer.daemon = True
        timer.start()

    def _requeue(self, g: Guest, rf: RegFile) -> None:
        """Take back a task whose channel was programmed but never claimed by a worker.

        It re-enters the guest's queue (at the back) and its descriptor is copied again
        when it is picked: the copy taken before never ran, so the one that runs is
        still the only one that counts."""
        run = rf.running
        assert run is not None
        rf.running = None
        self.bank.store32(rf.offset + abi.CH_CTRL, Ctrl.IDLE)
        self.scheduler.finished(g.vm_id)
        if run.op == Op.SESSION_OPEN:
            self._unbind(g, run.session)
        self.scheduler.arrive(g.vm_id, run.slot)

    def _runnable(self, g: Guest) -> bool:
        """Whether ``g`` has a worker that may be given tasks now."""
        return not (g.recycling or g.respawn_pending or g.dying or g.timing_out)

    def _maybe_recycle(self, g: Guest) -> None:
        """Recycle a worker by task count or RSS, only between tasks and with no sessions.

        The guest's queue is held (scheduler.block) until the new worker is spawned: a
        task started now would be claimed by a worker that is being killed."""
        w = g.worker
        if w is None or w.exited.is_set() or not self._runnable(g) or g.sessions or g.staged is not None \
                or any(f.running and f.running.vm_id == g.vm_id for f in self.files):
            return
        by_count = self.cfg.worker_recycle_tasks and g.worker_tasks >= self.cfg.worker_recycle_tasks
        by_rss = self.cfg.worker_recycle_rss_mb and w.rss_bytes() > self.cfg.worker_recycle_rss_mb << 20
        if by_count or by_rss:
            g.recycling = True
            self.scheduler.block(g.vm_id, True)
            g.log.info("recycling worker", tasks=g.worker_tasks, rss=w.rss_bytes())
            w.kill()

    def _do_detach(self, vm_id: int, reason: str) -> None:
        g = self.guests.get(vm_id)
        if g is None or g.dying:
            return
        g.dying = True
        g.log.info("guest detaching", reason=reason)
        self.events.emit("detach", vm=g.vm_id, name=g.name, reason=reason)
        dropped = self.scheduler.remove_vm(vm_id)
        if g.staged is not None:
            dropped.append(g.staged.pending)
            g.staged = None
        for p in dropped:
            self._complete(g, p.slot, ErrorCode.DEVICE_GONE, 0, 0, U32, 0, op=0, submit_ns=0,
                           counted=True)
        if g.worker is not None and not g.worker.exited.is_set():
            g.worker.kill()  # its reaper posts _worker_exited, which reclaims
        else:
            self._reclaim(g)

    def _reclaim(self, g: Guest) -> None:
        for rf in self.files:
            if rf.running is not None and rf.running.vm_id == g.vm_id:
                rf.running = None
                self.bank.store32(rf.offset + abi.CH_CTRL, Ctrl.IDLE)
        for sid in list(g.sessions):
            self._unbind(g, sid)
        self.scheduler.remove_vm(g.vm_id)
        if self.guests.pop(g.vm_id, None) is not None:
            # Its counters go on in the device-wide totals, and its last snapshot stays
            # listed (statistics()["departed"]) for cfg.metrics_grace_s.
            now = monotonic_ns()
            self._totals.add(g.stats)
            entry = self._vm_stats(g, now, {})
            entry.update(worker_pid=None, worker_rss=0, detached_at=round(time.time(), 3))
            self._departed.append((now, entry))
            self._prune_departed(now)
        self._free_slots.append(g.slot)
        g.region.close()
        g.log.info("guest reclaimed")

    # -- stop -------------------------------------------------------------------------------
    def _begin_stop(self) -> None:
        if self.state != RunState.RUNNING:
            return
        log.info("device stopping", grace_s=self.cfg.shutdown_grace_s)
        self.state = RunState.STOPPING
        self._stop_deadline = monotonic_ns() + int(self.cfg.shutdown_grace_s * 1e9)
        for g in self.guests.values():
            g.region.mapped.store32(abi.REG_DEVICE_STATE, abi.DeviceState.STOPPING)

    def _try_finish_stop(self) -> bool:
        running = sorted((f for f in self.files if f.running is not None),
                         key=lambda f: f.running.seq if f.running else 0)
        if running and monotonic_ns() < self._stop_deadline:
            return False
        for rf in running:
            self._retire(rf, ErrorCode.DEVICE_GONE)
        for g in list(self.guests.values()):
            dropped = self.scheduler.remove_vm(g.vm_id)
            if g.staged is not None:
                dropped.append(g.staged.pending)
                g.staged = None
            for p in dropped:
                self._complete(g, p.slot, ErrorCode.DEVICE_GONE, 0, 0, U32, 0, op=0,
                               submit_ns=0, counted=True)
            self._fail_unread(g)
            g.region.mapped.store32(abi.REG_DEVICE_STATE, abi.DeviceState.GONE)
            if g.worker is not None:
                g.worker.kill()
        log.info("device stopped")
        return True

    def _fail_unread(self, g: Guest) -> None:
        """SQ entries never read end with DEVICE_GONE, so no waiter hangs."""
        reg = g.region.mapped
        layout = g.region.layout
        tail = reg.load32(abi.REG_SQ_TAIL)
        avail = (tail - g.sq_head) & U32
        if avail > layout.ring_entries:
            return
        for _ in range(avail):
            slot = reg.load32(layout.sq_entry(g.sq_head))
            g.sq_head = (g.sq_head + 1) & U32
            if slot < layout.ring_entries and slot not in g.held_slots:
                self._complete(g, slot, ErrorCode.DEVICE_GONE, 0, 0, U32, 0, op=0, submit_ns=0,
                               counted=True)
        reg.store32(abi.REG_SQ_HEAD, g.sq_head)

    def close(self) -> None:
        """Free everything; call after the device thread stopped (join)."""
        if self._thread is not None and self._thread.is_alive():
            # Wedged: unmapping under it would crash the process; leak instead.
            log.error("device thread still running at close; regions and bank left mapped")
            return
        for g in list(self.guests.values()):
            if g.worker is not None:
                g.worker.kill()
                g.worker.proc.wait(5)
            g.region.close()
        self.guests.clear()
        with self._post_lock:
            self._closed = True
            self.bank.close()
            os.close(self.bank_fd)

    # -- statistics -------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        """A consistent snapshot.  The device thread owns every structure read here, so
        other threads (control connections, the metrics server) have it built there:
        iterating the guests, counters and latency deques while the device thread
        changes them raises "changed size during iteration"."""
        if self._thread is None or threading.current_thread() is self._thread or self.stopped.is_set():
            return self._statistics()
        box: list[dict[str, Any] | Exception] = []
        done = threading.Event()

        def snap() -> None:
            try:
                box.append(self._statistics())
            except Exception as e:  # never let a statistics bug kill the device loop
                box.append(e)
            finally:
                done.set()

        self.post(snap)
        if done.wait(5.0):
            result = box[0]
            if isinstance(result, Exception):
                raise result
            return result
        for _ in range(5):  # the device thread is gone or wedged: best effort from here
            try:
                return self._statistics()
            except RuntimeError:
                continue
        return self._statistics()

    @staticmethod
    def _channel_stats(c: Channel, now: int) -> dict[str, Any]:
        loaded = c.loaded()
        head = loaded[0] if loaded else None
        return {"index": c.index, "busy": head is not None,
                "vm": head.vm_id if head else None,
                "op": head.op.name if head else None,
                "loaded": len(loaded),  # > 1: tasks wait in shadow files
                "bound_sessions": c.bound_sessions, "tasks": c.tasks,
                "busy_seconds": round((c.busy_ns + (now - max(head.dispatch_ns, c.busy_until) if head else 0))
                                      / 1e9, 6)}

    @staticmethod
    def _vm_stats(g: Guest, now: int, sv: dict[str, Any]) -> dict[str, Any]:
        w = g.worker
        return {
            "vm": g.vm_id,
            "name": g.name,
            "pid": g.pid,
            "worker_pid": w.pid if w else None,
            "worker_rss": w.rss_bytes() if w else 0,
            "region_size": g.region.layout.region_size,
            "ring_entries": g.region.layout.ring_entries,
            # Whether, not which: a name would let any peer of hostd's uid open the region.
            "named_region": g.region.name is not None,
            "queue_depth": sv.get("queued", 0) + (1 if g.staged else 0),
            "inflight": sv.get("inflight", 0),
            "sessions": len(g.sessions),
            "lost_sessions": len(g.lost_sessions),
            "worker_recycles": g.recycles,
            "uptime_s": round((now - g.attached_ns) / 1e9, 3),
            **g.stats.snapshot(),
        }

    def _prune_departed(self, now: int) -> None:
        grace_ns = self.cfg.metrics_grace_s * 1e9
        while self._departed and now - self._departed[0][0] >= grace_ns:
            self._departed.popleft()

    def _statistics(self) -> dict[str, Any]:
        now = monotonic_ns()
        sched = self.scheduler.statistics()
        sched_vms: dict[int, dict[str, Any]] = sched["vms"]  # type: ignore[assignment]
        guests = list(self.guests.values())
        vms = [self._vm_stats(g, now, sched_vms.get(g.vm_id, {})) for g in guests]
        grace_ns = self.cfg.metrics_grace_s * 1e9
        return {
            "state": self.state.value,
            "epoch": self.epoch,
            "uptime_s": round((now - self.started_ns) / 1e9, 3),
            "policy": self.scheduler.policy,
            "cap": self.scheduler.cap,
            "channels": [self._channel_stats(c, now) for c in self.channels],
            "guests": len(vms),
            "vms": vms,
            # Counters that only grow: the guests gone plus the guests here.
            "totals": self._totals.snapshot(g.stats for g in guests),
            "departed": [entry for t, entry in self._departed if now - t < grace_ns],
            "loop": {"iterations": self._loop_iterations, "sleeps": self._sleeps, "wakes_sent": self._wakes_sent,
                     "kicks_saved": self._kicks_saved, "shadow_revokes": self._shadow_revokes,
                     "worker_spins": self._worker_spins, "irq_holdoff": self.cfg.worker_irq_holdoff,
                     "collects": self._collects, "files_retired": self._files_retired},
        }


def _tail(p: validate.Program) -> tuple[int, ...]:
    return (p.src_off, p.src_len, p.dst_off, p.dst_len, p.arg0, p.arg1, p.arg2, p.arg3)

