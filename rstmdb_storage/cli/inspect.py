"""Commands that look and change nothing: each opens the store read-only (no replay, no rebuild,
no file touched but the lock files), so they are safe on a live store, a damaged one and a
backup."""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from ..changes import DeleteInstance, IdempotencyKey, PutInstance, PutMachine, WalRecord
from ..errors import CorruptionError
from ..jsonable import instance_to_json
from ..storage import Storage
from .common import (
    CONTEXT,
    EXIT_PROBLEM,
    EXIT_USAGE,
    Failed,
    data_dir_argument,
    dumps,
    format_option,
    inspecting,
    json_option,
    parse_label,
    parse_time,
    print_report,
    print_rows,
    reports_errors,
)

INSTANCE_COLUMNS = ["id", "machine", "version", "state", "status", "updated_at"]
_FOLLOW_POLL_SECONDS = 0.2


def register(main: click.Group) -> None:
    for command in (info, get, list_, wal, snapshots, stats, verify, dump, machines, holds):
        main.add_command(command)


@click.command(context_settings=CONTEXT)
@data_dir_argument
@json_option
@reports_errors
def info(data_dir: str, as_json: bool) -> None:
    """Show what a data directory holds: instances, the applied WAL sequence, segments,
    snapshots and holds. Read-only; exit code 1 when the store needs recovery.

    Example: rstmdb-storage info /var/lib/rstmdb
    """
    with inspecting(data_dir, stale_ok=True) as storage:
        needs_recovery = storage.recovery_needed()
        report = {
            "data_dir": data_dir,
            "instances": storage.count_instances(),
            "applied_seq": storage.applied_seq,
            "pending_records": storage.pending_records(),
            "wal_segments": storage.wal_segments(),
            "snapshots": [manifest.seq for manifest in storage.list_snapshots()],
            "wal_holds": storage.wal_holds(),
            "needs_recovery": needs_recovery,
        }
    print_report(report, as_json)
    exit_if_recovery_needed(data_dir, needs_recovery)


def exit_if_recovery_needed(data_dir: str, reason: str | None) -> None:
    """For the inspections that report on a store needing recovery: say so last, exit 1."""
    if reason is not None:
        click.echo(f"error: {data_dir} needs recovery: {reason}", err=True)
        sys.exit(EXIT_PROBLEM)


@click.command(context_settings=CONTEXT)
@data_dir_argument
@click.argument("instance_id")
@reports_errors
def get(data_dir: str, instance_id: str) -> None:
    """Print one instance as JSON (exit code 1 when absent).

    Example: rstmdb-storage get /var/lib/rstmdb order-1
    """
    with inspecting(data_dir) as storage:
        inst = storage.get_instance(instance_id)
    if inst is None:
        raise Failed(f"no instance {instance_id!r} in {data_dir}")
    click.echo(dumps(instance_to_json(inst), indent=2))


@click.command("list", context_settings=CONTEXT)
@data_dir_argument
@click.option("--state", metavar="MACHINE:STATE", help="instances of MACHINE in STATE")
@click.option("--meta", metavar="KEY[=VALUE]", help="instances whose label KEY is VALUE")
@click.option("--from", "start", metavar="VALUE", help="with --meta KEY: labels >= VALUE")
@click.option("--to", "end", metavar="VALUE", help="with --meta KEY: labels < VALUE")
@click.option("--since", metavar="TIME", help="updated at or after TIME (ms or ISO 8601)")
@click.option("--until", metavar="TIME", help="updated before TIME (ms or ISO 8601)")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--cursor", help="the cursor printed with the previous page")
@click.option("--newest-first", is_flag=True, help="with --since/--until: newest first")
@format_option
@reports_errors
def list_(
    data_dir: str,
    state: str | None,
    meta: str | None,
    start: str | None,
    end: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: str | None,
    newest_first: bool,
    fmt: str | None,
) -> None:
    """List instances by state, by metadata label or by update time, a page at a time; the
    cursor of the next page is printed on stderr (in the document, with --format json).
    Label values are JSON numbers, true/false or "quoted" strings; other text is a string.

    Example: rstmdb-storage list /var/lib/rstmdb --state order:pending --limit 50

    \b
    More:
      rstmdb-storage list DIR --meta customer=alice
      rstmdb-storage list DIR --meta priority --from 5 --to 9
      rstmdb-storage list DIR --since 2026-11-25T00:00:00Z --newest-first
    """
    chosen = [state is not None, meta is not None, since is not None or until is not None]
    if sum(chosen) != 1:
        raise Failed("give exactly one of --state, --meta, or --since/--until", EXIT_USAGE)
    if (start is not None or end is not None) and (meta is None or "=" in meta):
        raise Failed("--from/--to go with --meta KEY (no =VALUE)", EXIT_USAGE)
    if newest_first and not chosen[2]:
        raise Failed("--newest-first goes with --since/--until", EXIT_USAGE)
    with inspecting(data_dir) as storage:
        page_of = {"limit": limit, "cursor": cursor}
        if state is not None:
            machine, sep, state_name = state.partition(":")
            if not sep:
                raise Failed(f"--state needs MACHINE:STATE, got {state!r}", EXIT_USAGE)
            page = storage.list_by_state(machine, state_name, **page_of)
        elif meta is not None:
            key, sep, value = meta.partition("=")
            if sep:
                page = storage.list_by_metadata(key, parse_label(value), **page_of)
            elif start is None and end is None:
                raise Failed("--meta KEY needs =VALUE, or --from and/or --to", EXIT_USAGE)
            else:
                bounds = {"start": start, "end": end}
                bounds = {k: parse_label(v) for k, v in bounds.items() if v is not None}
                page = storage.list_by_metadata(key, **bounds, **page_of)
        else:
            low = parse_time(since) if since is not None else 0
            high = parse_time(until) if until is not None else 2**63 - 1
            page = storage.list_by_time(low, high, newest_first=newest_first, **page_of)
    print_rows(map(instance_to_json, page), fmt, INSTANCE_COLUMNS, page.next_cursor)


