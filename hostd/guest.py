"""The device's records of a run and of each guest it serves (owned by the device thread)."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any

import structlog

from hostd.core.lifecycle import Lifecycle
from hostd.core.ring import Ring
from hostd.core.sessions import Sessions
from hostd.regions import Region
from hostd.stats import GuestStats
from hostd.workers import WorkerHandle

log = structlog.get_logger("hostd.device")


class RunState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(slots=True)
class Guest:
    vm_id: int
    name: str
    pid: int
    uid: int
    region: Region
    slot: int  # worker mailbox slot; its worker owns register files as slot + 1
    ring: Ring
    sessions: Sessions
    adopted: bool = False  # region served by an earlier hostd: its older session ids are lost
    weight: int = 1
    worker: WorkerHandle | None = None
    generation: int = 0  # of the current worker: a reaper's report about an older one is stale
    life: Lifecycle = field(default_factory=Lifecycle)
    held_slots: set[int] = field(default_factory=set)  # queued, staged or running
    arrival_ns: dict[int, int] = field(default_factory=dict)
    attached_ns: int = 0
    worker_tasks: int = 0
    early_deaths: int = 0  # consecutive workers that died before running any task
    last_submit_ns: int = 0
    recycles: int = 0
    stats: GuestStats = field(default_factory=GuestStats)
    kind: str = "process"  # "process" (a host process) or "qemu" (a VM behind ivshmem)
    transport: str = "memfd"  # "memfd" (fd over the control socket, futex wake-ups) or "ivshmem"
    irq_fd: int = -1  # ivshmem: the eventfd of the VM's completion vector (the device thread's)

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
    # "ivshmem": a QEMU VM (hostd/ivshmem.py); its region's caps say no futex crosses to it.
    transport: str = "memfd"
    region_fd: int | None = None  # ivshmem: a dup of the region's fd, the caller's to close
    irq_fd: int = -1  # ivshmem: the completion vector's eventfd; the guest's once attached
    done: threading.Event = field(default_factory=threading.Event)
    guest: Guest | None = None
    error: Exception | None = None
