"""A worker claims a channel only if hostd started it for that worker (one CAS, no window)."""

from __future__ import annotations

import os
import zlib

from codec_backend.worker import Worker
from vmediad import abi
from vmediad.abi import Ctrl, Op
from vmediad.shm import MappedRegion, create_memfd


def _setup(channels: int = 2) -> tuple[MappedRegion, MappedRegion, list[int]]:
    rfd = create_memfd("t-region", 1 << 20)
    bfd = create_memfd("t-bank", abi.bank_size(channels))
    return MappedRegion(rfd, 1 << 20), MappedRegion(bfd, abi.bank_size(channels)), [rfd, bfd]


def test_stale_owner_register_cannot_make_a_worker_run_another_guests_task() -> None:
    region, bank, fds = _setup()
    try:
        limits = {"max_width": 64, "max_height": 64, "max_pixels": 4096, "max_sessions": 1}
        me = Worker(0, 2, region, bank, limits, False, os.getppid())
        data = b"belongs to this guest"
        region.mem[8192 : 8192 + len(data)] = data
        ch = abi.channel_offset(1)
        abi.CH_PROGRAM_STRUCT.pack_into(bank.mem, ch + abi.CH_PROGRAM, Op.CRC32, 0, 0, 0, 8192, len(data),
                                        0, 0, 0, 0, 0, 0)
        # The race: CH_OWNER still names worker 1 (from its last task) while hostd has
        # already started the channel for worker 2.
        bank.store32(ch + abi.CH_OWNER, 1)
        bank.store32(ch + abi.CH_CTRL, abi.ctrl_start(2))
        me.scan()
        assert bank.load32(ch + abi.CH_CTRL) == abi.ctrl_start(2)  # untouched: not ours
        bank.store32(ch + abi.CH_CTRL, abi.ctrl_start(1))
        me.scan()
        assert bank.load32(ch + abi.CH_CTRL) == Ctrl.DONE
        result, _len, error, _, _copied = abi.CH_RESULT_STRUCT.unpack_from(bank.mem, ch + abi.CH_RESULT)
        assert (result, error) == (zlib.crc32(data), 0)
        assert bank.load32(abi.BANK_HOST_EVENT) == 1  # the IRQ was raised once
    finally:
        region.close()
        bank.close()
        for fd in fds:
            os.close(fd)


def test_ctrl_start_values() -> None:
    assert abi.ctrl_start(1) != abi.ctrl_start(2)
    assert all(abi.ctrl_is_start(abi.ctrl_start(o)) for o in (1, 2, 500))
    assert not abi.ctrl_is_start(Ctrl.RUNNING) and not abi.ctrl_is_start(Ctrl.DONE)
