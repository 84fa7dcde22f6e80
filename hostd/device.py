"""The emulated device: the device thread, guests attaching and leaving, workers, stop.

``Device`` is what the rest of hostd talks to (``attach``, ``detach``, ``post``,
``statistics``, ``request_stop``).  The per-task path it runs is hostd/loop.py; the
decisions are hostd/core/'s.  One thread (the device thread) owns every piece of device
state; the control connections, worker reapers, respawn timers and ``statistics()``
callers reach it through ``post()``.
"""

from __future__ import annotations

import os
import queue
import secrets
import signal
import threading
import time
from collections import deque
from typing import Any

from hostd import stats
from hostd.config import Config
from hostd.core.lifecycle import EARLY_DEATHS_FAIL, Life, LifeEvent, respawn_delay
from hostd.core.ring import Ring
from hostd.core.sessions import Sessions
from hostd.guest import AttachRequest, Guest, RunState, log
from hostd.loop import U32, Loop
from hostd.regions import adopt_region, create_region
from hostd.stats import Totals
from hostd.workers import WorkerHandle, spawn_worker
from vmediad import abi, ivshmem
from vmediad.abi import Ctrl, ErrorCode, Status
from vmediad.errors import GuestFault, InternalError
from vmediad.shm import monotonic_ns

__all__ = ["AttachRequest", "Device", "Guest", "RunState"]


