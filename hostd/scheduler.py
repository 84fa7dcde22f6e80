"""The task scheduler: pure ordering logic, no I/O (seed 000 claim 7).

It only orders tasks.  hostd tells it when a task arrives (a ring slot index,
nothing else: the descriptor is not read until the task is about to run) and
when one finishes; ``next()`` says which task to start.  Policies:

* ``fifo``: global arrival order across VMs, FIFO within a VM (the patent's);
* ``round-robin``: one task per VM in turn;
* ``weighted``: stride scheduling with per-VM weights.

Every policy honours the per-guest cap on tasks in flight and skips VMs that
hostd has blocked (a VM whose next task waits for a busy channel).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

STRIDE_ONE = 1 << 20


@dataclass(frozen=True, slots=True)
class Pending:
    vm: int
    slot: int
    seq: int  # global arrival sequence


@dataclass
class _VmQueue:
    weight: int
    queue: deque[Pending] = field(default_factory=deque)
    inflight: int = 0
    blocked: bool = False
    pass_value: int = 0
    started: int = 0


class Scheduler:
    def __init__(self, policy: str = "fifo", cap: int = 8) -> None:
        if policy not in ("fifo", "round-robin", "weighted"):
            raise ValueError(f"unknown policy {policy!r}")
        if cap < 1:
            raise ValueError("cap must be >= 1")
        self.policy = policy
        self.cap = cap
        self._vms: dict[int, _VmQueue] = {}
        self._order: list[int] = []  # round-robin rotation
        self._rr_next = 0
        self._seq = 0

    def add_vm(self, vm: int, weight: int = 1) -> None:
        if vm in self._vms:
            raise ValueError(f"vm {vm} already present")
        # A newcomer starts at the current minimum pass so it cannot monopolise.
        passes = [q.pass_value for q in self._vms.values()]
        self._vms[vm] = _VmQueue(weight=max(1, weight), pass_value=min(passes, default=0))
        self._order.append(vm)

    def remove_vm(self, vm: int) -> list[Pending]:
        """Forget ``vm``; returns the tasks that never started."""
        q = self._vms.pop(vm, None)
        if q is None:
            return []
        idx = self._order.index(vm)
        self._order.pop(idx)
        if idx < self._rr_next:
            self._rr_next -= 1
        return list(q.queue)

    def arrive(self, vm: int, slot: int) -> Pending:
        self._seq += 1
        p = Pending(vm, slot, self._seq)
        self._vms[vm].queue.append(p)
        return p

    def block(self, vm: int, blocked: bool = True) -> None:
        self._vms[vm].blocked = blocked

    def _eligible(self, vm: int) -> bool:
        q = self._vms[vm]
        return bool(q.queue) and not q.blocked and q.inflight < self.cap

    def next(self) -> Pending | None:
        """Pop the task to start now, counting it in flight; None if nothing may start."""
        vm = self._pick()
        if vm is None:
            return None
        q = self._vms[vm]
        q.inflight += 1
        q.started += 1
        if self.policy == "weighted":
            q.pass_value += STRIDE_ONE // q.weight
        return q.queue.popleft()

    def _pick(self) -> int | None:
        if self.policy == "fifo":
            best: tuple[int, int] | None = None
            for vm, q in self._vms.items():
                if self._eligible(vm) and (best is None or q.queue[0].seq < best[0]):
                    best = (q.queue[0].seq, vm)
            return None if best is None else best[1]
        if self.policy == "round-robin":
            n = len(self._order)
            for i in range(n):
                idx = (self._rr_next + i) % n
                vm = self._order[idx]
                if self._eligible(vm):
                    self._rr_next = (idx + 1) % n
                    return vm
            return None
        pick: tuple[int, int, int] | None = None
        for vm, q in self._vms.items():
            if self._eligible(vm):
                key = (q.pass_value, q.queue[0].seq, vm)
                if pick is None or key < pick:
                    pick = key
        return None if pick is None else pick[2]

    def unstart(self, vm: int) -> None:
        """The task ``next()`` returned did not start after all (it failed validation
        before reaching a channel); it no longer counts in flight."""
        self.finished(vm)

    def put_back(self, vm: int, tasks: list[Pending]) -> None:
        """Tasks ``next()`` returned that were taken back before they ran (a revoked shadow
        load, a staged task): they go back to the head of ``vm``'s queue in their original
        order and no longer count in flight."""
        q = self._vms[vm]
        for p in sorted(tasks, key=lambda p: p.seq, reverse=True):
            if p.vm != vm:
                raise AssertionError(f"task of vm {p.vm} put back to vm {vm}")
            self.finished(vm)
            q.started -= 1
            if self.policy == "weighted":
                q.pass_value -= STRIDE_ONE // q.weight
            q.queue.appendleft(p)

    def finished(self, vm: int) -> None:
        q = self._vms.get(vm)
        if q is not None:
            if q.inflight <= 0:
                raise AssertionError(f"vm {vm}: finished() without a task in flight")
            q.inflight -= 1

    def depth(self, vm: int) -> int:
        return len(self._vms[vm].queue)

    def inflight(self, vm: int) -> int:
        return self._vms[vm].inflight

    def has_work(self) -> bool:
        return any(self._eligible(vm) for vm in self._vms)

    def statistics(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "cap": self.cap,
            "arrived": self._seq,
            "vms": {
                vm: {"queued": len(q.queue), "inflight": q.inflight, "started": q.started,
                     "weight": q.weight, "blocked": q.blocked}
                for vm, q in list(self._vms.items())
            },
        }
