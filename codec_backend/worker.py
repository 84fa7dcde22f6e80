"""A guest's codec worker process: maps only that guest's region and hostd's bank.

Started by hostd as ``python -m codec_backend.worker`` with the two fds passed.
An FFmpeg crash here kills this process only; hostd fails the running task
with WORKER_CRASHED and respawns the worker.

Mailbox protocol (bank words, see vmediad.abi):
  hostd: program a register file, store CTRL=ctrl_start(slot+1) (release), fence,
         then kick: fetch-add a kick word and futex-wake it only if its NEED_WAKEUP
         word is set.  A codec task kicks this worker's thread for that channel
         (channel_kick_offset); NOP/COPY/CRC32 kick the main loop (KICK[slot]),
         which runs them inline.  hostd skips the kick when another file of the
         channel is RUNNING: the worker looks for started files again when that one ends.
  worker: CAS CTRL ctrl_start(own slot+1)->RUNNING, execute, write result registers,
          store CTRL=DONE (release), fetch-add HOST_EVENT, futex-wake it only
          if BANK_HOST_NEED_WAKEUP is set; then fence and look for started files of
          that channel again, and run the oldest (lowest CH_SEQ) at once.
          After a codec task, the IRQ (HOST_EVENT) is skipped while BANK_IRQ_HOLDOFF
          or more other files of the channel are started: a later task's IRQ reports it.
The skip and the look after DONE are the two halves of a Dekker handshake: hostd
"store START; fence; load the other CTRLs", the worker "store DONE; fence; load CTRLs".
One of them sees the other's store, so a shadow program is never left unclaimed.

Order: a session's tasks must run in CH_SEQ order.  Per channel, claims are made
only under that channel's lock, always of the oldest started file, and a claimed
codec task runs on the channel's thread before that thread claims anything else
(the main loop hands one it claimed over, and kicks the thread like hostd does).
Both sleep sides use "store flag; seq-cst fence; re-check; futex_wait".  Before it
sleeps, an idle worker spins BANK_WORKER_SPIN pause iterations (hostd's word).

At start the worker checks the bank's BANK_VERSION word (abi.BANK_ABI_VERSION): on a
mismatch it prints one line and exits EXIT_BANK_MISMATCH, and runs nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Mapping

from vmediad._native._core import lib

from codec_backend.engine import Engine, Outcome
from vmediad import abi
from vmediad.abi import ChannelProgram, ChannelResult, Ctrl, ErrorCode, Op, WorkerLimits
from vmediad.errors import EXIT_CONFIG
from vmediad.shm import MappedRegion, fence

SLEEP_S = 1.0
EXIT_BANK_MISMATCH = EXIT_CONFIG  # hostd and this worker are from different releases: a restart cannot help
_INLINE_OPS = abi.SHORT_OPS
_CTRL_DONE = int(Ctrl.DONE)
_NO_TEXT = frozenset({int(ErrorCode.OK), int(ErrorCode.NO_SPACE)})  # outcomes that leave no reason
_SESSION_OPEN = int(Op.SESSION_OPEN)
_F_MULTI = abi.F_MULTI


class _Channel:
    """Worker-side state of one channel: its claim lock and its thread's doorbell words."""

    def __init__(self, kick: int, need_wakeup: int) -> None:
        self.lock = threading.Lock()
        self.kick = kick  # bank offset: bumped by hostd (codec task started) or the main loop
        self.need_wakeup = need_wakeup  # bank offset: 1 while the thread may sleep on kick
        self.handoff: int | None = None  # a codec file the main loop claimed for the thread


