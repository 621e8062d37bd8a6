"""What a run prints: the facts about the machine first, then the table and the notes under
it; and the same as JSON (:func:`results_json`)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import crc32c
import lmdb

import rstmdb_storage
from bench.ceiling import encode_record
from bench.comparisons import NAMES, RATE, RATIO_CONTENDERS, Result
from bench.data import BATCH_SIZE, LIST_STATES, instance_fields, instance_id
from bench.processes import mp_notes, usable_cores
from bench.settings import Settings
from bench.stores import Bench


def filesystem_of(path: Path) -> str:
    """The mount point and type holding ``path``, from /proc/mounts."""
    best = ("?", "?")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _, mount_point, fs_type, *_ = line.split()
                if str(path).startswith(mount_point) and len(mount_point) >= len(best[0]):
                    best = (mount_point, fs_type)
    except OSError:
        pass
    return f"{best[1]} (mounted on {best[0]})"


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def package_facts() -> str:
    version = getattr(rstmdb_storage, "__version__", None) or version_of("rstmdb-storage")
    return f"{version} from {Path(rstmdb_storage.__file__ or '?').parent}"


def machine_facts(workdir: Path, settings: Settings) -> list[tuple[str, str]]:
    return [
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("platform", platform.platform()),
        ("cores", f"{os.cpu_count()} ({usable_cores()} usable)"),
        ("lmdb", f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}"),
        ("cbor2", version_of("cbor2")),
        ("diskcache", version_of("diskcache")),
        ("crc32c", f"{version_of('crc32c')} (hardware: {crc32c.hardware_based})"),
        ("sqlite", sqlite3.sqlite_version),
        ("rstmdb-storage", package_facts()),
        ("work dir", f"{workdir} on {filesystem_of(workdir)}"),
        ("record", f"{len(encode_record(instance_fields(instance_id('order', 0), 0), 1))} bytes"),
        (
            "counts",
            f"repeats={settings.repeats} records={settings.records} "
            f"lookups={settings.lookups} puts={settings.puts} "
            f"batches={settings.batches}x{BATCH_SIZE} "
            f"list={settings.list_matches} of {settings.list_matches * len(LIST_STATES)} "
            f"snapshot-instances={settings.snapshot_instances} "
            f"replay-records={settings.replay_records} mp-seconds={settings.mp_seconds:g}",
        ),
    ]


def print_facts(workdir: Path, settings: Settings) -> None:
    for name, value in machine_facts(workdir, settings):
        print(f"{name:>15}: {value}")
    if "tmpfs" in filesystem_of(workdir):
        print("warning: the work dir is on tmpfs; fsync figures mean nothing there")
    print()


def format_rate(value: float) -> str:
    """Whole ops/s with separators; three significant digits below 100 (snapshot rows)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


HEADER = (
    "path",
    "unit",
    "ours",
    "floor",
    "ceiling",
    "SQLite",
    "diskcache",
    "ours/floor",
    "ours/ceiling",
    "ours/SQLite",
    "met",
)
RIGHT = frozenset(range(2, 10))


def shown_ratio(ratio: float, verdict: tuple[Any, float, bool] | None) -> str:
    """Two decimals; three when two would round a missed goal up to its threshold (0.898
    against 0.9 is not "0.90 NO")."""
    shown = f"{ratio:.2f}"
    if verdict is not None:
        goal, _, met = verdict
        if not met and float(shown) >= goal.at_least:
            shown = f"{ratio:.3f}"
    return shown


def cells(result: Result) -> tuple[str, ...]:
    """One row of the table: the rates, the ratios, each with its goal and verdict next to
    it, and whether every goal is met (``-``: the row has none)."""
    rates, verdict = result.rates, {g.against: (g, v, m) for g, v, m in result.verdicts()}

    def with_goal(against: str, shown: str) -> str:
        if against not in verdict:
            return shown
        goal, _, met = verdict[against]
        return f"{shown} ({goal.describe()} {'met' if met else 'NO'})"

    ours = with_goal(RATE, format_rate(rates["ours"]))
    extra = [
        f"{name}: {format_rate(rate)}"
        for name, rate in rates.items()
        if name != "ours" and name not in NAMES
    ]
    ours += "".join(f"; {e}" for e in extra)
    side = [format_rate(rates[k]) if k in rates else "-" for k in NAMES]
    ratios = []
    for k in RATIO_CONTENDERS:
        ratio = result.ratio(k)
        ratios.append("-" if ratio is None else with_goal(k, shown_ratio(ratio, verdict.get(k))))
    met = "-" if not result.row.goals else "NO" if result.missed() else "yes"
    return (result.row.path, result.row.unit, ours, *side, *ratios, met)


def print_table(results: Sequence[Result]) -> None:
    lines = [HEADER, *(cells(r) for r in results)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    for n, line in enumerate(lines):
        parts = [
            c.rjust(w) if i in RIGHT else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(parts).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def markdown_table(results: Sequence[Result]) -> list[str]:
    align = ["---" if i not in RIGHT else "---:" for i in range(len(HEADER))]
    rows = [HEADER, tuple(align), *(cells(r) for r in results)]
    return ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def table_notes(bench: Bench, results: Sequence[Result]) -> list[str]:
    """The lines under the table that say what the rows that ran measure."""
    settings, rows = bench.settings, [r.row for r in results]
    lines = [
        "rates are medians over the repetitions, every side in rotation within each; a ratio "
        "is ours / that contender's rate (higher is better for ours)"
    ]
    if any("_by_state" in row.path for row in rows):
        lines.append("listing rows: ops/s are instances listed (and decoded) per second")
    if any(row.unit == "copies/s" for row in rows):
        lines.append(
            f"snapshot row: whole copies of the {settings.snapshot_instances:,}-instance store "
            f"per second (1 / seconds), so ours / ceiling is time(cp + fsync) / time(snapshot)"
        )
    if any(row.unit == "records/s" for row in rows):
        lines.append(
            f"replay row: WAL records applied per second, rebuilding a lost indexes/ from "
            f"{settings.replay_records:,} single-instance records; the ceiling reads the frames"
        )
    if any(not row.goals for row in rows):
        lines.append("rows without a goal are shown for information")
    lines += [
        f"{r.row.path}: misses its goal: {r.row.why_short}"
        for r in results
        if r.missed() and r.row.why_short
    ]
    return lines + mp_notes(bench, [row.run for row in rows])


def print_results(
    bench: Bench, results: Sequence[Result], section_lines: list[str], took: float
) -> None:
    """Everything after the progress lines: the table, the notes and the sections' lines."""
    print()
    print(f"medians of {bench.settings.repeats} repetitions, in {took:.0f} s")
    if results:
        print_table(results)
    for line in table_notes(bench, results) + section_lines:
        print(line)


def results_json(
    bench: Bench, results: Sequence[Result], extra: dict[str, Any], took: float
) -> dict[str, Any]:
    """Everything a run measured, for ``--json``: the date, the machine facts, the counts, each
    row (see :meth:`Result.to_json`) and the scale and memory figures when they ran."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(took, 1),
        "facts": dict(machine_facts(bench.workdir, bench.settings)),
        "repeats": bench.settings.repeats,
        "rows": [r.to_json() for r in results],
        **extra,
    }
