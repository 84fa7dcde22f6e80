"""Two real QEMU VMs and a host process share one device (TCG, ivshmem transport).

One module fixture boots two VMs at once.  Each VM's guest program, through guestlib's ivshmem
transport: (1) fuzzes the device with the random-descriptor generator and oracle of
test_fuzz.py; (2) waits for the test's "go", then keeps CRC32 tasks queued for a fixed time
while a host-process guest does the same; (3) VM "a" then writes garbage into its doorbell
and ring registers.  hostd runs one channel with the round-robin policy, so the three guests
contend for it; they must get fair shares, and hostd must live through all of it.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import guestlib
from tests.integration.test_qemu_transport import _request, _vm_skip_reason
from vmediad import abi, ivshmem
from vmediad.tools import vmimage
from vmediad.tools.qemu import Guest, write_run_script
from vmediad.tools.soak import HostdProcess

REPO = Path(__file__).resolve().parents[2]
READY = "vmediad-guest: python up"
FUZZED = "vmediad-guest: fuzz done"
DONE = "vmediad-guest: all done"
FUZZ_N = 600
LOAD_S = 4.0
# Tasks each guest keeps queued: about 0.2 s of the channel, so a guest whose (TCG) CPU is
# taken away for a moment stays backlogged and the scheduler, not the load, decides the shares.
DEPTH = 12
# Heavy enough (about 10 ms of CRC32 each) that the channel, not a TCG guest's own loop, is what
# the three guests wait for: all three stay backlogged and the scheduler decides the shares.
DATA_BYTES = 24 << 20
DATA = bytes(range(256)) * (DATA_BYTES // 256)
BOOT_TIMEOUT = 90.0

GUEST = f'''
import sys
print("{READY}", flush=True)
sys.path.insert(0, {str(REPO)!r})
import collections, json, os, random, time, zlib
import guestlib
from vmediad import abi
from tests.integration import test_fuzz as F

share, seed, role = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dev = guestlib.attach()
res = {{"class": type(dev).__name__, "vm": dev.vm_id}}
rng = random.Random(seed)
res["fuzz"] = F.fuzz_device(dev, rng, {FUZZ_N})
print("{FUZZED}", flush=True)

data = bytes(range(256)) * ({DATA_BYTES} // 256)
want = zlib.crc32(data)
buf = dev.put(data)
go = share + "/go"
while not os.path.exists(go):
    time.sleep(0.01)
count = wrong = 0
tasks = collections.deque()
end = time.monotonic() + {LOAD_S}
while time.monotonic() < end:
    while len(tasks) < {DEPTH}:
        tasks.append(dev.crc32(buf))
    count += 1
    wrong += tasks.popleft().wait(30) != want
for t in tasks:
    t.wait(30)
res["fair"] = {{"count": count, "wrong": wrong}}

if role == "a":
    reg = dev.region
    reg.xchg32(abi.REG_DOORBELL, 0xDEADBEEF)  # not KICK: ignored, counted
    reg.store32(abi.REG_SQ_TAIL, (reg.load32(abi.REG_SQ_TAIL) + 100000) & 0xFFFFFFFF)  # an overrun
    dev._ring()
    deadline = time.monotonic() + 10
    while reg.load32(abi.REG_RING_ERROR) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    res["ring_error"] = reg.load32(abi.REG_RING_ERROR)
with open(share + "/result.json", "w") as f:
    json.dump(res, f)
print("{DONE}", flush=True)
'''


@dataclass
class SharedRun:
    accel: str
    results: dict[str, dict[str, Any]]
    host_count: int
    host_wrong: int
    vm_stats: dict[str, dict[str, Any]]
    hostd_exit: int | None  # hostd's exit code at the end (0: a clean stop, nothing crashed)
    host_after: int


@pytest.fixture(scope="module")
def shared() -> Iterator[SharedRun]:
    reason = _vm_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="vmd-qs-"))
    # hostd as its own process, as in production: the test's threads share nothing with it, and
    # every wait here is bounded, so a hostd that stopped answering fails the test, not the run.
    h = HostdProcess(d / "h.sock", channels=1, config={
        "hostd": {"spin_us": 50, "ivshmem_dir": str(d)}, "limits": {"region_default": 64 << 20},
        "scheduler": {"policy": "round-robin"}})
    h.start()
    try:
        image = vmimage.build_image()
        accel = vmimage.detect_accel()
        guests: dict[str, Guest] = {}
        shares: dict[str, Path] = {}
        for seed, name in enumerate(("a", "b"), start=1):
            reply = _request(h.socket, {"cmd": "vm_socket", "name": f"q{name}"})
            assert reply["ok"], reply
            share = d / f"share-{name}"
            share.mkdir()
            (share / "guest.py").write_text(GUEST)
            write_run_script(share, [sys.executable, str(share / "guest.py"), str(share), str(seed), name],
                             cwd=Path.cwd())
            argv = vmimage.qemu_command(image, share, accel=accel, ivshmem_socket=Path(reply["path"]),
                                        vectors=ivshmem.VECTORS)
            guests[name] = Guest(argv).start()
            shares[name] = share
        try:
            with guestlib.attach(h.socket, name="host", region_size=64 << 20) as dev:
                for g in guests.values():
                    g.wait_line(FUZZED, BOOT_TIMEOUT)
                buf = dev.put(DATA)
                want = zlib.crc32(DATA)
                count = wrong = 0
                for share in shares.values():
                    (share / "go").touch()
                tasks: deque[guestlib.Task] = deque()
                end = time.monotonic() + LOAD_S
                while time.monotonic() < end:
                    while len(tasks) < DEPTH:
                        tasks.append(dev.crc32(buf))
                    count += 1
                    wrong += tasks.popleft().wait(30) != want
                for t in tasks:
                    t.wait(30)
                vm_stats = {v["name"]: v for v in h.status()["vms"]}
                for g in guests.values():
                    g.wait_line(DONE, 60)
                results = {n: json.loads((s / "result.json").read_text()) for n, s in shares.items()}
                host_after = dev.crc32(buf).wait(10)
        except (TimeoutError, OSError) as e:
            pytest.fail(f"{e}\n" + "\n".join(g.describe() for g in guests.values()) + f"\nhostd log: {h.log_path}")
        finally:
            for g in guests.values():
                g.kill()
        alive = h.alive()
        code = h.stop()
        yield SharedRun(accel.name, results, count, wrong, vm_stats, code if alive else None, host_after)
    finally:
        h.kill()
        shutil.rmtree(d, ignore_errors=True)


def test_fuzzing_through_the_ivshmem_transport_gets_only_allowed_outcomes(shared: SharedRun) -> None:
    for name, r in shared.results.items():
        assert r["class"] == "IvshmemDevice", name  # the VM's transport, picked by guestlib itself
        f = r["fuzz"]
        assert f["nbad"] == 0, (name, f["bad"])
        assert sum(f["outcomes"].values()) == FUZZ_N
        assert f["outcomes"].get("OK", 0) > 0 and len(f["outcomes"]) >= 4  # successes and several errors
    assert shared.hostd_exit == 0  # alive to the end, then a clean stop


def test_two_vms_and_a_host_process_share_one_channel_fairly(shared: SharedRun) -> None:
    counts = {"host": shared.host_count, **{n: r["fair"]["count"] for n, r in shared.results.items()}}
    wrong = shared.host_wrong + sum(r["fair"]["wrong"] for r in shared.results.values())
    assert wrong == 0
    mean = sum(counts.values()) / len(counts)
    print(f"\nshared device ({shared.accel}), CRC32 of 24 MiB on one channel for {LOAD_S:g} s: {counts}")
    # Round-robin over three backlogged guests: each within a third of the mean, none starved.
    assert all(0.67 * mean <= c <= 1.33 * mean for c in counts.values()), counts
    assert {shared.vm_stats[f"q{n}"]["kind"] for n in ("a", "b")} == {"qemu"}


def test_garbage_in_a_vms_registers_is_a_ring_error_and_hostd_lives(shared: SharedRun) -> None:
    assert shared.results["a"]["ring_error"] == abi.ErrorCode.RING_OVERRUN
    assert shared.host_after == zlib.crc32(DATA)  # the host guest still works afterwards
    assert shared.hostd_exit == 0  # alive to the end, then a clean stop
