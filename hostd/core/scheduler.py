"""The task scheduler and its policies: pure ordering logic, no I/O.

It only orders tasks.  hostd tells it when a task arrives (a ring slot index,
nothing else: the descriptor is not read until the task is about to run) and
when one finishes; ``next()`` says which task to start.  Policies:

* ``fifo`` (``FifoPolicy``): global arrival order across guests, FIFO within a guest;
* ``round-robin`` (``RoundRobinPolicy``): one task per guest in turn;
* ``weighted`` (``WeightedPolicy``): stride scheduling with per-guest weights.

Every policy honours the per-guest cap on tasks in flight and skips guests that
hostd has blocked (a guest whose next task waits for a busy channel, or that has
no worker).  A policy also says how dispatch shares the channels
(``fair_share``, ``revokes_shadows``; see hostd/core/dispatch.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

STRIDE_ONE = 1 << 20


@dataclass(frozen=True, slots=True)
class Pending:
    vm: int
    slot: int
    seq: int  # global arrival sequence


@dataclass(slots=True)
class VmQueue:
    weight: int
    queue: deque[Pending] = field(default_factory=deque)
    inflight: int = 0
    blocked: bool = False
    pass_value: int = 0
    started: int = 0


class Policy:
    """How tasks are ordered across guests, and how channels are shared between them.

    ``fair_share``: while more than one guest is active, a guest may take all channels
    but one, and its stateless tasks get no shadow loads.  ``revokes_shadows``: a task
    that has to wait takes back other guests' shadow loads its worker has not claimed.
    ``strides``: a started task advances its guest's pass by ``STRIDE_ONE // weight``."""

    name: ClassVar[str]
    fair_share: ClassVar[bool] = False
    revokes_shadows: ClassVar[bool] = False
    strides: ClassVar[bool] = False

    def added(self, vm: int) -> None:
        """``vm`` joined the scheduler (after every guest already there)."""

    def removed(self, vm: int) -> None:
        """``vm`` left the scheduler."""

    def pick(self, vms: dict[int, VmQueue], eligible: list[int]) -> int:
        """The guest to start a task of, among ``eligible`` (not empty, in ``vms`` order)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


class FifoPolicy(Policy):
    """Global arrival order: work-conserving, no fair share."""

    name = "fifo"

    def pick(self, vms: dict[int, VmQueue], eligible: list[int]) -> int:
        return min(eligible, key=lambda vm: vms[vm].queue[0].seq)


class RoundRobinPolicy(Policy):
    """One task per guest in turn, in attach order."""

    name = "round-robin"
    fair_share = True
    revokes_shadows = True

    def __init__(self) -> None:
        self._order: list[int] = []  # the rotation
        self._next = 0  # index in _order of the guest whose turn it is

    def added(self, vm: int) -> None:
        self._order.append(vm)

    def removed(self, vm: int) -> None:
        idx = self._order.index(vm)
        self._order.pop(idx)
        if idx < self._next:
            self._next -= 1

    def pick(self, vms: dict[int, VmQueue], eligible: list[int]) -> int:
        n = len(self._order)
        ok = set(eligible)
        for i in range(n):
            idx = (self._next + i) % n
            vm = self._order[idx]
            if vm in ok:
                self._next = (idx + 1) % n
                return vm
        raise AssertionError("an eligible guest is not in the rotation")


class WeightedPolicy(Policy):
    """Stride scheduling: the guest with the lowest pass goes next (ties: oldest task)."""

    name = "weighted"
    fair_share = True
    revokes_shadows = True
    strides = True

    def pick(self, vms: dict[int, VmQueue], eligible: list[int]) -> int:
        return min(eligible, key=lambda vm: (vms[vm].pass_value, vms[vm].queue[0].seq, vm))


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (FifoPolicy, RoundRobinPolicy, WeightedPolicy)}


def policy_named(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}") from None


class Scheduler:
    def __init__(self, policy: str | Policy = "fifo", cap: int = 8) -> None:
        self.policy = policy_named(policy) if isinstance(policy, str) else policy
        if cap < 1:
            raise ValueError("cap must be >= 1")
        self.cap = cap
        self._strides = self.policy.strides
        self._vms: dict[int, VmQueue] = {}
        self._seq = 0

    def add_vm(self, vm: int, weight: int = 1) -> None:
        if vm in self._vms:
            raise ValueError(f"vm {vm} already present")
        # A newcomer starts at the current minimum pass so it cannot monopolise.
        passes = [q.pass_value for q in self._vms.values()]
        self._vms[vm] = VmQueue(weight=max(1, weight), pass_value=min(passes, default=0))
        self.policy.added(vm)

    def remove_vm(self, vm: int) -> list[Pending]:
        """Forget ``vm``; returns the tasks that never started."""
        q = self._vms.pop(vm, None)
        if q is None:
            return []
        self.policy.removed(vm)
        return list(q.queue)

    def take_queued(self, vm: int) -> list[Pending]:
        """Empty ``vm``'s queue (it stays in the scheduler); its tasks, oldest first."""
        q = self._vms[vm].queue
        taken = list(q)
        q.clear()
        return taken

    def __contains__(self, vm: int) -> bool:
        return vm in self._vms

    def arrive(self, vm: int, slot: int) -> Pending:
        self._seq += 1
        p = Pending(vm, slot, self._seq)
        self._vms[vm].queue.append(p)
        return p

    def arrive_many(self, vm: int, slots: list[int]) -> None:
        """``arrive`` for each of ``slots`` in order (one SQ drain)."""
        q = self._vms[vm].queue
        seq = self._seq
        for slot in slots:
            seq += 1
            q.append(Pending(vm, slot, seq))
        self._seq = seq

    def block(self, vm: int, blocked: bool = True) -> None:
        self._vms[vm].blocked = blocked

    def next(self) -> Pending | None:
        """Pop the task to start now, counting it in flight; None if nothing may start."""
        cap = self.cap
        vms = self._vms
        eligible = [vm for vm, q in vms.items() if q.queue and not q.blocked and q.inflight < cap]
        if not eligible:
            return None
        q = vms[self.policy.pick(vms, eligible)]
        q.inflight += 1
        q.started += 1
        if self._strides:
            q.pass_value += STRIDE_ONE // q.weight
        return q.queue.popleft()

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
            if self._strides:
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
        return any(q.queue and not q.blocked and q.inflight < self.cap for q in self._vms.values())

    def statistics(self) -> dict[str, object]:
        return {
            "policy": self.policy.name,
            "cap": self.cap,
            "arrived": self._seq,
            "vms": {
                vm: {"queued": len(q.queue), "inflight": q.inflight, "started": q.started,
                     "weight": q.weight, "blocked": q.blocked}
                for vm, q in list(self._vms.items())
            },
        }
