"""Timing and table helpers shared by every benchmark case module and `python -m gradguard.bench`.

A case module exposes ``tables(device: str = "cpu", quick: bool = False) -> list[Table]``: each
Table holds rows measured in the same run (the subject, the PyTorch baselines, the bandwidth
floor) and the target checks derived from them.
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


# Set by `python -m gradguard.bench`: print a line to stderr as each case finishes.
progress = False


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device="cpu", repeats: int = 15, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds over `repeats` runs (device synchronized)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@dataclass
class Row:
    name: str
    ms: float
    bytes: int | None = None  # bytes the operation must move at least (for GB/s)

    def __post_init__(self):
        if progress:
            print(f"  measured {self.name}: {self.ms:.2f} ms", file=sys.stderr, flush=True)

    @property
    def gbps(self) -> float | None:
        return None if not self.bytes else self.bytes / (self.ms * 1e-3) / 1e9


@dataclass
class Table:
    title: str
    rows: list[Row]
    floor: str | None = None  # name of the row that is the bandwidth floor
    checks: list[str] = field(default_factory=list)
    floor_label: str = "x floor"  # the ratio column's header ("x bare" where the floor row is a bare step)

    def ms(self, name: str) -> float:
        for r in self.rows:
            if r.name == name:
                return r.ms
        raise KeyError(name)

    def check(self, what: str, value: float, op: str, target: float) -> bool:
        """Records 'what = value (target op target): met/NOT met' and returns whether it is met."""
        met = value <= target if op == "<=" else value >= target
        self.checks.append(f"{what} = {value:.2f}x (target {op} {target}x): {'met' if met else 'NOT met'}")
        return met

    def format(self) -> str:
        floor_ms = self.ms(self.floor) if self.floor else None
        head = f"{'case':<58} {'median ms':>10} {'GB/s':>7}" + (f" {self.floor_label:>8}" if floor_ms else "")
        lines = [self.title, head, "-" * len(head)]
        for r in self.rows:
            gb = f"{r.gbps:7.1f}" if r.gbps else f"{'':>7}"
            line = f"{r.name:<58} {r.ms:10.2f} {gb}"
            if floor_ms:
                line += f" {r.ms / floor_ms:8.2f}"
            lines.append(line)
        lines += [f"  {c}" for c in self.checks]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"title": self.title, "floor": self.floor, "checks": self.checks,
                "rows": [{"name": r.name, "ms": r.ms, "bytes": r.bytes, "gbps": r.gbps} for r in self.rows]}


def round_orders(items: list, repeats: int) -> list[list]:
    """The order of each round's calls: a new permutation every round (seeded, so that a run can
    be repeated). Rotating one fixed order put every case after the same neighbour in every round,
    and what a neighbour leaves in the caches moves a case's time: in the fused AdamW table the
    bare step always followed torch.sum over a separate flat copy and read 4-10% slow (swapping
    two cases' places moved handed-grad_scale / bare from 0.97-0.99x to 1.08-1.11x)."""
    rng = random.Random(0)
    orders = []
    for _ in range(repeats):
        order = list(items)
        rng.shuffle(order)
        orders.append(order)
    return orders


def interleaved_times(cases: dict, device: str, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Per-round ms of each callable, every callable once a round, in a new order each round
    (round_orders)."""
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            cases[n]()
    sync(device)
    times = {n: [0.0] * repeats for n in names}
    for r, order in enumerate(round_orders(names, repeats)):
        for n in order:
            t0 = time.perf_counter()
            cases[n]()
            sync(device)
            times[n][r] = (time.perf_counter() - t0) * 1e3
    return times


def ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of a's time / b's time in the same round: steadier than a ratio of
    medians when the load from other processes changes during the run."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def fastest_ratio(times: dict, a: str, b: str) -> float:
    """a's fastest round / b's fastest round: what an idle machine would show when the noise
    from other processes only ever adds time."""
    return min(times[a]) / min(times[b])