@click.command(context_settings=CONTEXT)
@data_dir_argument
@click.option("--from", "from_seq", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="records to print [all]")
@click.option("--follow", "-f", is_flag=True, help="keep printing new records until interrupted")
@format_option
@reports_errors
def wal(data_dir: str, from_seq: int, limit: int | None, follow: bool, fmt: str | None) -> None:
    """Print applied WAL records from a sequence number on: sequence, time, size and what each
    change did. With --follow, wait for new records like `tail -f` (Ctrl-C ends it).

    Example: rstmdb-storage wal /var/lib/rstmdb --from 100 --limit 5

    \b
    More:
      rstmdb-storage wal DIR --follow --from 52118 | jq .changes
    """
    if follow and fmt in ("json", "table", "csv"):
        raise Failed("--follow prints JSON lines (--format jsonl)", EXIT_USAGE)
    with inspecting(data_dir) as storage:
        records = storage.read_wal(from_seq, limit)
        if follow:
            records = _follow(storage, from_seq, limit)
        try:
            print_rows(map(_record_json, records), "jsonl" if follow else fmt, _WAL_COLUMNS)
        except KeyboardInterrupt:
            return


_WAL_COLUMNS = ["seq", "timestamp_ms", "bytes", "changes"]


def _follow(storage: Storage, from_seq: int, limit: int | None) -> Iterator[WalRecord]:
    """Records as they are applied, in order: a new read of the applied sequence each poll.

    Ctrl-C (SIGINT) ends it between polls: a handler notes it instead of raising, so that no
    KeyboardInterrupt cuts a call into the store short, where it could leave a lock or the
    fork gate held and the close after it waiting."""
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: interrupted.append(signum))
    try:
        next_seq, left = from_seq, limit
        while (left is None or left > 0) and not interrupted:
            fresh = storage.applied_seq >= next_seq
            batch = list(storage.read_wal(next_seq, left)) if fresh else []
            yield from batch
            if batch:
                next_seq = batch[-1].seq + 1
                left = None if left is None else left - len(batch)
            else:
                sys.stdout.flush()
                time.sleep(_FOLLOW_POLL_SECONDS)  # a signal's handler runs, the sleep goes on
    finally:
        signal.signal(signal.SIGINT, previous)


def _record_json(record: WalRecord) -> dict[str, Any]:
    changes: list[dict[str, Any]] = []
    for change in record.changes():
        if type(change) is PutInstance:
            changes.append({"op": "put", "id": change.id})
        elif type(change) is DeleteInstance:
            changes.append({"op": "delete", "id": change.id})
        elif type(change) is PutMachine:
            changes.append({"op": "machine", "machine": change.name, "version": change.version})
        elif type(change) is IdempotencyKey:
            changes.append({"op": "idempotency_key", "key": change.key})
    return {
        "seq": record.seq,
        "timestamp_ms": record.timestamp_ms,
        "bytes": len(record.payload),
        "changes": changes,
    }