class Worker:
    def __init__(self, slot: int, channels: int, region: MappedRegion, bank: MappedRegion,
                 limits: WorkerLimits | Mapping[str, int], fault_injection: bool, parent: int) -> None:
        """``limits``: a WorkerLimits, or a mapping with ``WorkerLimits.to_json``'s keys."""
        self.slot = slot
        self.owner = slot + 1
        self._start_value = abi.ctrl_start(self.owner)
        self.channels = channels
        self.region = region
        self.bank = bank
        self.parent = parent
        if not isinstance(limits, WorkerLimits):
            limits = WorkerLimits.from_mapping(limits)
        self.engine = Engine(region.mem, limits, fault_injection=fault_injection)
        self._kick = abi.worker_kick_offset(slot)
        self._need_wakeup = abi.worker_need_wakeup_offset(slot)
        self._chans = [_Channel(abi.channel_kick_offset(channels, k, slot),
                                abi.channel_need_wakeup_offset(channels, k, slot)) for k in range(channels)]
        self._ctrl = [tuple(abi.channel_offset(k, f) + abi.CH_CTRL for f in range(abi.CH_FILES))
                      for k in range(channels)]
        # Per register file: (program, result, CTRL, config page) bank offsets.
        self._files = [[(abi.channel_offset(k, f) + abi.CH_PROGRAM, abi.channel_offset(k, f) + abi.CH_RESULT,
                         abi.channel_offset(k, f) + abi.CH_CTRL, abi.channel_config_offset(channels, k, f))
                        for f in range(abi.CH_FILES)] for k in range(channels)]
        # Channel threads serving codec tasks.  While one does, the main loop does not
        # spin for the next kick: it could not come before the task ends, and on a
        # small machine spinning takes CPU from the codec.
        self._busy = 0
        self._busy_lock = threading.Lock()
        self.irqs_held = 0  # codec tasks whose IRQ a later task's raised (BANK_IRQ_HOLDOFF)

    def run_file(self, k: int, f: int) -> None:
        bank = self.bank
        mem = bank.mem
        prog_off, result_off, ctrl_off, config_off = self._files[k][f]
        prog = ChannelProgram.unpack_from(mem, prog_off)
        config = b""
        if prog.opcode == _SESSION_OPEN or prog.flags & _F_MULTI:  # the page hostd filled
            config = bytes(mem[config_off : config_off + min(prog.config_len, abi.CONFIG_PAGE)])
        try:
            out = self.engine.run(prog, config)
        except Exception as e:  # a backend bug must fail the task, not the worker
            out = Outcome(error=ErrorCode.BACKEND, text=f"{type(e).__name__}: {e}")
        text = b"" if out.error in _NO_TEXT else abi.error_text_bytes(out.text)
        if text:
            # The file's config page was read above and hostd writes it only while the file
            # is IDLE: the reason goes there, published with the DONE store below.
            mem[config_off : config_off + len(text)] = text
        ChannelResult.write(mem, result_off, result=out.result, result_len=out.result_len, error=out.error,
                            text_len=len(text), copied=out.copied)
        bank.store32(ctrl_off, _CTRL_DONE)  # release: publishes the results above
        if prog.opcode not in _INLINE_OPS and (hold := bank.load32(abi.BANK_IRQ_HOLDOFF)):
            # Dekker with hostd's revocation "CAS START->IDLE; (next pass) load CTRLs": a
            # file seen started here is run by this thread before it sleeps, or was revoked
            # by a hostd that then sees this DONE.  Either way the result is not stranded.
            fence()
            if self._started(k) >= hold:
                self.irqs_held += 1
                return
        self.bank.kick(abi.BANK_HOST_EVENT, abi.BANK_HOST_NEED_WAKEUP)  # the IRQ

    def _claim(self, k: int, f: int) -> bool:
        # One CAS claims the file only if hostd started it for this worker.
        mine = self._start_value
        return self.bank.cas32(self._ctrl[k][f], mine, Ctrl.RUNNING) == mine

    def start_channel_threads(self) -> None:
        for k, chan in enumerate(self._chans):
            threading.Thread(target=self._channel_thread, args=(k, chan), daemon=True,
                             name=f"channel-{k}").start()

    def _ring(self, chan: _Channel) -> None:
        """The main loop's kick of a channel thread, the same handshake as hostd's."""
        self.bank.kick(chan.kick, chan.need_wakeup)

    def _serve(self, k: int, chan: _Channel, inline_only: bool) -> None:
        """Claim and run channel ``k``'s started files, oldest first, until none is left.

        The caller holds ``chan.lock``: it is the channel's only claimer.  With
        ``inline_only`` (the main loop) a codec task is claimed and handed to the
        channel thread, which runs it before it claims anything else."""
        while (f := self._oldest_started(k)) is not None:
            if inline_only and chan.handoff is not None:
                self._ring(chan)  # the thread has not taken the last hand-off yet
                return
            if not self._claim(k, f):
                continue  # hostd revoked it (START -> IDLE): look again
            if inline_only and self.bank.load32(abi.channel_offset(k, f) + abi.CH_PROGRAM) not in _INLINE_OPS:
                chan.handoff = f
                # Busy from the hand-off on, not from when the thread gets scheduled:
                # otherwise the main loop would spin in between, on the codec's CPU.
                with self._busy_lock:
                    self._busy += 1
                self._ring(chan)
                return
            self.run_file(k, f)
            fence()  # Dekker with hostd's "store START; fence; load the other files' CTRLs"

    def _channel_thread(self, k: int, chan: _Channel) -> None:
        bank = self.bank
        while True:
            seen = bank.load32(chan.kick)
            self._serve_thread(k, chan)
            # A kick that came while serving already changed the word: no sleep then.
            bank.sleep_on(chan.kick, chan.need_wakeup, seen, SLEEP_S)

    def _serve_thread(self, k: int, chan: _Channel) -> None:
        with chan.lock:
            f, chan.handoff = chan.handoff, None
            if f is None:  # a hand-off was counted busy by the main loop already
                with self._busy_lock:
                    self._busy += 1
            try:
                if f is not None:
                    self.run_file(k, f)
                    fence()
                self._serve(k, chan, inline_only=False)
            finally:
                with self._busy_lock:
                    self._busy -= 1

    def _started(self, k: int) -> int:
        mine = self._start_value
        return sum(1 for c in self._ctrl[k] if self.bank.load32(c) == mine)

    def _oldest_started(self, k: int) -> int | None:
        """The file of channel ``k`` started for us with the lowest CH_SEQ, if any.

        Files not started at the first look are looked at again once one was seen
        started: hostd stores START in CH_SEQ order, so once a file is seen started
        (acquire), every older start is visible to a later load.  (A start newer than
        all seen may still be missed; it is not the oldest.)"""
        mine = self._start_value
        load32 = self.bank.load32
        ctrl = self._ctrl[k]
        started = [load32(c) == mine for c in ctrl]
        if not any(started):
            return None
        if not all(started):
            started = [s or load32(c) == mine for s, c in zip(started, ctrl, strict=True)]
        seq = abi.CH_SEQ - abi.CH_CTRL
        best, best_seq = -1, 0
        for f, s in enumerate(started):
            if s:
                q = self.bank.load64(ctrl[f] + seq)
                if best < 0 or q < best_seq:
                    best, best_seq = f, q
        return best

    def scan(self) -> None:
        for k, chan in enumerate(self._chans):
            if chan.lock.acquire(blocking=False):
                try:
                    self._serve(k, chan, inline_only=True)
                finally:
                    chan.lock.release()
            elif self._oldest_started(k) is not None:
                # The channel thread holds it: it serves the channel again before it
                # sleeps; the kick covers the moment it has just looked and not yet let go.
                self._ring(chan)

    def loop(self) -> None:
        while True:
            seen = self.bank.load32(self._kick)
            self.scan()
            if not self._busy and (spins := self.bank.load32(abi.BANK_WORKER_SPIN)) \
                    and self.bank.spin32(self._kick, seen, spins) != seen:
                continue
            self.bank.sleep_on(self._kick, self._need_wakeup, seen, SLEEP_S)
            if os.getppid() != self.parent:
                return  # hostd is gone; PDEATHSIG normally got here first


