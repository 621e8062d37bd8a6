"""Timing: one timed run, and the medians of sides run in rotation."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence


def rate(ops: int, run: Callable[[], None]) -> float:
    """Run ``run`` once and return ``ops`` per second of wall time."""
    gc.collect()
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    return ops / elapsed


def rotated_medians(runs: Sequence[Callable[[], float]], repeats: int) -> list[float]:
    """Run every side ``repeats`` times, in rotation: repetition ``r`` starts with side
    ``r % len(runs)`` and goes round, so that the machine's drift favours none. Each callable
    runs one repetition and returns its rate. Returns the median rate of each side, in order."""
    rates: list[list[float]] = [[] for _ in runs]
    for rep in range(repeats):
        for k in range(len(runs)):
            side = (rep + k) % len(runs)
            rates[side].append(runs[side]())
    return [statistics.median(side_rates) for side_rates in rates]


def named_medians(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """:func:`rotated_medians` of named sides: the median rate of each, by name. A side that
    is ``None`` (a contender that cannot run here, diskcache not installed) is left out."""
    names = [name for name, run in sides.items() if run is not None]
    return dict(zip(names, rotated_medians([sides[n] for n in names], repeats), strict=True))