class Device(Loop):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.epoch = secrets.randbits(63) | 1
        self.started_ns = monotonic_ns()
        self.caps = int(abi.Caps.FUTEX | abi.Caps.POLL | abi.Caps.CODEC | abi.Caps.MULTI | abi.Caps.FRAME_POOL
                        | abi.Caps.ERROR_TEXT
                        | (abi.Caps.NAMED_REGION if cfg.named_regions else 0))
        self.worker_limits = abi.WorkerLimits(self.limits, cfg.max_sessions_per_guest)
        self._totals = Totals()  # counters of guests gone (live guests' are added per snapshot)
        self._departed: deque[tuple[int, dict[str, Any]]] = deque()  # (monotonic ns, snapshot)
        self._next_vm = 1
        self._free_slots = list(range(min(cfg.max_guests, abi.BANK_MAX_WORKERS)))[::-1]
        self._stop_deadline = 0
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None
        self.stopped = threading.Event()

    # -- threads ------------------------------------------------------------------------------
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

    def request_stop(self) -> None:
        self.post(self._begin_stop)

    def join(self, timeout: float | None = None) -> bool:
        return self.stopped.wait(timeout)

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
            # A busy pass is followed by another: going idle at once unless _ready() saw new
            # work saved passes but not hostd's CPU, and made the flood test's p99 worse.
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
            # CPU more than hostd needs to react a few microseconds sooner.  (Spinning with
            # sched_yield() while codec threads saturate the CPUs leaves this thread at the
            # back of the run queue: on 2 cores it then noticed a finished task ~0.6 ms
            # late, where a futex wake-up takes ~30 us.)
            elif now - idle_since < spin_ns and self._last_short and not self.core.codec_busy():
                os.sched_yield()
            else:
                self._sleep()
                idle_since = 0
        self.state = RunState.STOPPED

    # -- control-plane entry points (called from other threads) -------------------------------
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

    # -- attach -------------------------------------------------------------------------------
    def _do_attach(self, req: AttachRequest) -> None:
        try:
            if self.state != RunState.RUNNING:
                raise GuestFault(ErrorCode.DEVICE_GONE, "hostd is stopping")
            if not self._free_slots:
                raise GuestFault(ErrorCode.BUSY, f"max_guests ({self.cfg.max_guests}) reached")
            vm_id = self._next_vm
            cfg = self.cfg
            adopted = req.adopt_fd is not None
            if req.adopt_fd is not None:
                # The fd and everything in it come from the guest: the same limits as a
                # fresh attach apply (a forged 2^31-slot ring would stall this thread).
                region = adopt_region(req.adopt_fd, vm_id, self.caps, self.epoch,
                                      sizes=(cfg.region_min, cfg.region_max), rings=(cfg.ring_min, cfg.ring_max))
            elif req.transport == "ivshmem":
                # No futex reaches into a VM: the guest polls, hostd is woken by its eventfd.
                caps = self.caps & ~int(abi.Caps.FUTEX | abi.Caps.NAMED_REGION) | ivshmem.CAP_IVSHMEM
                region = create_region(vm_id, req.region_size, req.ring_entries, caps, self.epoch)
            else:
                region = create_region(vm_id, req.region_size, req.ring_entries, self.caps, self.epoch,
                                       named=req.named)
            self._next_vm += 1
            g = Guest(vm_id, req.name, req.pid, req.uid, region, self._free_slots.pop(),
                      Ring(region.layout.ring_entries),
                      Sessions(self.session_ids, cfg.max_sessions_per_guest, adopted),
                      adopted=adopted, weight=cfg.weight_of(req.name), attached_ns=monotonic_ns())
            if req.transport == "ivshmem":
                g.kind, g.transport = "qemu", "ivshmem"
                # Duplicated here, on the thread that owns the region: a kill posted right
                # after this attach may close region.fd before the caller sends it to QEMU.
                req.region_fd = os.dup(region.fd)
                g.irq_fd, req.irq_fd = req.irq_fd, -1  # now the guest's: closed at its reclaim
            try:
                region.mapped.store64(abi.REG_HEARTBEAT, monotonic_ns())
                rerun = self._readopt(g) if adopted else []
                self._spawn(g)
            except BaseException:
                self._free_slots.append(g.slot)
                if g.irq_fd >= 0:
                    os.close(g.irq_fd)
                if req.region_fd is not None:
                    os.close(req.region_fd)
                    req.region_fd = None
                if adopted:
                    region.fd = -1  # the control connection still owns (and closes) the adopted fd
                region.close()
                raise
            self.guests[vm_id] = g
            self.scheduler.add_vm(vm_id, g.weight)
            self.display.attach(vm_id, g.name, region.mapped.mem, region.layout.heap_offset,
                                region.layout.region_size)
            for slot in rerun:
                self.scheduler.arrive(vm_id, slot)
            req.guest = g
            g.log.info("guest attached", pid=req.pid, uid=req.uid, region_size=region.layout.region_size,
                       ring=region.layout.ring_entries, named=region.name is not None,
                       adopted=adopted, requeued=len(rerun), transport=g.transport)
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
        g.ring.head = reg.load32(abi.REG_SQ_HEAD)
        n = g.ring.unread(reg.load32(abi.REG_SQ_TAIL))
        unread = {reg.load32(layout.sq_entry(g.ring.head + i)) for i in range(n)}
        reg.store32(abi.REG_RING_ERROR, 0)
        rerun: list[int] = []
        for slot in range(layout.ring_entries):
            if slot in unread or reg.load32(layout.desc(slot) + abi.D_STATUS) != Status.SUBMITTED:
                continue
            at = layout.desc(slot) + abi.D_INPUT
            desc = abi.Descriptor.unpack(bytes(reg.mem[at : at + abi.DESC_INPUT.size]))
            if desc.opcode in abi.SESSION_OPS or desc.opcode == abi.Op.DISPLAY_COMMIT:  # outputs died too
                self._complete(g, slot, ErrorCode.SESSION_LOST, 0, 0, U32, 0, op=desc.opcode,
                               submit_ns=0, counted=True)
            else:
                g.held_slots.add(slot)
                g.arrival_ns[slot] = monotonic_ns()
                rerun.append(slot)
        return rerun

    # -- workers ------------------------------------------------------------------------------
    def _spawn(self, g: Guest) -> None:
        g.generation += 1
        gen = g.generation
        respawn = g.vm_id in self.guests  # (not on attach)

        def on_exit(h: WorkerHandle, rc: int) -> None:
            self.post(lambda: self._worker_exited(g.vm_id, gen, rc))

        g.worker = spawn_worker(
            slot=g.slot, vm_id=g.vm_id, generation=gen, region_fd=g.region.fd,
            region_size=g.region.layout.region_size, bank_fd=self.bank_fd, channels=self.channels_n,
            limits=self.worker_limits, fault_injection=self.cfg.fault_injection, started_ns=monotonic_ns(),
            on_exit=on_exit,
        )
        g.life.fire(LifeEvent.SPAWNED)
        g.worker_tasks = 0
        if respawn:
            # The queue was held while there was no worker; a staged task still holds it.
            self.scheduler.block(g.vm_id, g.vm_id in self.core.staged)
            self.events.emit("restart", vm=g.vm_id, name=g.name, generation=gen)

    def _worker_exited(self, vm_id: int, generation: int, rc: int) -> None:
        g = self.guests.get(vm_id)
        if g is None or generation != g.generation:
            return
        self._collect_irqs()  # results the worker posted before it died still count
        held = self.core.files_of(vm_id)
        if g.life.dying:
            for rf in held:
                self._retire(rf, ErrorCode.DEVICE_GONE)
            self._reclaim(g)
            return
        was = g.life.state
        g.life.fire(LifeEvent.WORKER_EXITED)
        timed_out = was is Life.TIMING_OUT
        recycled = was is Life.RECYCLING
        # The worker is reaped, so CTRL can no longer change under us.  A channel still at
        # START was programmed after the worker died (or while it was being recycled) and
        # never ran: its task goes back to the queue.  Only claimed tasks crashed with it.
        claimed = []
        for rf in held:
            if abi.ctrl_is_start(self.bank.load32(rf.offset + abi.CH_CTRL)):
                self.bank.store32(rf.offset + abi.CH_CTRL, Ctrl.IDLE)
                self.core.requeue(rf, g.sessions)
            else:
                claimed.append(rf)
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
        g.sessions.lose_all()
        st = self.core.staged.get(vm_id)
        if st is not None and st.prog.session in g.sessions.lost:
            self.core.unstage(vm_id)
            self._fail(g, st.pending.slot, 0, ErrorCode.SESSION_LOST, op=st.prog.opcode)
        g.recycles += recycled
        if not recycled:
            g.stats.worker_restarts += 1
            g.log.warning("worker killed by the watchdog; respawning" if timed_out else "worker died; respawning",
                          rc=rc, failed_tasks=len(claimed), requeued=len(held) - len(claimed),
                          lost_sessions=len(g.sessions.lost))
            if not timed_out:
                self.events.emit("worker_crash", vm=g.vm_id, name=g.name, rc=rc)
        # A worker that dies before it ran anything (it cannot map the region, the host
        # is out of memory or fds) would die again at once: back off instead of spinning.
        # A crash on a task is respawned at once; its cost is paid per guest task.
        early = not recycled and not claimed and g.worker_tasks == 0
        g.early_deaths = g.early_deaths + 1 if early else 0
        if self.state != RunState.RUNNING:
            return
        if g.early_deaths >= EARLY_DEATHS_FAIL:
            self._fail_waiting(g, crash)
        delay = respawn_delay(g.early_deaths)
        if not delay:
            self._spawn(g)
            return
        g.log.warning("worker keeps dying before running a task; backing off", delay_s=delay)
        g.life.fire(LifeEvent.BACK_OFF)
        self.scheduler.block(g.vm_id, True)

        def respawn() -> None:
            # On the device thread: PDEATHSIG follows the thread that forks the worker.
            if self.guests.get(g.vm_id) is g and g.life.state is Life.BACKING_OFF \
                    and g.generation == generation and self.state == RunState.RUNNING:
                self._spawn(g)

        timer = threading.Timer(delay, lambda: self.post(respawn))
        timer.daemon = True
        timer.start()

    def _fail_waiting(self, g: Guest, crash: str) -> None:
        """No worker starts for ``g``: its staged and queued tasks end WORKER_CRASHED now instead
        of waiting for one that may never run a task."""
        st = self.core.unstage(g.vm_id)
        if st is not None:
            self._fail(g, st.pending.slot, 0, ErrorCode.WORKER_CRASHED, op=st.prog.opcode)
        waiting = self.scheduler.take_queued(g.vm_id)
        for p in waiting:
            self._complete(g, p.slot, ErrorCode.WORKER_CRASHED, 0, 0, U32, 0, op=0,
                           submit_ns=g.arrival_ns.get(p.slot, 0), counted=True)
        g.log.error("no worker starts for this guest; its waiting tasks fail", early_deaths=g.early_deaths,
                    last=crash, failed=len(waiting) + (st is not None))

    # -- detach -------------------------------------------------------------------------------
    def _do_detach(self, vm_id: int, reason: str) -> None:
        g = self.guests.get(vm_id)
        if g is None or g.life.dying:
            return
        g.life.fire(LifeEvent.DETACH)
        g.log.info("guest detaching", reason=reason)
        self.events.emit("detach", vm=g.vm_id, name=g.name, reason=reason)
        # Its viewport is labelled from the next composition ("detach" is the guest's own
        # request; any other reason means it died or was killed).
        self.display.detach(g.vm_id, monotonic_ns(), died=reason != "detach")
        self._drop_queued(g)
        if g.worker is not None and not g.worker.exited.is_set():
            g.worker.kill()  # its reaper posts _worker_exited, which reclaims
        else:
            self._reclaim(g)

    def _drop_queued(self, g: Guest) -> None:
        """The guest leaves the scheduler: its queued and staged tasks end DEVICE_GONE."""
        dropped = self.scheduler.remove_vm(g.vm_id)
        st = self.core.unstage(g.vm_id)
        if st is not None:
            dropped.append(st.pending)
        for p in dropped:
            self._complete(g, p.slot, ErrorCode.DEVICE_GONE, 0, 0, U32, 0, op=0, submit_ns=0, counted=True)

    def _reclaim(self, g: Guest) -> None:
        for rf in self.core.drop(g.vm_id):
            self.bank.store32(rf.offset + abi.CH_CTRL, Ctrl.IDLE)
        g.sessions.clear()
        self.scheduler.remove_vm(g.vm_id)
        g.life.fire(LifeEvent.RECLAIMED)
        if self.guests.pop(g.vm_id, None) is not None:
            # Its counters go on in the device-wide totals, and its last snapshot stays
            # listed (statistics()["departed"]) for cfg.metrics_grace_s.
            now = monotonic_ns()
            self._totals.add(g.stats)
            entry = stats.vm_snapshot(g, now, {}, staged=False)
            entry.update(worker_pid=None, worker_rss=0, detached_at=round(time.time(), 3))
            self._departed.append((now, entry))
            self._prune_departed(now)
        self._free_slots.append(g.slot)
        self.display.detach(g.vm_id, monotonic_ns(), died=True)  # a no-op after _do_detach's
        self.display.close_region(g.vm_id, g.region.close)  # later, if a composition reads it
        if g.irq_fd >= 0:
            os.close(g.irq_fd)
            g.irq_fd = -1
        g.log.info("guest reclaimed")

    # -- stop ---------------------------------------------------------------------------------
    def _begin_stop(self) -> None:
        if self.state != RunState.RUNNING:
            return
        log.info("device stopping", grace_s=self.cfg.shutdown_grace_s)
        self.state = RunState.STOPPING
        self._stop_deadline = monotonic_ns() + int(self.cfg.shutdown_grace_s * 1e9)
        for g in self.guests.values():
            g.region.mapped.store32(abi.REG_DEVICE_STATE, abi.DeviceState.STOPPING)

    def _try_finish_stop(self) -> bool:
        running = self.core.loaded_files()
        if running and monotonic_ns() < self._stop_deadline:
            return False
        for rf in running:
            self._retire(rf, ErrorCode.DEVICE_GONE)
        self.display.fail_all(ErrorCode.DEVICE_GONE)
        for g in list(self.guests.values()):
            self._drop_queued(g)
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
        n = g.ring.unread(reg.load32(abi.REG_SQ_TAIL))
        for _ in range(n):
            slot = reg.load32(layout.sq_entry(g.ring.head))
            g.ring.head = (g.ring.head + 1) & U32
            if slot < layout.ring_entries and slot not in g.held_slots:
                self._complete(g, slot, ErrorCode.DEVICE_GONE, 0, 0, U32, 0, op=0, submit_ns=0, counted=True)
        if n >= 0:
            reg.store32(abi.REG_SQ_HEAD, g.ring.head)

    def close(self) -> None:
        """Free everything; call after the device thread stopped (join)."""
        if self._thread is not None and self._thread.is_alive():
            # Wedged: unmapping under it would crash the process; leak instead.
            log.error("device thread still running at close; regions and bank left mapped")
            return
        while True:  # posts never run (a compositor's deliver) may hold views of regions
            try:
                self._events.get_nowait()
            except queue.Empty:
                break
        self.display.release_all()
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

    # -- statistics ---------------------------------------------------------------------------
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

    def _prune_departed(self, now: int) -> None:
        grace_ns = self.cfg.metrics_grace_s * 1e9
        while self._departed and now - self._departed[0][0] >= grace_ns:
            self._departed.popleft()

    def _statistics(self) -> dict[str, Any]:
        now = monotonic_ns()
        sched = self.scheduler.statistics()
        sched_vms: dict[int, dict[str, Any]] = sched["vms"]  # type: ignore[assignment]
        guests = list(self.guests.values())
        vms = [stats.vm_snapshot(g, now, sched_vms.get(g.vm_id, {}), g.vm_id in self.core.staged) for g in guests]
        grace_ns = self.cfg.metrics_grace_s * 1e9
        return {
            "state": self.state.value,
            "epoch": self.epoch,
            "uptime_s": round((now - self.started_ns) / 1e9, 3),
            "policy": self.scheduler.policy.name,
            "cap": self.scheduler.cap,
            "channels": [stats.channel_snapshot(c, now) for c in self.channels],
            "guests": len(vms),
            "vms": vms,
            # Counters that only grow: the guests gone plus the guests here.
            "totals": self._totals.snapshot(g.stats for g in guests),
            "departed": [entry for t, entry in self._departed if now - t < grace_ns],
            "loop": {"iterations": self._loop_iterations, "sleeps": self._sleeps, "wakes_sent": self._wakes_sent,
                     "kicks_saved": self._kicks_saved, "shadow_revokes": self.core.shadow_revokes,
                     "worker_spins": self._worker_spins, "irq_holdoff": self.cfg.worker_irq_holdoff,
                     "collects": self._collects, "files_retired": self._files_retired},
        }