def bank_mismatch(bank: MappedRegion) -> str | None:
    """Why this worker must not run on ``bank`` (another host-internal ABI), or None."""
    found = bank.load32(abi.BANK_VERSION)
    if found == abi.BANK_ABI_VERSION:
        return None
    return (f"vmediad-worker: register bank version {found}, this worker speaks {abi.BANK_ABI_VERSION} "
            "(hostd and codec_backend are from different releases)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmediad-worker")
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--vm", type=int, required=True)
    p.add_argument("--region-fd", type=int, required=True)
    p.add_argument("--region-size", type=int, required=True)
    p.add_argument("--bank-fd", type=int, required=True)
    p.add_argument("--channels", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--limits", default="{}")
    p.add_argument("--fault-injection", action="store_true")
    a = p.parse_args(argv)
    lib.vm_set_pdeathsig(signal.SIGKILL)
    if os.getppid() != a.parent:
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is hostd's to handle
    region = MappedRegion(a.region_fd, a.region_size)
    bank = MappedRegion(a.bank_fd, abi.bank_size(a.channels))
    os.close(a.region_fd)
    os.close(a.bank_fd)
    if (why := bank_mismatch(bank)) is not None:
        print(why, file=sys.stderr)
        return EXIT_BANK_MISMATCH
    try:
        limits = WorkerLimits.from_json(a.limits)
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        print(f"vmediad-worker: bad --limits {a.limits!r}: {e}", file=sys.stderr)
        return 2
    w = Worker(a.slot, a.channels, region, bank, limits, a.fault_injection, a.parent)
    w.start_channel_threads()
    w.loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
