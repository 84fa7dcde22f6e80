"""Two real QEMU VMs and a host process share one device (TCG, ivshmem transport).

One module fixture boots two VMs at once.  Each VM's guest program, through guestlib's ivshmem
transport: (1) fuzzes the device with the random-descriptor generator and oracle of
test_fuzz.py; (2) on the test's "go", queues N CRC32 tasks at once, as the host-process guest
does; (3) VM "a" then writes garbage into its doorbell and ring registers.

The share of the channel is forced, not sampled over a time window (a TCG guest that loses its CPU
for a while would skew that): the test stops the three guests' workers (SIGSTOP), so the first
task dispatched holds hostd's one channel, waits until hostd's status shows every guest's N tasks
queued, and resumes the workers.  From then on the round-robin scheduler alone decides the order,
which the completions' global sequence numbers record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import guestlib
from tests.hostile_guests import wait_until
from tests.integration.test_hostd_gone import all_threads_stopped
from tests.integration.test_qemu_transport import _request, _vm_skip_reason
from vmediad import abi, ivshmem
from vmediad.tools import vmimage
from vmediad.tools.qemu import Guest, write_run_script
from vmediad.tools.soak import HostdProcess

REPO = Path(__file__).resolve().parents[2]
READY = "vmediad-guest: python up"
FUZZED = "vmediad-guest: fuzz done"
QUEUED = "vmediad-guest: queued"
DONE = "vmediad-guest: all done"
FUZZ_N = 600
N = 30  # CRC32 tasks each guest queues while the workers are stopped
DATA_BYTES = 4 << 20
DATA = bytes(range(256)) * (DATA_BYTES // 256)
BOOT_TIMEOUT = 90.0

GUEST = f'''
import sys
print("{READY}", flush=True)
sys.path.insert(0, {str(REPO)!r})
import json, os, random, time, zlib
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
end = time.monotonic() + 120
while not os.path.exists(share + "/go") and time.monotonic() < end:
    time.sleep(0.01)
tasks = [dev.crc32(buf) for _ in range({N})]
print("{QUEUED}", flush=True)
done = [t.completion(120) for t in tasks]
res["fair"] = {{"seqs": [c.seq for c in done], "wrong": sum(c.result != want for c in done)}}

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
    host_seqs: list[int]  # the completion sequence numbers of the host guest's N tasks
    host_wrong: int
    backlog: dict[str, int]  # each guest's tasks queued in hostd when the workers were resumed
    vm_stats: dict[str, dict[str, Any]]
    hostd_exit: int | None  # hostd's exit code at the end (0: a clean stop, nothing crashed)
    host_after: int


def _queued(v: dict[str, Any]) -> int:
    return int(v["queue_depth"]) + int(v["inflight"])


@pytest.fixture(scope="module")
def shared() -> Iterator[SharedRun]:
    reason = _vm_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="vmd-qs-"))
    # hostd as its own process, as in production: the test's threads share nothing with it, and
    # every wait here is bounded, so a hostd that stopped answering fails the test, not the run.
    # No task watchdog: the task held by a stopped worker must not be timed out.
    h = HostdProcess(d / "h.sock", channels=1, config={
        "hostd": {"spin_us": 50, "ivshmem_dir": str(d)}, "limits": {"region_default": 64 << 20},
        "scheduler": {"policy": "round-robin"}, "workers": {"task_timeout_s": 0}})
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
                assert dev.crc32(buf).wait(30) == want
                names = ("host", "qa", "qb")
                workers = [v["worker_pid"] for v in h.status()["vms"] if v["name"] in names]
                assert len(workers) == 3 and all(workers), workers
                for pid in workers:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    for pid in workers:
                        wait_until(lambda pid=pid: all_threads_stopped(pid), 10, f"worker {pid} stopped")
                    for share in shares.values():
                        (share / "go").touch()
                    tasks = [dev.crc32(buf) for _ in range(N)]
                    for g in guests.values():
                        g.wait_line(QUEUED, 60)
                    # hostd has taken every guest's N tasks from its ring (queued, or handed to
                    # the stopped worker): all three are backlogged before any completes.
                    wait_until(lambda: all(_queued(v) >= N for v in h.status()["vms"] if v["name"] in names),
                               30, "every guest's tasks queued in hostd")
                    backlog = {v["name"]: _queued(v) for v in h.status()["vms"] if v["name"] in names}
                finally:
                    for pid in workers:
                        os.kill(pid, signal.SIGCONT)
                done = [t.completion(60) for t in tasks]
                host_wrong = sum(c.result != want for c in done)
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
        yield SharedRun(accel.name, results, [c.seq for c in done], host_wrong, backlog, vm_stats,
                        code if alive else None, host_after)
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
    assert set(shared.backlog) == {"host", "qa", "qb"} and min(shared.backlog.values()) >= N, shared.backlog
    assert shared.host_wrong == 0 and all(r["fair"]["wrong"] == 0 for r in shared.results.values())
    seqs = {"host": shared.host_seqs, **{n: r["fair"]["seqs"] for n, r in shared.results.items()}}
    assert all(len(v) == N for v in seqs.values())
    every = [q for qs in seqs.values() for q in qs]
    assert len(set(every)) == 3 * N and min(every) > 0  # hostd numbered each completion once
    order = [name for _, name in sorted((q, name) for name, qs in seqs.items() for q in qs)]
    # The global completion order is the scheduler's; with all three backlogged, round-robin
    # serves them in turn: in every prefix each guest is at most 2 behind or ahead of a third.
    # (The one task each may have had dispatched before the stop is the slack.)
    worst = 0
    for k in range(1, 2 * N + 1):
        head = order[:k]
        worst = max(worst, *(abs(3 * head.count(n) - k) for n in seqs))
    print(f"\nshared device ({shared.accel}): completion order of {3 * N} CRC32 tasks on one channel: "
          + "".join({"host": "h", "a": "a", "b": "b"}[n] for n in order))
    assert worst <= 6, order  # |3 * count - k| <= 6: within two tasks of an exact third
    assert {shared.vm_stats[f"q{n}"]["kind"] for n in ("a", "b")} == {"qemu"}


def test_garbage_in_a_vms_registers_is_a_ring_error_and_hostd_lives(shared: SharedRun) -> None:
    assert shared.results["a"]["ring_error"] == abi.ErrorCode.RING_OVERRUN
    assert shared.host_after == zlib.crc32(DATA)  # the host guest still works afterwards
    assert shared.hostd_exit == 0  # alive to the end, then a clean stop
