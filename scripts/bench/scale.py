"""``--scale SIZES`` and ``--memory``: how rates and memory grow with the store.

``--scale 10k,1M,10M`` grows one store to each size in turn (batches of 10k, no fsync, then
compacted to one snapshot and the WAL after it, and synced), and at each size a fresh process
opens it with the default config and times: a first pass of ``lookups`` random gets, a
second pass over the same ids, ``puts`` durable single puts, and listings of the first
:func:`list_count` matches of one state (repeated to at least 20k instances a repetition).
Before it, another fresh process times the floor's two passes of gets on the same file
(:func:`measure_floor_gets`), so that what the memory hierarchy costs a lookup at 10M is
measured, not assumed. After each step it reads its resident memory from
``/proc/self/status``: anonymous (``RssAnon``: the heap, what the process itself keeps) and
file-backed (``RssFile``: LMDB's map, which the kernel may drop at will) apart. The goal
(SPEC.md): each rate at the largest size ≥ 0.7 x at the smallest, anonymous memory flat
(here: growing by at most :data:`FLAT_ANON_BYTES`).

``--memory`` builds a store of ``--memory-instances`` (1M) and, each in a fresh process,
lists a whole state lazily (``iter_by_state``), runs ``verify()``, ``create_snapshot()``,
and replays the whole WAL on open (``indexes/`` deleted), while a thread samples the
process's memory every :data:`SAMPLE_SECONDS`: the peaks of anonymous and file-backed
memory over the step, against the figure just before it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.data import BATCH_SIZE, instance_fields, instance_id, make_instance
from bench.floor import FloorEnv
from bench.gets import run_floor_gets
from bench.listing import listing_rounds
from bench.stores import Bench, fast_config, open_ours, put_batches, remove_snapshot, sync_tree
from bench.timing import rate
from rstmdb_storage import Storage
from rstmdb_storage.config import INDEXES_DIR
from rstmdb_storage.snapshots import DATA_SUFFIX

SCALE_GOAL = 0.7
FLAT_ANON_BYTES = 32 << 20
SAMPLE_SECONDS = 0.005
LIST_STATE = "paid"
"""One state in four of the scale store's instances (:func:`bench.data.instance_fields`)."""
PASSES = ("get, first pass", "get, second pass")
"""The two passes of random gets over the same ids: the first faults the mapped pages in."""


def memory_now() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
    return out


class Peaks:
    """Samples :func:`memory_now` in a thread while the ``with`` block runs."""

    def __init__(self) -> None:
        self.before = memory_now()
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            for name, value in memory_now().items():
                self.peak[name] = max(self.peak[name], value)

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        for name, value in memory_now().items():
            self.peak[name] = max(self.peak[name], value)


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a fresh 'spawn' process (its memory its own), its result."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(function, *args).result()


def scale_fields(i: int) -> dict[str, Any]:
    return instance_fields(instance_id("scale", i), i)


def fill_store(data_dir: str, start: int, stop: int, compact: bool = False) -> None:
    """Grow the store from ``start`` to ``stop`` instances, in batches, without fsync; with
    *compact*, then leave it as a store that kept up with its maintenance would be: one
    snapshot of it, and the WAL from there on.

    Without that, a store grown to 10M without compaction holds some 30 WAL segments, more
    than ``max_wal_segments``, so the first background pass of the measuring process starts
    the snapshot that compaction forces: a copy of the whole 5 GB file, under the timings of
    gets and puts (durable puts at 10M kept 0.29 of their 10k rate so)."""
    config = fast_config(Path(data_dir))
    with Storage.open(config) as storage:
        put_batches(storage, (scale_fields(i) for i in range(start, stop)))
        storage.checkpoint()
    if compact:
        with Storage.open(dataclasses.replace(config, snapshots_kept=1)) as storage:
            storage.compact()
    sync_tree(Path(data_dir))


