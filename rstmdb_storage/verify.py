"""Checks that return findings: every stored value against its checksum, the WAL from its first
segment to the applied sequence, and the meta table. Nothing is repaired here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .codec import decode_instance
from .errors import CorruptionError, InvalidInputError, InvalidTypeError
from .model import check_instance
from .wal import Wal


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing wrong: where (a file and offset, or a sub-database and key) and what."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def check_instances(
    pages: Iterable[list[tuple[bytes, bytes]]], applied_seq: int
) -> Iterator[Finding]:
    """Every instance decodes, passes its CRC, has fields a write would accept, and was
    written by an applied record."""
    for page in pages:
        for key, raw in page:
            try:
                inst = decode_instance(key, raw)
            except CorruptionError as exc:
                yield Finding(f"instances[{key!r}]", str(exc))
                continue
            try:
                check_instance(inst)  # the CRC passed; are the fields what a write allows?
            except (InvalidInputError, InvalidTypeError) as exc:
                yield Finding(f"instances[{key!r}]", f"stored fields are not valid: {exc}")
            if inst.last_wal_offset is None or inst.last_wal_offset > applied_seq:
                yield Finding(
                    f"instances[{key!r}]",
                    f"last_wal_offset {inst.last_wal_offset} is beyond the applied "
                    f"sequence {applied_seq}",
                )


def check_wal(wal: Wal, applied_seq: int) -> Iterator[Finding]:
    """Every record from the first segment present up to *applied_seq* is readable, in order,
    with its CRC; sealed segments match their seal."""
    ids = wal.segment_ids()
    if not ids:
        yield Finding(str(wal.directory), "no WAL segments")
        return
    try:
        for _ in wal.records(ids[0], applied_seq):
            pass
    except CorruptionError as exc:
        where = f"{exc.path} at offset {exc.offset}" if exc.path else str(wal.directory)
        yield Finding(where, str(exc))


def run_checks(checks: Iterable[Callable[[], Iterator[Finding]]]) -> list[Finding]:
    findings: list[Finding] = []
    for check in checks:
        try:
            findings.extend(check())
        except CorruptionError as exc:
            findings.append(Finding("store", str(exc)))
    return findings