@click.command(context_settings=CONTEXT)
@data_dir_argument
@format_option
@reports_errors
def snapshots(data_dir: str, fmt: str | None) -> None:
    """List the published snapshots: sequence, size, instances, time, and whether the file
    matches its CRC32C (exit code 1 when one does not).

    Example: rstmdb-storage snapshots /var/lib/rstmdb
    """
    rows, bad = [], 0
    with inspecting(data_dir, stale_ok=True) as storage:
        needs_recovery = storage.recovery_needed()
        for manifest in storage.list_snapshots():
            try:
                storage.check_snapshot(manifest)
                status = "ok"
            except CorruptionError as exc:
                status, bad = f"bad: {exc}", bad + 1
            row = dataclasses.asdict(manifest)
            row["store_id"] = manifest.store_id.hex()
            row["crc32c"] = f"{manifest.crc32c:08x}"
            rows.append({**row, "crc_status": status})
    columns = ["seq", "size", "instances", "created_at_ms", "crc_status"]
    print_rows(rows, fmt, columns)
    exit_if_recovery_needed(data_dir, needs_recovery)
    if bad:
        sys.exit(EXIT_PROBLEM)


@click.command(context_settings=CONTEXT)
@data_dir_argument
@json_option
@reports_errors
def stats(data_dir: str, as_json: bool) -> None:
    """Show sizes and counts: the LMDB map and its use, entries and bytes per table, reader
    slots in use and stale, WAL segments and bytes, snapshot bytes (what mdb_stat shows, plus
    ours).

    Example: rstmdb-storage stats /var/lib/rstmdb --json
    """
    with inspecting(data_dir, stale_ok=True) as storage:
        report = storage.stats()
        needs_recovery = storage.recovery_needed()
    if as_json:
        print_report(report, True)
    else:
        tables = report.pop("tables")
        print_report(report, False)
        print_rows(
            ({"table": name, **table} for name, table in tables.items()),
            "table",
            ["table", "entries", "bytes", "depth", "leaf_pages", "branch_pages", "overflow_pages"],
        )
    exit_if_recovery_needed(data_dir, needs_recovery)


@click.command(context_settings=CONTEXT)
@data_dir_argument
@json_option
@reports_errors
def verify(data_dir: str, as_json: bool) -> None:
    """Check every instance, index, snapshot, the meta table and the WAL, read-only; exit
    code 1 if anything is wrong.

    Example: rstmdb-storage verify /var/lib/rstmdb
    """
    with inspecting(data_dir, stale_ok=True) as storage:
        findings = [{"where": f.where, "problem": f.problem} for f in storage.verify()]
        needs_recovery = storage.recovery_needed()
        if needs_recovery:
            findings.append({"where": "wal", "problem": needs_recovery})
    if as_json:
        click.echo(dumps({"data_dir": data_dir, "problems": findings}, indent=2))
    else:
        for finding in findings:
            click.echo(f"{finding['where']}: {finding['problem']}")
        click.echo(f"{len(findings)} problem(s) found")
    sys.exit(EXIT_PROBLEM if findings else 0)


@click.command(context_settings=CONTEXT)
@data_dir_argument
@reports_errors
def dump(data_dir: str) -> None:
    """Print every machine definition, then every instance, as JSON lines (``"kind"`` says
    which), streaming in constant memory; `rstmdb-storage load` reads it back.

    Example: rstmdb-storage dump /var/lib/rstmdb > rstmdb.jsonl
    """
    with inspecting(data_dir) as storage:
        for machine in storage.list_machines():
            click.echo(dumps({"kind": "machine", **dataclasses.asdict(machine)}))
        for inst in storage.iter_instances():
            click.echo(dumps({"kind": "instance", **instance_to_json(inst)}))


@click.command(context_settings=CONTEXT)
@data_dir_argument
@click.argument("name", required=False)
@format_option
@reports_errors
def machines(data_dir: str, name: str | None, fmt: str | None) -> None:
    """List the stored machine definitions (only NAME's versions, when given).

    Example: rstmdb-storage machines /var/lib/rstmdb order --format json
    """
    with inspecting(data_dir) as storage:
        found = storage.list_machines(name)
    print_rows(map(dataclasses.asdict, found), fmt, ["name", "version", "definition"])


@click.command(context_settings=CONTEXT)
@data_dir_argument
@format_option
@reports_errors
def holds(data_dir: str, fmt: str | None) -> None:
    """List the WAL holds: each keeps the WAL from its sequence number on out of compaction
    (for a backup or shipping in progress); `release-hold` drops one.

    Example: rstmdb-storage holds /var/lib/rstmdb
    """
    with inspecting(data_dir) as storage:
        found = storage.wal_holds()
    rows = ({"name": hold, "from_seq": seq} for hold, seq in sorted(found.items()))
    print_rows(rows, fmt, ["name", "from_seq"])