def list_count(sizes: tuple[int, ...], list_matches: int) -> int:
    """Matches listed at every size: ``list_matches``, or fewer if the smallest store holds
    fewer in the state."""
    return max(1, min(list_matches, min(sizes) // 4))


def measure_floor_gets(data_dir: str, size: int, lookups: int) -> dict[str, float]:
    """In a fresh process: the floor's two passes of random gets on the same file
    (:func:`bench.gets.run_floor_gets`, a read transaction per call, on the store's own
    ``indexes/`` opened read-only), over other ids than ours, so that what a first pass costs
    is the memory hierarchy's, not the code's."""
    env = FloorEnv(Path(data_dir) / INDEXES_DIR, read_only=True)
    try:
        rng = random.Random(-size)
        ids = [instance_id("scale", rng.randrange(size)) for _ in range(lookups)]
        return {step: run_floor_gets(env, ids, one_txn=False) for step in PASSES}
    finally:
        env.close()


def measure_size(data_dir: str, size: int, counts: dict[str, int], repeats: int) -> dict:
    """In a fresh process: the timings and memory of one size (see the module docstring)."""
    memory = {"open": {}}
    storage = open_ours(Path(data_dir))
    try:
        memory["open"] = memory_now()
        rng = random.Random(size)
        ids = [instance_id("scale", rng.randrange(size)) for _ in range(counts["lookups"])]
        get, rates = storage.get_instance, {}

        def gets() -> None:
            for iid in ids:
                get(iid)

        for step in PASSES:
            rates[step] = rate(len(ids), gets)
            memory[step] = memory_now()
        put, taken = storage.put_instance, [0]

        def puts() -> float:
            base = taken[0]
            taken[0] += counts["puts"]
            insts = [
                make_instance(instance_fields(instance_id(f"scale-put-{size}", i), i))
                for i in range(base, base + counts["puts"])
            ]

            def run() -> None:
                for inst in insts:
                    put(inst)

            return rate(len(insts), run)

        rates["durable put"] = sorted(puts() for _ in range(repeats))[repeats // 2]
        memory["durable put"] = memory_now()
        n, rounds = counts["list"], listing_rounds(counts["list"])

        def listing() -> None:
            for _ in range(rounds):
                if len(storage.list_by_state("order", LIST_STATE, limit=n)) != n:
                    raise RuntimeError("scale: short listing")

        rates["list_by_state"] = sorted(rate(n * rounds, listing) for _ in range(repeats))[
            repeats // 2
        ]
        memory["list_by_state"] = memory_now()
    finally:
        storage.close()
    return {"size": size, "rates": rates, "memory": memory}


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f}"


def run_scale(bench: Bench) -> tuple[dict[str, Any], list[str]]:
    """``--scale``: the figures for the JSON, and the lines printed."""
    settings = bench.settings
    sizes = settings.scale
    data_dir = str(bench.path("ours-scale"))
    counts = {
        "lookups": settings.lookups,
        "puts": settings.puts,
        "list": list_count(sizes, settings.list_matches),
    }
    measured, filled = [], 0
    for size in sizes:
        in_child(fill_store, data_dir, filled, size, True)
        filled = size
        floor_gets = in_child(measure_floor_gets, data_dir, size, counts["lookups"])
        measured.append(in_child(measure_size, data_dir, size, counts, settings.repeats))
        measured[-1]["floor"] = floor_gets
        print(f"  --scale: {size:,} instances measured")
    steps = list(measured[0]["rates"])
    lines = [
        f"scale (a fresh process per size; {counts['lookups']:,} random gets a pass, "
        f"{counts['puts']:,} durable puts, listings of {counts['list']:,} matches; memory in "
        f"MiB, RssAnon / RssFile after each step):",
        "  "
        + f"{'instances':>12}"
        + "".join(f"  {step:>17}" for step in steps)
        + "  anon MiB after each step / file MiB at the end",
    ]
    for m in measured:
        anon = " ".join(mib(m["memory"][s]["RssAnon"]) for s in ("open", *steps))
        lines.append(
            f"  {m['size']:>12,}"
            + "".join(f"  {m['rates'][s]:>17,.0f}" for s in steps)
            + f"  {anon} / {mib(m['memory'][steps[-1]]['RssFile'])}"
        )
    first, last = measured[0], measured[-1]
    ratios = {s: last["rates"][s] / first["rates"][s] for s in steps}
    growth = last["memory"][steps[-1]]["RssAnon"] - first["memory"][steps[-1]]["RssAnon"]
    flat = growth <= FLAT_ANON_BYTES
    lines.append(
        f"  {last['size']:,} / {first['size']:,}: "
        + ", ".join(
            f"{s} {r:.2f} ({'met' if r >= SCALE_GOAL else 'NO'})" for s, r in ratios.items()
        )
        + f" (goal ≥ {SCALE_GOAL}); anonymous memory {growth / (1 << 20):+,.1f} MiB "
        f"({'flat' if flat else 'NOT flat'}: goal ≤ {FLAT_ANON_BYTES >> 20} MiB of growth)"
    )
    floor_steps = list(first["floor"])
    floor_ratios = {s: last["floor"][s] / first["floor"][s] for s in floor_steps}
    lines.append(
        "  the floor's gets (raw LMDB on the same file, other random ids, a fresh process): "
        + ", ".join(
            f"{s}: "
            + " / ".join(f"{m['floor'][s]:,.0f}" for m in measured)
            + f" ({floor_ratios[s]:.2f})"
            for s in floor_steps
        )
        + "; ours / the floor at the largest size: "
        + ", ".join(f"{s} {last['rates'][s] / last['floor'][s]:.2f}" for s in PASSES)
    )
    figures = {
        "sizes": list(sizes),
        "counts": counts,
        "measured": measured,
        "ratio_largest_to_smallest": ratios,
        "floor_ratio_largest_to_smallest": floor_ratios,
        "goal": SCALE_GOAL,
        "anon_growth_bytes": growth,
        "anon_flat": flat,
    }
    return figures, lines


# --- --memory -----------------------------------------------------------------------------------


def memory_step(data_dir: str, step: str) -> dict[str, Any]:
    """In a fresh process: one step of ``--memory`` with its memory sampled."""
    if step == "replay on open":  # from the WAL alone: no indexes/, no snapshot to start from
        shutil.rmtree(Path(data_dir) / "indexes")
        for snapshot in (Path(data_dir) / "snapshots").glob(f"*{DATA_SUFFIX}"):
            remove_snapshot(
                Path(data_dir), SimpleNamespace(name=snapshot.name[: -len(DATA_SUFFIX)])
            )
        with Peaks() as peaks:
            start = time.perf_counter()
            storage = Storage.open(fast_config(Path(data_dir)))
            took = time.perf_counter() - start
        storage.close()
        return {"seconds": took, "before": peaks.before, "peak": peaks.peak}
    storage = Storage.open(fast_config(Path(data_dir)))
    try:
        with Peaks() as peaks:
            start = time.perf_counter()
            if step == "iter_by_state":
                detail = sum(1 for _ in storage.iter_by_state("order", LIST_STATE))
            elif step == "verify":
                detail = len(storage.verify())
            else:
                detail = storage.create_snapshot().instances
            took = time.perf_counter() - start
    finally:
        storage.close()
    return {"seconds": took, "before": peaks.before, "peak": peaks.peak, "detail": detail}


MEMORY_STEPS = {
    "iter_by_state": "instances listed",
    "verify": "findings",
    "create_snapshot": "instances in the snapshot",
    "replay on open": "",
}


def run_memory(bench: Bench) -> tuple[dict[str, Any], list[str]]:
    """``--memory``: the figures for the JSON, and the lines printed."""
    n = bench.settings.memory_instances
    data_dir = str(bench.path("ours-memory"))
    in_child(fill_store, data_dir, 0, n)
    figures: dict[str, Any] = {"instances": n, "steps": {}}
    lines = [
        f"memory of a {n:,}-instance store (a fresh process per step; MiB, before the step -> "
        f"its peak, sampled every {SAMPLE_SECONDS * 1000:g} ms):",
        f"  {'step':<16} {'seconds':>8}  {'anon':>15}  {'file':>15}  {'VmHWM':>7}  detail",
    ]
    for step, what in MEMORY_STEPS.items():
        m = in_child(memory_step, data_dir, step)
        figures["steps"][step] = m
        b, p = m["before"], m["peak"]
        detail = (
            f"{m['detail']:,} {what}"
            if "detail" in m
            else f"{-(-n // BATCH_SIZE):,} WAL records of {BATCH_SIZE:,} puts"
        )
        lines.append(
            f"  {step:<16} {m['seconds']:>8.1f}  "
            f"{mib(b['RssAnon']):>6} -> {mib(p['RssAnon']):>6}  "
            f"{mib(b['RssFile']):>6} -> {mib(p['RssFile']):>6}  {mib(p['VmHWM']):>7}  {detail}"
        )
    return figures, lines
