"""The run: check the API, run the comparisons and sections, print, exit 1 on problems."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.ceiling import wal_payload
from bench.comparisons import COMPARISONS, SECTIONS
from bench.data import fields_of, make_instance
from bench.report import Row, print_facts, print_results
from bench.settings import parse_args, settings_from
from bench.stores import Bench
from rstmdb_storage import Storage, StorageConfig


def check_api(bench: Bench) -> list[str]:
    """Cheap checks, on a small store of its own, that the package behaves as assumed here,
    and writes the WAL records that the ceilings write (:func:`bench.ceiling.wal_payload`)."""
    problems: list[str] = []
    path = bench.path("ours-check")
    with Storage.open(StorageConfig(data_dir=str(path))) as storage:
        fields = fields_of("check", range(3))
        seqs = [storage.put_instance(make_instance(f)) for f in fields[:2]]
        if not all(isinstance(seq, int) for seq in seqs) or seqs[0] >= seqs[1]:
            problems.append(f"put_instance returned {seqs!r}, not increasing ints")
        else:
            # the ceilings frame wal_payload() with the WAL's own encoder: the same bytes if
            # the payloads are the same
            (record,) = storage.read_wal(seqs[0], limit=1)
            if record.payload != wal_payload(fields[0]):
                problems.append(
                    f"the WAL payload of a put ({len(record.payload)} bytes) is not the "
                    f"ceilings' ({len(wal_payload(fields[0]))} bytes)"
                )
        got = storage.get_instance(fields[0]["id"])
        if got is None:
            problems.append("get_instance returned None for an instance just put")
        else:
            for name, value in fields[0].items():
                if getattr(got, name, None) != value:
                    problems.append(f"get_instance: {name} is {getattr(got, name, None)!r}")
        if storage.get_instance("no-such-id") is not None:
            problems.append("get_instance of an absent id did not return None")
        with storage.batch() as b:
            b.put_instance(make_instance(fields[2]))
            b.delete_instance(fields[1]["id"])
        if storage.get_instance(fields[2]["id"]) is None:
            problems.append("batch: put_instance not visible after the batch")
        if storage.get_instance(fields[1]["id"]) is not None:
            problems.append("batch: delete_instance did not delete")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines interleave with tracebacks
    settings = settings_from(args)

    def selected(name: str) -> bool:
        return not args.only or any(text in name for text in args.only)

    comparisons = [c for c in COMPARISONS if selected(c.name)]
    sections = [s for s in SECTIONS if selected(s.name)]
    workdir = Path(tempfile.mkdtemp(prefix=".bench-", dir=args.tmp_dir))
    bench = Bench(workdir, settings)
    problems: list[str] = []
    try:
        print_facts(workdir, settings)
        started = time.perf_counter()
        try:
            problems += check_api(bench)
        except Exception as exc:
            traceback.print_exc()
            problems.append(f"API check: {exc!r}")
        rows: list[Row] = []
        for comp in comparisons:
            t0 = time.perf_counter()
            try:
                ours, other = comp.run(bench)
            except Exception as exc:  # report it and go on with the other comparisons
                traceback.print_exc()
                problems.append(f"{comp.name}: {exc!r}")
                continue
            rows.append((comp, ours, other))
            took = time.perf_counter() - t0
            print(f"  {comp.name}: {ours / other:.2f} ({took:.1f} s)")
        section_lines: list[str] = []
        for section in sections:
            t0 = time.perf_counter()
            try:
                section_lines += ["", *section.run(bench)]
            except Exception as exc:
                traceback.print_exc()
                problems.append(f"{section.name}: {exc!r}")
                continue
            print(f"  {section.name} ({time.perf_counter() - t0:.1f} s)")
        print_results(bench, rows, section_lines, time.perf_counter() - started)
    finally:
        problems += bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0
