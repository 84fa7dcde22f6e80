"""Descriptor validation: pure, on the single copy hostd took of a descriptor.

``check(desc, layout)`` returns either a ``Program`` (what hostd will
load into a channel's register file) or the ``ErrorCode`` the task ends with.
Buffers must lie inside the heap, so no task can touch the register page, the
ring or the descriptor table; all range arithmetic is overflow-proof u64.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmediad import abi
from vmediad.abi import Descriptor, ErrorCode, Layout, Op

MAX_CONFIG_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Program:
    opcode: Op
    flags: int
    session: int
    src_off: int
    src_len: int
    dst_off: int
    dst_len: int
    arg0: int
    arg1: int
    arg2: int
    arg3: int


# Which buffers each op reads (src) and writes (dst).
_USES: dict[Op, tuple[bool, bool]] = {
    Op.NOP: (False, False),
    Op.COPY: (True, True),
    Op.CRC32: (True, False),
    Op.CAPS: (False, True),
    Op.SESSION_OPEN: (True, True),  # dst: the frame pool, if any (may be empty)
    Op.ENCODE_FRAME: (True, True),
    Op.DECODE: (True, True),
    Op.FLUSH: (False, True),
    Op.SESSION_CLOSE: (False, False),
    Op.DISPLAY_OPEN: (True, True),  # dst: the arena lent for the output's buffers
    Op.DISPLAY_COMMIT: (True, True),  # dst: the flip record
    Op.DISPLAY_CLOSE: (False, False),
}
# Ops whose src may be empty (DRAIN_PENDING retries consume no input).
_EMPTY_SRC_OK = frozenset({Op.ENCODE_FRAME, Op.DECODE, Op.COPY, Op.CRC32})


def check(desc: Descriptor, layout: Layout) -> Program | ErrorCode:
    try:
        op = Op(desc.opcode)
    except ValueError:
        return ErrorCode.BAD_OPCODE
    if desc.flags & ~abi.DESC_FLAGS_MASK:
        return ErrorCode.BAD_FLAGS
    lo, hi = layout.heap_offset, layout.region_size
    uses_src, uses_dst = _USES[op]
    if uses_src and not (desc.src_len == 0 and op in _EMPTY_SRC_OK):
        err = abi.range_ok(desc.src_off, desc.src_len, lo, hi)
        if err:
            return err
    if uses_dst and not (op == Op.SESSION_OPEN and desc.dst_len == 0):
        err = abi.range_ok(desc.dst_off, desc.dst_len, lo, hi)
        if err:
            return err
    if op == Op.COPY:
        if desc.dst_len < desc.src_len:
            return ErrorCode.NO_SPACE
        if abi.ranges_overlap(desc.src_off, desc.src_len, desc.dst_off, desc.src_len):
            return ErrorCode.OVERLAP
    if op == Op.SESSION_OPEN and not abi.SESSION_CONFIG.size <= desc.src_len <= MAX_CONFIG_BYTES:
        return ErrorCode.BAD_ARG
    if op in (Op.ENCODE_FRAME, Op.DECODE) and desc.src_len == 0 and not (
        desc.flags & abi.F_DRAIN_PENDING
    ):
        return ErrorCode.BAD_ARG
    if op == Op.DISPLAY_OPEN and (desc.src_len != abi.DISPLAY_OPEN.size or desc.dst_len < abi.DISPLAY_REPLY_MAX):
        return ErrorCode.BAD_ARG
    if op == Op.DISPLAY_COMMIT:
        if not abi.DISPLAY_COMMIT_FIXED <= desc.src_len <= abi.DISPLAY_COMMIT_MAX:
            return ErrorCode.BAD_ARG
        if desc.dst_len < abi.DISPLAY_FLIP.size:
            return ErrorCode.NO_SPACE
    if desc.flags & abi.F_MULTI:
        if op not in (Op.ENCODE_FRAME, Op.DECODE) or desc.flags & abi.F_DRAIN_PENDING:
            return ErrorCode.BAD_FLAGS
        n, rest = divmod(desc.src_len, abi.MULTI_ENTRY.size)
        if rest or not 1 <= n <= abi.MULTI_MAX:
            return ErrorCode.BAD_ARG
    return Program(
        op, desc.flags, desc.session, desc.src_off, desc.src_len, desc.dst_off, desc.dst_len,
        desc.arg0, desc.arg1, desc.arg2, desc.arg3,
    )


def check_multi(raw: bytes, op: Op, layout: Layout) -> bytes | ErrorCode:
    """Validate the MULTI entry list hostd copied out of the region (``check`` sized it).

    Every input must lie in the heap, as a single task's src must; a chunk may not be
    empty (that is a drain, which takes no list).  Returns the list the worker will read."""
    allowed = abi.MULTI_ENTRY_FLAGS if op == Op.ENCODE_FRAME else abi.F_PTS_VALID
    lo, hi = layout.heap_offset, layout.region_size
    for off, length, _pts, flags, reserved in abi.MULTI_ENTRY.iter_unpack(raw):
        if flags & ~allowed:
            return ErrorCode.BAD_FLAGS
        if reserved or length == 0:
            return ErrorCode.BAD_ARG
        err = abi.range_ok(off, length, lo, hi)
        if err:
            return err
    return raw


def check_session_config(raw: bytes, limits: abi.GeometryLimits) -> abi.SessionConfig | ErrorCode:
    """Validate a SESSION_OPEN config hostd copied out of the region (abi.session_config_problem)."""
    try:
        cfg = abi.SessionConfig.unpack(raw)
    except (ValueError, UnicodeDecodeError):
        return ErrorCode.BAD_ARG
    problem = abi.session_config_problem(cfg, limits)
    return cfg if problem is None else problem[0]
