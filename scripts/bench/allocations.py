"""What a lookup leaves for Python's cyclic garbage collector, against the floor's.

A loop that keeps its results (a list of Instances built up by a server, a cache) makes the
collector run every few hundred objects it keeps, and each run walks the young objects: seen
costing up to 40% of such a loop. What a call leaves behind is the part the store controls;
this section counts it, as the objects the collector tracks (``gc.get_objects()``, with the
collector off) per call, the results kept, for ours and for the floor doing the same work,
and times the same loops with the collector on and off (sides alternating, medians).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench import floor
from bench.data import LIST_MACHINE, LIST_STATE
from bench.gets import floor_loaded, ours_loaded
from bench.listing import floor_by_state, floor_list, ours_by_state
from bench.stores import Bench

Keep = Callable[[], list[Any]]
"""One pass of a loop whose results are kept: returns them, with how many calls made them."""


def tracked_per_call(run: Keep, calls: int) -> float:
    """Objects the collector tracks after ``run()`` that it did not before, per call, while
    what ``run`` returns is still held."""
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        kept = run()
        after = len(gc.get_objects())
    finally:
        gc.enable()
    del kept
    return (after - before - 1) / calls  # the list holding the results is one of them


def rate_with_collector(run: Keep, calls: int, enabled: bool) -> float:
    """Calls per second of ``run()`` with the collector on or off (results kept to the end)."""
    gc.collect()
    if not enabled:
        gc.disable()
    try:
        start = time.perf_counter()
        kept = run()
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    del kept
    return calls / elapsed


def section_allocations(bench: Bench) -> list[str]:
    """Tracked objects per call and the collector's share of the time, for ``get_instance``
    and ``list_by_state`` (per instance listed), ours and the floor."""
    storage, env = ours_loaded(bench), floor_loaded(bench)
    ids = bench.lookup_ids
    keys = [iid.encode() for iid in ids]
    get = storage.get_instance

    def ours_get() -> list[Any]:
        return [get(iid) for iid in ids]

    def floor_get() -> list[Any]:
        begin, db, decode, out = env.env.begin, env.instances, floor.decode, []
        for key in keys:
            with begin(db) as txn:
                raw = txn.get(key)
            out.append(decode(key, raw))
        return out

    listing_store, listing_env = ours_by_state(bench), floor_by_state(bench)
    listed = len(listing_store.list_by_state(LIST_MACHINE, LIST_STATE))
    passes = max(1, len(ids) // listed)

    def ours_list() -> list[Any]:
        return [listing_store.list_by_state(LIST_MACHINE, LIST_STATE) for _ in range(passes)]

    def floor_listing() -> list[Any]:
        return [floor_list(listing_env) for _ in range(passes)]

    loops = [
        ("get_instance", len(ids), ours_get, floor_get),
        ("list_by_state, per instance", listed * passes, ours_list, floor_listing),
    ]
    lines = [
        "objects left for the cyclic GC per call, results kept (gc.get_objects(), collector off),",
        "and the rate with the collector on / off (medians of alternating runs):",
        f"  {'':<30} {'ours':>6} {'floor':>6}   {'ours on/off':>11} {'floor on/off':>12}",
    ]
    for name, calls, ours, floor_side in loops:
        left = [tracked_per_call(run, calls) for run in (ours, floor_side)]
        shares = []
        for run in (ours, floor_side):
            on, off = [], []
            for _ in range(bench.settings.repeats):
                on.append(rate_with_collector(run, calls, enabled=True))
                off.append(rate_with_collector(run, calls, enabled=False))
            shares.append(statistics.median(on) / statistics.median(off))
        lines.append(
            f"  {name:<30} {left[0]:>6.2f} {left[1]:>6.2f}   {shares[0]:>11.2f} {shares[1]:>12.2f}"
        )
    return lines
