"""A worker claims a channel only if hostd started it for that worker (one CAS, no window),
and runs only on a register bank of its own version."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

from codec_backend.worker import EXIT_BANK_MISMATCH, Worker, bank_mismatch
from vmediad import abi
from vmediad.abi import ChannelProgram, ChannelResult, Ctrl, Op
from vmediad.shm import MappedRegion, create_memfd


def _setup(channels: int = 2) -> tuple[MappedRegion, MappedRegion, list[int]]:
    rfd = create_memfd("t-region", 1 << 20)
    bfd = create_memfd("t-bank", abi.bank_size(channels))
    return MappedRegion(rfd, 1 << 20), MappedRegion(bfd, abi.bank_size(channels)), [rfd, bfd]


def test_stale_owner_register_cannot_make_a_worker_run_another_guests_task() -> None:
    region, bank, fds = _setup()
    try:
        limits = abi.WorkerLimits(abi.GeometryLimits(64, 64, 4096), 1)
        me = Worker(0, 2, region, bank, limits, False, os.getppid())
        data = b"belongs to this guest"
        region.mem[8192 : 8192 + len(data)] = data
        ch = abi.channel_offset(1)
        ChannelProgram(Op.CRC32, src_off=8192, src_len=len(data)).pack_into(bank.mem, ch + abi.CH_PROGRAM)
        # The race: CH_OWNER still names worker 1 (from its last task) while hostd has
        # already started the channel for worker 2.
        bank.store32(ch + abi.CH_OWNER, 1)
        bank.store32(ch + abi.CH_CTRL, abi.ctrl_start(2))
        me.scan()
        assert bank.load32(ch + abi.CH_CTRL) == abi.ctrl_start(2)  # untouched: not ours
        bank.store32(ch + abi.CH_CTRL, abi.ctrl_start(1))
        me.scan()
        assert bank.load32(ch + abi.CH_CTRL) == Ctrl.DONE
        res = ChannelResult.unpack_from(bank.mem, ch + abi.CH_RESULT)
        assert (res.result, res.error) == (zlib.crc32(data), 0)
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


def _worker(bank_version: int, limits: str = "{}") -> subprocess.CompletedProcess[str]:
    """A real worker process on a fresh bank whose BANK_VERSION word holds ``bank_version``."""
    rfd = create_memfd("t-region", 1 << 20)
    bfd = create_memfd("t-bank", abi.bank_size(1))
    bank = MappedRegion(bfd, abi.bank_size(1))
    try:
        bank.store32(abi.BANK_VERSION, bank_version)
        cmd = [sys.executable, "-m", "codec_backend.worker", "--slot", "0", "--vm", "1",
               "--region-fd", str(rfd), "--region-size", str(1 << 20), "--bank-fd", str(bfd),
               "--channels", "1", "--parent", str(os.getpid()), "--limits", limits]
        r = subprocess.run(cmd, pass_fds=(rfd, bfd), capture_output=True, text=True, timeout=30)
        # It ran nothing: no IRQ, no CTRL touched.
        assert bank.load32(abi.BANK_HOST_EVENT) == 0 and bank.load32(abi.channel_offset(0) + abi.CH_CTRL) == 0
        return r
    finally:
        bank.close()
        os.close(rfd)
        os.close(bfd)


def test_a_worker_refuses_a_bank_of_another_version() -> None:
    """hostd and its workers share no guest ABI but the bank's: a worker from another release
    exits with one line and EXIT_BANK_MISMATCH before it runs anything."""
    r = _worker(abi.BANK_ABI_VERSION + 6)
    assert r.returncode == EXIT_BANK_MISMATCH == 78
    assert r.stdout == ""
    assert r.stderr == (f"vmediad-worker: register bank version {abi.BANK_ABI_VERSION + 6}, this worker speaks "
                        f"{abi.BANK_ABI_VERSION} (hostd and codec_backend are from different releases)\n")


def test_bank_version_check() -> None:
    bfd = create_memfd("t-bank", abi.bank_size(1))
    bank = MappedRegion(bfd, abi.bank_size(1))
    try:
        assert "register bank version 0," in (bank_mismatch(bank) or "")  # hostd writes it before any worker
        bank.store32(abi.BANK_VERSION, abi.BANK_ABI_VERSION)
        assert bank_mismatch(bank) is None
        bank.store32(abi.BANK_VERSION, abi.BANK_ABI_VERSION + 1)
        assert f"register bank version {abi.BANK_ABI_VERSION + 1}" in (bank_mismatch(bank) or "")
    finally:
        bank.close()
        os.close(bfd)


def test_a_worker_refuses_limits_that_are_not_a_json_object() -> None:
    r = _worker(abi.BANK_ABI_VERSION, limits="[1, 2]")
    assert r.returncode == 2
    assert r.stderr == ("vmediad-worker: bad --limits '[1, 2]': worker limits must be a JSON object, "
                        "got list\n")
