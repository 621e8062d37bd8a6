"""What a run prints: the facts about the machine first, then the table and the notes under it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import crc32c
import lmdb

import rstmdb_storage
from bench.ceiling import encode_record
from bench.comparisons import Comparison
from bench.data import BATCH_SIZE, LIST_STATES, instance_fields, instance_id
from bench.processes import mp_notes, usable_cores
from bench.settings import Settings
from bench.stores import Bench

Row = tuple[Comparison, float, float]
"""A comparison that ran, with its two median rates (ours, the other)."""


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


def print_table(rows: Sequence[Row]) -> None:
    header = ("what", "against", "ours ops/s", "other ops/s", "ratio", "goal", "met?")
    lines = [header]
    for comp, ours, other in rows:
        ratio = ours / other
        lines.append(
            (
                comp.what,
                comp.against,
                format_rate(ours),
                format_rate(other),
                f"{ratio:.2f}",
                "-" if comp.goal is None else f">= {comp.goal:g}",
                "-" if comp.goal is None else "yes" if ratio >= comp.goal else "NO",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {2, 3, 4}
    for n, line in enumerate(lines):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def table_notes(bench: Bench, rows: Sequence[Row]) -> list[str]:
    """The lines under the table that say what the rows that ran measure."""
    settings, comps = bench.settings, [comp for comp, _, _ in rows]
    lines = []
    if any("_by_state" in comp.what for comp in comps):
        lines.append("listing rows: ops/s are instances listed (and decoded) per second")
    if any(comp.what == "create_snapshot" for comp in comps):
        lines.append(
            f"create_snapshot rows: ops/s are whole copies of the "
            f"{settings.snapshot_instances:,}-instance store per second (1 / seconds), "
            f"so the ratio is time(copy) / time(snapshot); >= 0.5 is 'at most 2x cp'"
        )
    if any(comp.what == "WAL replay on open" for comp in comps):
        lines.append(
            f"replay rows: ops/s are WAL records applied per second, rebuilding a lost "
            f"indexes/ from {settings.replay_records:,} single-instance records"
        )
    if any(comp.goal is None for comp in comps):
        lines.append("rows without a goal are shown for information")
    return lines + mp_notes(bench, [comp.run for comp in comps])


def print_results(bench: Bench, rows: Sequence[Row], section_lines: list[str], took: float) -> None:
    """Everything after the progress lines: the table, the notes and the sections' lines."""
    print()
    print(f"medians of {bench.settings.repeats} repetitions, in {took:.0f} s")
    if rows:
        print_table(rows)
    for line in table_notes(bench, rows) + section_lines:
        print(line)
