"""Pool the paired rounds of several ``vmediad bench codec`` result files.

One run's ratio is the median of 11 paired rounds.  On a shared 2-core box a round's ratio
spreads by about ±10 %, so one run's median still moves by a few percent from run to run.
Pooling the rounds of several runs (same code, same method) gives a steadier median; the
bootstrap interval says how steady.  Pure: takes the parsed JSON, returns values.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmediad.tools.bench.common import name_matches, round_ratios


class CombineError(ValueError):
    """A result file that cannot be pooled (no per-round data, or runs of other cases)."""


@dataclass(frozen=True)
class Pooled:
    case: str
    runs: int
    rounds: int
    run_ratios: tuple[float, ...]   # each run's own ``ratio`` (median of its paired rounds)
    median: float                   # median over all pooled paired rounds
    ci95: tuple[float, float]       # bootstrap 95 % interval of that median
    runs_meeting: int               # runs whose own ratio met the target
    target: float

    @property
    def meets(self) -> bool:
        return self.median >= self.target


def _paired(case: dict[str, Any], where: str) -> list[float]:
    runs = case.get("runs")
    if not isinstance(runs, dict) or "direct" not in runs or "device" not in runs:
        raise CombineError(f"{where}: case {case.get('case')!r} has no per-round 'runs' "
                           "(not a bench codec --json-out file?)")
    direct, device = runs["direct"], runs["device"]
    if len(direct) != len(device) or not direct:
        raise CombineError(f"{where}: case {case.get('case')!r}: {len(device)} device rounds "
                           f"against {len(direct)} direct rounds")
    if any(not isinstance(x, int | float) or x <= 0 for x in (*direct, *device)):
        raise CombineError(f"{where}: case {case.get('case')!r}: fps must be positive numbers")
    return round_ratios(direct, device)


def combine(results: list[tuple[str, dict[str, Any]]], target: float = 0.97, resamples: int = 10_000,
            seed: int = 0, only: Sequence[str] = ()) -> list[Pooled]:
    """``results``: (name, parsed JSON) per run.  Every run must hold the same cases; with
    ``only`` (``bench codec --case`` words), the same cases among those it selects, so that
    runs of a subset (``--case decode``) pool with full runs."""
    if not results:
        raise CombineError("no result files given")
    order: list[str] | None = None
    rounds: dict[str, list[float]] = {}
    per_run: dict[str, list[float]] = {}
    for where, res in results:
        cases = res.get("cases")
        if not isinstance(cases, list) or not cases:
            raise CombineError(f"{where}: no 'cases' (not a `vmediad bench codec` result?)")
        cases = [c for c in cases if name_matches(str(c.get("case")), only)]
        if not cases:
            raise CombineError(f"{where}: no case matches {list(only)}")
        names = [str(c.get("case")) for c in cases]
        if order is None:
            order = names
        elif sorted(names) != sorted(order):
            raise CombineError(f"{where}: cases {names} differ from the first file's {order}")
        for c in cases:
            name = str(c["case"])
            pr = _paired(c, where)
            rounds.setdefault(name, []).extend(pr)
            per_run.setdefault(name, []).append(float(c["ratio"] if "ratio" in c else statistics.median(pr)))
    assert order is not None
    rng = np.random.default_rng(seed)
    out = []
    for name in order:
        r = np.asarray(rounds[name])
        boot = np.median(rng.choice(r, size=(resamples, r.size), replace=True), axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out.append(Pooled(case=name, runs=len(per_run[name]), rounds=int(r.size),
                          run_ratios=tuple(per_run[name]), median=round(float(np.median(r)), 3),
                          ci95=(round(float(lo), 3), round(float(hi), 3)),
                          runs_meeting=sum(x >= target for x in per_run[name]), target=target))
    return out
