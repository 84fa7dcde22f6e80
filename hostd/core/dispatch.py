"""Channels, register files and staged tasks as plain data, and the rules of dispatch.

The emulated device has K channels, each with ``abi.CH_FILES`` register files loaded in
ring order.  While the worker runs the task in one file, hostd loads the same guest's next
tasks into the others (*shadow loads*); the worker claims the started file with the lowest
CH_SEQ the moment it ends the one before.  A channel's loaded files only ever hold one
guest's tasks at a time.  A task that finds no file it may use is *staged* (one per guest)
and its guest blocked in the scheduler until it starts.

This module decides; the device loop applies the decisions to the register bank.  The one
decision that races the worker, taking back a shadow load (``shadows_to_revoke``), is
offered file by file: the loop tries each with a CAS and reports the wins (``revoked``).

Fair share (policies with ``fair_share``, while two or more guests are active): a guest may
hold at most all channels but one for tasks not bound to a channel, and its stateless tasks
get no shadow loads.  Policies with ``revokes_shadows``: a staged task takes back other
guests' shadow loads it would wait behind.  FIFO does neither and stays work-conserving.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from hostd.core.scheduler import Pending, Policy, Scheduler
from hostd.core.sessions import Sessions
from hostd.core.validate import Program
from hostd.core.watchdog import Watchdog
from vmediad import abi
from vmediad.abi import Op

# A guest that submitted within this window is active.
ACTIVE_WINDOW_NS = 50_000_000


@dataclass(slots=True)
class Running:
    """A task programmed into a register file and not yet retired (START, RUNNING or DONE)."""

    vm_id: int
    slot: int
    tag: int
    op: Op
    session: int
    seq: int  # CH_SEQ: the worker runs a channel's files in this order
    dispatch_ns: int
    submit_ns: int
    arrival: int = 0  # the scheduler's seq, to put the task back if its shadow load is revoked
    inputs: int = 1  # frames or chunks the task feeds (a MULTI list has several)
    dst_off: int = 0  # where an error record goes if the task fails (abi.ERROR_RECORD)
    dst_len: int = 0
    budget_ns: int = 0  # the watchdog's allowance (0: none), counted from started_ns
    started_ns: int = 0  # when it became its channel's oldest loaded task (0: waiting behind one)
    timed_out: bool = False  # past its deadline: its worker is being killed


@dataclass(slots=True)
class RegFile:
    """One of a channel's register files, as hostd last programmed it."""

    channel: int
    file: int
    running: Running | None = None
    offset: int = field(init=False)  # of the file in the bank

    def __post_init__(self) -> None:
        self.offset = abi.channel_offset(self.channel, self.file)


@dataclass(slots=True)
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


@dataclass(slots=True)
class Staged:
    """A task whose descriptor was copied and validated, waiting for a channel."""

    pending: Pending
    prog: Program
    config: bytes  # the session config or MULTI list copied with it (the file's config page)
    channel: int | None  # the session's channel; None: any free channel
    arrival_ns: int
    order: int = 0  # when it was staged: staged tasks start in this order (the policy's)


