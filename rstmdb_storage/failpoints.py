"""Named failpoints: the places where a crash or an error matters, for tests to hit exactly.

The code calls ``failpoint("write.after_append")`` at each step a crash test cares about;
nothing happens unless a test armed that point. Crash tests then place a SIGKILL *between two
named steps* instead of after a guessed sleep (bbolt's and etcd's ``gofail``, reduced to what
this store needs). A point costs one test of an empty dict when nothing is armed.

Arming
------
The environment variable ``RSTMDB_FAILPOINTS``, read when the package is imported (so a test
arms a child process it starts), or :func:`enable` / :func:`disable` in-process::

    RSTMDB_FAILPOINTS="write.after_sync=kill"
    RSTMDB_FAILPOINTS="wal.after_seal=2*off->kill;checkpoint.after_wal_sync=sleep(50)"

Each point takes a chain of *terms* joined by ``->``; a term is ``[count*]action``: it acts on
that many hits (on every hit when no count is given), then the next term takes over; after
the last counted term the point is off again. Actions:

``off``        nothing (with a count: let that many hits pass first)
``kill``       SIGKILL this process, at once: no ``finally``, no ``atexit``, no flush
``raise``      raise :class:`FailpointError` (a ``StorageError``) from the point
``eio``        raise ``OSError(EIO)``: the failed system call the point stands for
``enospc``     raise ``OSError(ENOSPC)``: a full disk there
``sleep(ms)``  pause this thread for *ms* milliseconds
``print``      write ``failpoint NAME`` to stderr (a test reading the child's stderr sees it)

In-process, :func:`enable` also takes a function, called at the next hit: a test makes another
write happen exactly between two steps.

An unknown point or a malformed term is a :class:`~rstmdb_storage.errors.ConfigError`, at
import for the environment variable: a misspelt point would otherwise never fire and a crash
test would pass without crashing anything.

The points (:data:`POINTS` is the list, with what each tests) are named ``room.step``.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError, StorageError

#: every failpoint, and the crash or error it places
POINTS: dict[str, str] = {
    # the one-transaction write path
    "write.after_append": "the WAL record is written, not synced; LMDB not committed",
    "write.after_sync": "the WAL record is durable; the LMDB transaction is not committed",
    "write.after_commit": "the write is committed and visible, not yet acknowledged",
    # group commit
    "group.after_append": "grouped: the record is appended, not synced, not applied",
    "group.after_sync": "grouped: the record is durable, not applied to LMDB",
    "group.after_apply": "grouped: the record is applied, not yet acknowledged",
    # the WAL
    "wal.sync": "a WAL segment is fdatasynced (eio here: its fsync failed)",
    "wal.after_seal": "rotation: the full segment is sealed and synced, the next not created",
    "wal.after_new_segment": "rotation: the next segment exists, empty; the record not written",
    "wal.after_segment_delete": "compaction: one WAL segment deleted, the next not yet",
    # LMDB
    "lmdb.before_grow": "a write found the map full and aborted; the map is not grown yet",
    "lmdb.sync": "a checkpoint flushes data.mdb (eio here: its fsync failed)",
    "checkpoint.after_wal_sync": "checkpoint: the WAL is synced, the checkpoint not recorded",
    "checkpoint.before_lmdb_sync": "checkpoint: recorded in meta, LMDB not flushed to disk",
    "replay.after_chunk": "replay: one chunk of records committed, more to replay",
    # snapshots and compaction
    "snapshot.data.before_rename": "snapshot: the copy is written and synced, not renamed",
    "snapshot.data.after_rename": "snapshot: the copy is renamed, its directory not synced",
    "snapshot.data.after_dir_sync": "snapshot: the copy is in place; no manifest yet",
    "snapshot.manifest.before_rename": "snapshot: the manifest is written, not renamed",
    "snapshot.manifest.after_rename": "snapshot: the manifest is renamed, directory not synced",
    "snapshot.manifest.after_dir_sync": "snapshot: published, not yet listed in LMDB",
    "compact.after_snapshot_delete": "compaction: one snapshot's files deleted, the next not",
    # recovery
    "repair.after_copy_aside": "repair: the torn segment is copied aside, not yet cut",
    "restore.mid_copy": "restore/backup: the first WAL segment is copied, the rest not",
    # replication
    "ship.after_upload": "shipping: a segment is in the bucket, the hold not moved past it",
    "follow.after_adopt": "replica: a shipped segment is in its WAL, not applied to LMDB",
    # races
    "transition.after_key_check": "transition: its idempotency key is not known yet, the "
    "instance not read",
    "rebuild.after_move_aside": "rebuild: the damaged indexes/ is moved aside, none in place",
}

ENVIRONMENT_VARIABLE = "RSTMDB_FAILPOINTS"


class FailpointError(StorageError):
    """Raised by a failpoint armed with ``raise``: an error injected at a named step."""


@dataclass(slots=True)
class _Term:
    action: str
    count: int | None  # None: every hit
    sleep_ms: int = 0
    call: Callable[[], None] | None = None


class _Plan:
    """The terms armed at one point, and how far through them its hits have gone."""

    def __init__(self, terms: list[_Term]) -> None:
        self.terms = terms
        self.hits = 0
        self._lock = threading.Lock()

    def next_action(self) -> _Term | None:
        with self._lock:
            self.hits += 1
            if not self.terms:
                return None
            term = self.terms[0]
            if term.count is not None:
                term.count -= 1
                if term.count == 0:
                    self.terms.pop(0)
            return term


_armed: dict[str, _Plan] = {}
_OS_ERRORS = {"eio": errno.EIO, "enospc": errno.ENOSPC}
_TERM = re.compile(r"^(?:(\d+)\*)?(off|kill|raise|eio|enospc|print|sleep\((\d+)\))$")


def failpoint(name: str) -> None:
    """Act as armed at the point *name* (see the module docstring); nothing when unarmed."""
    if _armed:
        _hit(name)


def _hit(name: str) -> None:
    plan = _armed.get(name)
    term = plan.next_action() if plan is not None else None
    if term is None or term.action == "off":
        return
    if term.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif term.action == "raise":
        raise FailpointError(f"failpoint {name}: injected error")
    elif term.action in _OS_ERRORS:
        code = _OS_ERRORS[term.action]
        raise OSError(code, f"{os.strerror(code)} (failpoint {name})")
    elif term.action == "print":
        sys.stderr.write(f"failpoint {name}\n")
        sys.stderr.flush()
    elif term.call is not None:
        term.call()
    else:
        time.sleep(term.sleep_ms / 1000)


def enable(name: str, terms: str | Callable[[], None]) -> None:
    """Arm the point *name* with *terms* (``"kill"``, ``"3*off->raise"``, …), replacing what
    it had; or, in-process, with a function called at the next hit only (to make another
    write happen exactly between two steps: the race a test wants, without threads).

    Example::

        failpoints.enable("write.after_sync", "raise")
        with pytest.raises(FailpointError):
            storage.put_instance(instance)
    """
    if name not in POINTS:
        raise ConfigError(f"{ENVIRONMENT_VARIABLE}: no failpoint named {name!r}")
    if callable(terms):
        _armed[name] = _Plan([_Term("call", 1, call=terms)])
    else:
        _armed[name] = _Plan(_parse_terms(name, terms))


def disable(name: str | None = None) -> None:
    """Disarm the point *name*, or every point when None."""
    if name is None:
        _armed.clear()
    else:
        _armed.pop(name, None)


def hits(name: str) -> int:
    """How many times the armed point *name* was reached since it was armed (0 if unarmed)."""
    plan = _armed.get(name)
    return 0 if plan is None else plan.hits


def configure(spec: str) -> None:
    """Arm the points of a ``RSTMDB_FAILPOINTS`` value: ``name=terms`` joined by ``;``."""
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, equals, terms = item.partition("=")
        if not equals:
            raise ConfigError(f"{ENVIRONMENT_VARIABLE}: expected name=terms, got {item!r}")
        enable(name.strip(), terms.strip())


def _parse_terms(name: str, text: str) -> list[_Term]:
    terms = []
    for part in text.split("->"):
        match = _TERM.match(part.strip())
        if match is None:
            raise ConfigError(
                f"{ENVIRONMENT_VARIABLE}: {name}: bad term {part.strip()!r} (expected "
                f"[count*]off|kill|raise|eio|enospc|print|sleep(ms))"
            )
        count, action, sleep_ms = match.groups()
        if count is not None and int(count) == 0:
            raise ConfigError(f"{ENVIRONMENT_VARIABLE}: {name}: a count must be at least 1")
        terms.append(
            _Term(
                "sleep" if sleep_ms is not None else action,
                None if count is None else int(count),
                int(sleep_ms or 0),
            )
        )
    return terms


configure(os.environ.get(ENVIRONMENT_VARIABLE, ""))
