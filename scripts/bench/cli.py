"""The run: check the API, run the rows and sections (and ``--scale``, ``--memory``), print,
write ``--json``, ``--chart`` and ``--readme``, exit 1 on problems."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import floor
from bench.ceiling import wal_payload
from bench.chart import write_chart
from bench.comparisons import NAMES, ROWS, SECTIONS, Result, Row, Section
from bench.data import fields_of, make_instance
from bench.readme import rewrite_readme
from bench.replication import run_replication
from bench.report import print_facts, print_results, results_json, table_notes
from bench.scale import run_memory, run_scale
from bench.settings import REPO_ROOT, parse_args, settings_from
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
    return problems + check_floor_layout(fields[0])


def check_floor_layout(fields: dict[str, Any]) -> list[str]:
    """The floor (:mod:`bench.floor`) writes the store's layout: the same instance value and
    the same index keys as the store's codec and indexes, for one instance. (The store's
    modules are imported here only, so a change of their names reports a problem, not a crash.)"""
    inst, key, seq, now = make_instance(fields), fields["id"].encode(), 7, 1_767_225_600_000
    try:
        from rstmdb_storage.codec import encode_instance_body, encode_instance_value
        from rstmdb_storage.store.indexes import index_entries

        ours_value = encode_instance_value(key, seq, now, now, encode_instance_body(inst, 1 << 20))
        ours_keys = {
            k for _, k in index_entries(inst.id, inst.machine, inst.state, inst.metadata, now)
        }
    except Exception as exc:
        return [f"floor layout: the store's codec or indexes changed ({exc!r}); check bench.floor"]
    problems = []
    if floor.instance_value(key, seq, now, floor.body_of(inst)) != ours_value:
        problems.append("floor layout: the floor's instance value is not the store's")
    if floor.decode(key, ours_value) != dataclasses.replace(
        inst, last_wal_offset=seq, created_at=now, updated_at=now
    ):
        problems.append("floor layout: the floor decodes the store's value differently")
    floor_keys = {k for _, k in floor.index_keys(inst.machine, inst.state, inst.metadata, key, now)}
    if floor_keys != ours_keys:
        problems.append("floor layout: the floor's index keys are not the store's")
    return problems


def run_rows(bench: Bench, rows: list[Row], problems: list[str]) -> list[Result]:
    """Run each row, printing its progress line; a row that fails is reported and skipped."""
    results = []
    for row in rows:
        t0 = time.perf_counter()
        try:
            rates = row.run(bench)
        except Exception as exc:  # report it and go on with the other rows
            traceback.print_exc()
            problems.append(f"{row.name}: {exc!r}")
            continue
        result = Result(row, rates, time.perf_counter() - t0)
        results.append(result)
        ratios = ", ".join(
            f"/{NAMES.get(k, k)} {result.ratio(k):.2f}" for k in rates if k != "ours"
        )
        print(f"  {row.name}: {ratios} ({result.seconds:.1f} s)")
    return results


def run_sections(bench: Bench, sections: list[Section], problems: list[str]) -> list[str]:
    lines: list[str] = []
    for section in sections:
        t0 = time.perf_counter()
        try:
            lines += ["", *section.run(bench)]
        except Exception as exc:
            traceback.print_exc()
            problems.append(f"{section.name}: {exc!r}")
            continue
        print(f"  {section.name} ({time.perf_counter() - t0:.1f} s)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines interleave with tracebacks
    settings = settings_from(args)

    def selected(name: str) -> bool:
        return not args.only or any(text in name for text in args.only)

    rows = [row for row in ROWS if selected(row.name)]
    sections = [s for s in SECTIONS if selected(s.name)]
    workdir = Path(tempfile.mkdtemp(prefix=".bench-", dir=args.tmp_dir))
    bench = Bench(workdir, settings)
    problems: list[str] = []
    extra: dict[str, Any] = {}
    try:
        print_facts(workdir, settings)
        started = time.perf_counter()
        try:
            problems += check_api(bench)
        except Exception as exc:
            traceback.print_exc()
            problems.append(f"API check: {exc!r}")
        results = run_rows(bench, rows, problems)
        section_lines = run_sections(bench, sections, problems)
        for option, wanted, run in (
            ("scale", settings.scale, run_scale),
            ("memory", settings.memory_instances, run_memory),
            ("replication", settings.replication_instances, run_replication),
        ):
            if wanted:
                t0 = time.perf_counter()
                try:
                    figures, lines = run(bench)
                except Exception as exc:
                    traceback.print_exc()
                    problems.append(f"--{option}: {exc!r}")
                    continue
                extra[option] = figures
                section_lines += ["", *lines]
                print(f"  --{option} ({time.perf_counter() - t0:.1f} s)")
        took = time.perf_counter() - started
        print_results(bench, results, section_lines, took)
        document = results_json(bench, results, extra, took)
        document["notes"] = table_notes(bench, results)
        document["sections"] = section_lines
    finally:
        problems += bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    document["problems"] = problems
    document["quick"] = args.quick
    outputs = write_outputs(args, document, results)
    for line in outputs:
        print(line)
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def write_outputs(args: Any, document: dict[str, Any], results: list[Result]) -> list[str]:
    """``--json``, ``--chart`` and ``--readme``: what was written, one line each."""
    lines = []
    json_path, chart_path = args.json, args.chart
    if args.readme:
        json_path = json_path or REPO_ROOT / "docs" / "bench.json"
        chart_path = chart_path or REPO_ROOT / "docs" / "bench.png"
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
        lines.append(f"wrote {json_path}")
    chart_written = False
    if chart_path:
        note = write_chart(results, chart_path, document["date"])
        chart_written = note is None
        lines.append(note or f"wrote {chart_path}")
    if args.readme:
        readme = REPO_ROOT / "README.md"
        rewrite_readme(readme, document, results, chart_path if chart_written else None)
        lines.append(f"rewrote the figures block of {readme}")
    return lines