class Dispatcher:
    """The channels, the staged tasks and the scheduler, and the rules that join them."""

    def __init__(self, channels: int, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.policy: Policy = scheduler.policy
        self.channels = [Channel.new(i) for i in range(channels)]
        self.files = [f for c in self.channels for f in c.files]
        self.staged: dict[int, Staged] = {}  # guest -> its one staged task
        self.watchdog = Watchdog()
        self.active_guests = 0  # guests that submitted within ACTIVE_WINDOW_NS (the loop counts)
        self.shadow_revokes = 0  # shadow loads taken back for a waiting guest
        self._stage_order = 0

    # -- where a task may go -------------------------------------------------------------
    def loadable(self, k: int, vm: int, before: int | None = None) -> bool:
        """Whether a task of guest ``vm`` may be loaded into channel ``k`` now.

        A file must be free for it.  If that file is the shadow of a running task, no
        staged task of another guest may be waiting for this channel: staged tasks were
        picked first (FIFO order, round-robin turns), and the shadow must not let ``vm``
        overtake them.  ``before``: only tasks staged earlier than that count (the staged
        pass, which starts them in staging order)."""
        chan = self.channels[k]
        if chan.free_file(vm) is None:
            return False
        if chan.idle:
            return True
        return not any(s.pending.vm != vm and s.channel in (None, k) and (before is None or s.order < before)
                       for s in self.staged.values())

    def contended(self) -> bool:
        """A fair-share policy with more than one guest active.

        Then a guest's stateless tasks get no shadow loads either: chained back to back
        they keep its worker on a core without a break, and on a small host the other
        guests' processes and workers wait for that core.  Session tasks keep theirs
        (bound to a channel, they gain the most from chaining)."""
        return self.policy.fair_share and self.active_guests >= 2

    def may_take_idle(self, vm: int) -> bool:
        """Fair-share policies leave one channel to the others while another guest is active.

        Tasks are not preemptible: a guest holding every channel makes any other guest's
        next task wait for one of its tasks to end, however short that task is.  While
        ``contended()``, a guest may start tasks not bound to a channel on at most
        channels - 1 channels.  FIFO stays work-conserving; a lone guest gets them all."""
        n = len(self.channels)
        if n < 2 or not self.contended():
            return True
        held = sum(1 for c in self.channels if any(f.running is not None and f.running.vm_id == vm for f in c.files))
        return held < n - 1

    def free_channel(self, vm: int, before: int | None = None) -> int | None:
        """A channel for a task not bound to one: an idle one, else the shadow file of a
        channel running this guest's tasks."""
        shadow = None
        idle_ok = self.may_take_idle(vm)
        shadow_ok = not self.contended()
        for ch in self.channels:
            if ch.idle:
                if idle_ok:
                    return ch.index
            elif shadow_ok and shadow is None and self.loadable(ch.index, vm, before):
                shadow = ch.index
        return shadow

    def place(self, st: Staged, before: int | None = None) -> int | None:
        """The channel ``st`` may be loaded into now, or None: it waits (staged)."""
        vm = st.pending.vm
        ch = st.channel if st.channel is not None else self.free_channel(vm, before)
        return ch if ch is not None and self.loadable(ch, vm, before) else None

    def session_channel(self) -> Channel:
        """The channel a new session is bound to: the one with the fewest sessions, idle first."""
        return min(self.channels, key=lambda c: (c.bound_sessions, not c.idle))

    # -- staging ------------------------------------------------------------------------------
    def stage(self, st: Staged) -> None:
        """``st`` found no channel: it waits, and its guest's queue is held until it starts."""
        self._stage_order += 1
        st.order = self._stage_order
        self.staged[st.pending.vm] = st
        self.scheduler.block(st.pending.vm, True)

    def staged_in_order(self) -> list[Staged]:
        """The staged tasks in the order the scheduler picked them (its policy's order, not
        arrival: under round-robin a flooder's backlog arrived long before)."""
        return sorted(self.staged.values(), key=lambda s: s.order)

    def unstage(self, vm: int) -> Staged | None:
        """Take ``vm``'s staged task out of staging (the caller unblocks or drops the guest)."""
        return self.staged.pop(vm, None)

    # -- loading and retiring files -----------------------------------------------------------
    def load(self, k: int, run: Running) -> RegFile:
        """Put ``run`` into the file of channel ``k`` its guest may use now (``place`` chose k)."""
        chan = self.channels[k]
        rf = chan.free_file(run.vm_id)
        if rf is None:
            raise AssertionError(f"channel {k} has no file for vm {run.vm_id}")
        chan.next_file = (rf.file + 1) % abi.CH_FILES
        rf.running = run
        if all(o is rf or o.running is None for o in chan.files):
            self.watchdog.started(run, run.dispatch_ns)  # the channel was idle: the task runs at once
        return rf

    def retire(self, rf: RegFile, now: int) -> Running:
        """The file's task ended (or is abandoned): the file is free again."""
        run = rf.running
        if run is None:
            raise AssertionError(f"file {rf.channel}.{rf.file} retired twice")
        rf.running = None
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
                self.watchdog.started(head, now)
        return run

    def requeue(self, rf: RegFile, sessions: Sessions) -> Running:
        """A file programmed but never claimed (its worker died): its task goes to the back
        of its guest's queue, and its descriptor is copied again when it is picked."""
        run = rf.running
        if run is None:
            raise AssertionError(f"file {rf.channel}.{rf.file} requeued while empty")
        rf.running = None
        self.scheduler.finished(run.vm_id)
        if run.op == Op.SESSION_OPEN:
            sessions.unbind(run.session)
        self.scheduler.arrive(run.vm_id, run.slot)
        return run

    def files_of(self, vm: int) -> list[RegFile]:
        """The files holding tasks of ``vm``, oldest task first."""
        return sorted((f for f in self.files if f.running is not None and f.running.vm_id == vm),
                      key=lambda f: f.running.seq if f.running is not None else 0)

    def drop(self, vm: int) -> list[RegFile]:
        """``vm`` is gone: its files are abandoned (the caller idles them in the bank)."""
        files = [f for f in self.files if f.running is not None and f.running.vm_id == vm]
        for f in files:
            f.running = None
        return files

    def loaded_files(self) -> list[RegFile]:
        """Every file holding a task, oldest task first."""
        return sorted((f for f in self.files if f.running is not None),
                      key=lambda f: f.running.seq if f.running is not None else 0)

    def holds(self, vm: int) -> bool:
        return any(f.running is not None and f.running.vm_id == vm for f in self.files)

    def codec_busy(self) -> bool:
        """A codec task is loaded (not a NOP/COPY/CRC32)."""
        return any(f.running is not None and f.running.op not in abi.SHORT_OPS for f in self.files)

    # -- taking back shadow loads -------------------------------------------------------------
    def shadows_to_revoke(self, vm: int, channel: int | None) -> Iterator[tuple[int, list[RegFile]]]:
        """A task of ``vm`` was staged: the shadow loads of other guests it would wait behind.

        Per channel (``channel``, or every one for a task not bound to one), the owner and
        its shadow files, newest first.  Each is to be taken back with one CAS START -> IDLE
        that races the worker's claim: the caller reports each win with ``revoked`` and stops
        at the first loss (the worker claims in CH_SEQ order, so once a claim wins every older
        file is claimed too, and the ring stays contiguous), then calls ``give_back``.  So a
        waiting guest waits for at most the one task running on a channel, never for the one
        queued behind it."""
        for chan in self.channels if channel is None else (self.channels[channel],):
            loaded = chan.loaded_files()
            if len(loaded) < 2:
                continue  # no shadow load
            head = loaded[0].running
            assert head is not None
            if head.vm_id == vm or head.vm_id not in self.scheduler:
                continue  # vm's own; or its guest is detaching, and its reclaim clears the files
            yield head.vm_id, loaded[:0:-1]

    def revoked(self, rf: RegFile) -> Running:
        """The CAS took the file back before the worker claimed it."""
        run = rf.running
        assert run is not None
        rf.running = None
        self.channels[rf.channel].next_file = rf.file
        self.shadow_revokes += 1
        return run

    def give_back(self, vm: int, runs: list[Running], sessions: Sessions) -> None:
        """Put ``vm``'s revoked tasks back at the head of its queue, with its staged task
        (later in its order); the sessions their SESSION_OPENs bound are unbound."""
        back = [Pending(vm, run.slot, run.arrival) for run in runs]
        for run in runs:
            if run.op == Op.SESSION_OPEN:
                sessions.unbind(run.session)
        st = self.staged.pop(vm, None)
        if st is not None:
            if st.prog.opcode == Op.SESSION_OPEN:
                sessions.unbind(st.prog.session)
            back.append(st.pending)
            self.scheduler.block(vm, False)
        self.scheduler.put_back(vm, back)
