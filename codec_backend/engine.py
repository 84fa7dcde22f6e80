"""Execute one channel's register file against one guest region.

The engine reads only its registers (design D1, docs/architecture.md): the program block hostd wrote,
and for SESSION_OPEN the config page hostd filled with the copy it validated.
Buffers named by the registers were range-checked by hostd against this
guest's heap, but their contents are hostile.
"""

from __future__ import annotations

import signal
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from codec_backend.inputs import Input
from vmediad import abi
from vmediad.abi import ChannelProgram, ErrorCode, GeometryLimits, MultiList, Op, WorkerLimits

if TYPE_CHECKING:
    from codec_backend.av_sessions import SessionManager

# With fault injection enabled (tests only), a source buffer starting with this
# marker makes the worker die of a real SIGSEGV, as a crashing codec would.
CRASH_MARKER = b"\xde\xadVMEDIAD-SEGV\x00"
# ... and one starting with this marker parks the task: the worker stores HANG_RUNNING in the
# u32 at HANG_STATE and polls it until the guest stores HANG_RELEASE there, then runs the task
# as usual.  A test sees the task running and can stop (SIGSTOP) or hold the worker at will.
HANG_MARKER = b"\xde\xadVMEDIAD-HANG\x00"
HANG_STATE = 16
HANG_RUNNING = 1
HANG_RELEASE = 2


@dataclass(frozen=True, slots=True)
class Outcome:
    result: int = 0
    result_len: int = 0
    error: int = ErrorCode.OK
    copied: int = 0
    text: str = ""  # why the task failed (FFmpeg's message where there is one)


_DONE = Outcome()  # NOP's (built once: the short ops' path is per task)


