"""What every command shares: how it opens a store, how errors become one line and an exit code,
and how results are printed.

Exit codes (the README and ``docs/operations.md`` have the same table):

====  ==========================================================================================
0     done; nothing wrong found
1     a problem found (``verify``, ``snapshots``), an operation that failed (a conflict, an
      absent instance, damage), a store that needs recovery
2     bad usage: an unknown option, bad input, or a path that is not a data directory
====  ==========================================================================================
"""

from __future__ import annotations

import csv
import datetime
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

import click

from ..config import StorageConfig
from ..errors import (
    ConfigError,
    CorruptionError,
    InvalidInputError,
    InvalidTypeError,
    NotAStoreError,
    StorageError,
)
from ..jsonable import to_json
from ..storage import Storage

EXIT_PROBLEM = 1
EXIT_USAGE = 2

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

data_dir_argument = click.argument("data_dir", type=click.Path(file_okay=True, dir_okay=True))
json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON document")


class Failed(Exception):
    """An expected failure a command reports itself: one line on stderr, then *code*."""

    def __init__(self, message: str, code: int = EXIT_PROBLEM) -> None:
        super().__init__(message)
        self.code = code


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the store's typed errors into ``error: ...`` on stderr and an exit code; a
    traceback means a bug."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Failed as exc:
            _fail(str(exc), exc.code)
        except (NotAStoreError, ConfigError, InvalidInputError, InvalidTypeError) as exc:
            _fail(str(exc), EXIT_USAGE)
        except StorageError as exc:
            _fail(str(exc), EXIT_PROBLEM)
        except BrokenPipeError:
            sys.stderr.close()  # `... | head`: the reader has what it wanted
            sys.exit(0)

    return wrapper


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


# --- opening --------------------------------------------------------------------------------


@contextmanager
def inspecting(data_dir: str, *, stale_ok: bool = False) -> Iterator[Storage]:
    """Open *data_dir* read-only, for a command that must change nothing: no replay, no
    rebuild, no file but the lock files touched. A store that needs recovery is refused
    (exit 1, naming the command that recovers it) unless *stale_ok*, for commands that report
    it themselves."""
    try:
        storage = Storage.open(StorageConfig(data_dir=data_dir, read_only=True))
    except CorruptionError as exc:
        raise Failed(
            f"{data_dir} needs recovery: {exc}; run `rstmdb-storage recover {data_dir}` "
            f"(a damaged data.mdb is moved aside and rebuilt from the snapshots and WAL)"
        ) from exc
    with storage:
        reason = None if stale_ok else storage.recovery_needed()  # those commands ask it
        if reason is not None:
            raise Failed(f"{data_dir} needs recovery: {reason}")
        yield storage


@contextmanager
def changing(data_dir: str, *, create: bool = False) -> Iterator[Storage]:
    """Open *data_dir* for writing (replaying and, if needed, rebuilding it), showing that
    progress; never creates a store unless *create*."""
    with ProgressBars() as bars:
        storage = Storage.open(StorageConfig(data_dir=data_dir, create=create), progress=bars)
    with storage:
        yield storage


class ProgressBars:
    """Turns the store's ``progress(step, done, total)`` calls into one progress bar per step
    on stderr, only when stderr is a terminal (a count for a step of unknown size)."""

    def __init__(self) -> None:
        self.shown = sys.stderr.isatty()
        self._step: str | None = None
        self._bar: Any = None
        self._done = 0

    def __call__(self, step: str, done: int, total: int) -> None:
        if not self.shown:
            return
        if step != self._step:
            self.close()
            self._step = step
            if total:
                self._bar = click.progressbar(length=total, label=step, file=sys.stderr)
                self._bar.__enter__()
        if self._bar is not None:
            self._bar.update(done - self._done)
        self._done = done

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
        elif self._done:
            click.echo(f"{self._step}: {self._done}", err=True)
        self._step, self._bar, self._done = None, None, 0


# --- input ----------------------------------------------------------------------------------


def parse_time(text: str) -> int:
    """Unix milliseconds from an integer or an ISO 8601 time (UTC when it names no zone)."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError as exc:
        raise Failed(
            f"not a time: {text!r} (give Unix milliseconds or ISO 8601, e.g. 2026-11-25T14:30:00Z)",
            EXIT_USAGE,
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


def parse_label(text: str) -> Any:
    """A metadata label value: a JSON number, ``true``/``false`` or a quoted string as such;
    any other text as a string (``priority=5`` is the int 5, ``code='"5"'`` the string)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str | int | float | bool) else text


# --- output ---------------------------------------------------------------------------------


def dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON: bytes and non-finite floats as :mod:`rstmdb_storage.jsonable` writes them."""
    return json.dumps(to_json(value), indent=indent, allow_nan=False, ensure_ascii=False)


def print_report(report: dict[str, Any], as_json: bool) -> None:
    """A reporting command's result: one JSON document, or ``key: value`` lines."""
    if as_json:
        click.echo(dumps(report, indent=2))
        return
    for key, value in report.items():
        shown = value if isinstance(value, str | int | float) else dumps(value)
        click.echo(f"{key}: {shown}")


FORMATS = ("json", "jsonl", "csv", "table")
format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="output format [table on a terminal, jsonl when piped]",
)


def print_rows(
    rows: Iterable[dict[str, Any]],
    fmt: str | None,
    columns: list[str],
    next_cursor: str | None = None,
) -> None:
    """A listing: *rows* (streamed, except for ``table`` and ``json``) in *fmt*. ``table``
    and ``csv`` show *columns*; ``json`` and ``jsonl`` every key. The cursor of the next page,
    if any, goes into the ``json`` document and, for the other formats, onto stderr."""
    fmt = fmt or ("table" if sys.stdout.isatty() else "jsonl")
    if fmt == "json":
        document: Any = list(rows)
        if next_cursor is not None:
            document = {"items": document, "next_cursor": next_cursor}
        click.echo(dumps(document, indent=2))
        return
    if fmt == "jsonl":
        for row in rows:
            click.echo(dumps(row))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(column)) for column in columns])
    else:
        _print_table([[_cell(row.get(column)) for column in columns] for row in rows], columns)
    if next_cursor is not None:
        click.echo(f"next page: --cursor {next_cursor}", err=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return dumps(value) if isinstance(value, float) else str(value)
    return dumps(value)


def _print_table(cells: list[list[str]], columns: list[str]) -> None:
    widths = [
        max([len(column)] + [len(row[i]) for row in cells]) for i, column in enumerate(columns)
    ]
    for row in [columns, ["-" * width for width in widths], *cells]:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo(line.rstrip())