class Engine:
    def __init__(self, mem: memoryview, limits: WorkerLimits, *, fault_injection: bool = False) -> None:
        self.mem = mem
        self.limits = limits
        self.fault_injection = fault_injection
        self._sessions: SessionManager | None = None
        self._copied_seen = 0

    @property
    def sessions(self) -> SessionManager:
        if self._sessions is None:
            # PyAV is imported on first codec use so a worker respawns fast.
            from codec_backend.av_sessions import SessionManager

            self._sessions = SessionManager(self.limits.geometry, max_sessions=self.limits.max_sessions)
        return self._sessions

    def geometry(self) -> GeometryLimits:
        return self.limits.geometry

    def _copied_delta(self) -> int:
        """Bytes the codec sessions copied since the last call (per-task accounting)."""
        if self._sessions is None:
            return 0
        total = self._sessions.bytes_copied()
        delta, self._copied_seen = total - self._copied_seen, total
        return delta

    def _maybe_crash(self, off: int, length: int) -> None:
        if self.fault_injection and length >= len(CRASH_MARKER):
            if bytes(self.mem[off : off + len(CRASH_MARKER)]) == CRASH_MARKER:
                # Thread-directed, as a real fault is: the thread running the
                # task dies at once and never posts a result.  (os.kill would let
                # the kernel pick the main thread and this task finish first.)
                signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
            if bytes(self.mem[off : off + len(HANG_MARKER)]) == HANG_MARKER and length >= HANG_STATE + 4:
                struct.pack_into("<I", self.mem, off + HANG_STATE, HANG_RUNNING)
                while struct.unpack_from("<I", self.mem, off + HANG_STATE)[0] != HANG_RELEASE:
                    time.sleep(0.001)

    def run(self, prog: ChannelProgram, config: bytes) -> Outcome:
        """Run the program of one register file; ``config``: the file's config page (the
        SESSION_OPEN config or the MULTI list hostd copied), else empty."""
        opcode = prog.opcode
        if opcode == Op.NOP:
            return _DONE
        src_off, src_len = prog.src_off, prog.src_len
        if opcode == Op.COPY or opcode == Op.CRC32:
            if self.fault_injection:
                self._maybe_crash(src_off, src_len)
            if opcode == Op.CRC32:
                return Outcome(result=zlib.crc32(self.mem[src_off : src_off + src_len]), result_len=src_len)
            # memoryview slice assignment is a memmove; hostd rejected overlap anyway.
            self.mem[prog.dst_off : prog.dst_off + src_len] = self.mem[src_off : src_off + src_len]
            return Outcome(result_len=src_len, copied=src_len)
        flags = prog.flags
        pts = abi.as_i64(prog.arg0) if flags & abi.F_PTS_VALID else None
        inputs = _inputs(flags, config, src_off, src_len, pts)
        if self.fault_injection and (opcode == Op.ENCODE_FRAME or opcode == Op.DECODE):
            for inp in inputs:
                self._maybe_crash(inp.offset, inp.length)
        return self._codec(Op(opcode), prog, config, inputs)

    def _codec(self, op: Op, prog: ChannelProgram, config: bytes, inputs: list[Input]) -> Outcome:
        from codec_backend.av_sessions import CodecError, write_caps

        sm = self.sessions
        self._copied_delta()
        flags, session, dst_off, dst_len = prog.flags, prog.session, prog.dst_off, prog.dst_len
        drain = bool(flags & abi.F_DRAIN_PENDING)
        try:
            if op == Op.CAPS:
                count, used = write_caps(self.mem, dst_off, dst_len, self.geometry())
            elif op == Op.SESSION_OPEN:
                cfg = abi.SessionConfig.unpack(config)
                # Without FRAME_POOL a dst of up to ERROR_RECORD_SIZE bytes only takes an error
                # record (hostd writes it); a larger one is a pool without the flag (BAD_ARG).
                pool = (dst_off, dst_len)
                if not cfg.flags & abi.SessionFlag.FRAME_POOL and dst_len <= abi.ERROR_RECORD_SIZE:
                    pool = (0, 0)
                sm.open(session, cfg, self.mem, pool)
                return Outcome(result=session)
            elif op == Op.SESSION_CLOSE:
                sm.close(session)
                return Outcome(result=session)
            elif op == Op.ENCODE_FRAME:
                strides = (prog.arg1 & 0xFFFFFFFF, prog.arg1 >> 32, prog.arg2 & 0xFFFFFFFF)
                count, used = sm.encode(session, self.mem, inputs, strides, drain, dst_off, dst_len)
            elif op == Op.DECODE:
                count, used = sm.decode(session, self.mem, inputs, bool(flags & abi.F_PARSE), drain,
                                        dst_off, dst_len)
            elif op == Op.FLUSH:
                count, used = sm.flush(session, self.mem, dst_off, dst_len)
            else:  # pragma: no cover - validate.check() admits only the ops above
                return Outcome(error=ErrorCode.BAD_OPCODE)
        except CodecError as e:
            # The backend's verdict names its code: a guest's fault (BAD_ARG, NO_SPACE, ...) or a
            # backend failure.  Anything else raised here is a bug: the worker's boundary turns it
            # into BACKEND with its reason, never into the guest's fault.
            return Outcome(result_len=e.required, error=e.code, copied=self._copied_delta(), text=str(e))
        return Outcome(result=count, result_len=used, copied=self._copied_delta())

    def statistics(self) -> dict[str, object]:
        return {} if self._sessions is None else self._sessions.statistics()

    def close(self) -> None:
        if self._sessions is not None:
            self._sessions.close_all()


def _inputs(flags: int, config: bytes, src_off: int, src_len: int, pts: int | None) -> list[Input]:
    """The task's inputs: the MULTI list hostd checked (from the config page), or its one src."""
    if flags & abi.F_MULTI:
        lst = MultiList.unpack(config)
        valid, key = abi.F_PTS_VALID, abi.F_FORCE_KEYFRAME
        return [Input(off, length, p if f & valid else None, bool(f & key))
                for off, length, p, f in zip(lst.offset, lst.length, lst.pts, lst.flags, strict=True)]
    return [Input(src_off, src_len, pts, bool(flags & abi.F_FORCE_KEYFRAME))]

