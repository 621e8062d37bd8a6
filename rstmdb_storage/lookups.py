"""The lookups by id, state, metadata and time, shared by ``Storage`` and ``Reader``.

:class:`Lookups` is the read half of the front door: each method checks nothing and hands
over to :mod:`.query`, given an engine. ``Storage`` gives it the store's engine, so that each
call reads in a short transaction of its own; :meth:`Storage.reader` gives a :class:`Reader`
a view of the engine pinned to one read transaction, so that every call inside sees the
same state (LMDB's copy-on-write makes that free) and none begins a transaction of its own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import lmdb

from . import query
from .codec import decode_instance
from .engine import Engine, typed_calls
from .errors import StorageClosedError
from .model import Instance, MachineDefinition, MetadataValue
from .query import Page, metadata_query, state_query, time_query
from .store import env as lmdb_env
from .wal import WalTail

__all__ = ["Lookups", "Reader"]

T = TypeVar("T")


class Lookups:
    """The lookups; ``_engine`` is an :class:`~rstmdb_storage.engine.Engine`, or the
    :class:`PinnedView` of one."""

    __slots__ = ()
    _engine: Any

    def get_instance(self, instance_id: str) -> Instance | None:
        """The instance stored under *instance_id*, or None.

        :raises InvalidInputError: the id is empty or too long
        :raises CorruptionError: the stored value fails its checksum
        """
        return query.get_instance(self._engine, instance_id)

    @typed_calls
    def count_instances(self) -> int:
        """How many instances are stored."""
        return query.count_instances(self._engine)

    def iter_instances(self) -> Iterator[Instance]:
        """Every stored instance, in id order (UTF-8 byte order), read in short transactions
        (in a :class:`Reader`, in its one transaction)."""
        return query.instances(self._engine)

    @typed_calls
    def get_machine(self, name: str, version: int | None = None) -> MachineDefinition | None:
        """Version *version* of machine *name* (the newest when None), or None if absent."""
        return query.get_machine(self._engine, name, version)

    @typed_calls
    def list_machines(self, name: str | None = None) -> list[MachineDefinition]:
        """Every stored machine definition (only those of machine *name*, when given), by
        name, then version."""
        return query.list_machines(self._engine, name)

    @typed_calls
    def list_by_state(
        self, machine: str, state: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Page:
        """Instances of *machine* in *state*, in id order.

        With *limit*, at most that many; the returned :class:`Page` carries ``next_cursor``
        to pass back as *cursor* for the next page (None on the last page). Without a limit,
        every match; prefer :meth:`iter_by_state` for large results.

        Example::

            page = storage.list_by_state("order", "pending", limit=100)
            while page.next_cursor:
                page = storage.list_by_state("order", "pending", limit=100,
                                             cursor=page.next_cursor)
        """
        return query.list_page(self._engine, state_query(machine, state), limit, cursor, False)

    def iter_by_state(self, machine: str, state: str) -> Iterator[Instance]:
        """Like :meth:`list_by_state`, lazily, a page of short read transaction at a time."""
        return query.iterate(self._engine, state_query(machine, state), reverse=False)

    @typed_calls
    def count_by_state(self, machine: str) -> dict[str, int]:
        """How many instances of *machine* are in each state, from the state index alone
        (no instance is decoded). States with no instance are absent."""
        return query.count_by_state(self._engine, machine)

    @typed_calls
    def list_by_metadata(
        self,
        key: str,
        value: MetadataValue | None = None,
        *,
        start: MetadataValue | None = None,
        end: MetadataValue | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """Instances whose metadata label *key* equals *value*, or, with *start* and/or *end*
        instead, lies in ``start <= label < end`` (values of the bounds' type only; str, int,
        float and bool each sort among themselves). Ordered by label value, then id; paged
        like :meth:`list_by_state`.

        Example::

            storage.list_by_metadata("customer", "alice")
            storage.list_by_metadata("priority", start=5)            # 5 and above
            storage.list_by_metadata("total", start=10.0, end=99.5)
        """
        key_range = metadata_query(key, value, start, end)
        return query.list_page(self._engine, key_range, limit, cursor, reverse=False)

    def iter_by_metadata(
        self,
        key: str,
        value: MetadataValue | None = None,
        *,
        start: MetadataValue | None = None,
        end: MetadataValue | None = None,
    ) -> Iterator[Instance]:
        """Like :meth:`list_by_metadata`, lazily."""
        key_range = metadata_query(key, value, start, end)
        return query.iterate(self._engine, key_range, reverse=False)

    @typed_calls
    def list_by_time(
        self,
        start_ms: int,
        end_ms: int,
        *,
        newest_first: bool = False,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """Instances with ``start_ms <= updated_at < end_ms``, oldest first (or newest first),
        ties in id order; paged like :meth:`list_by_state`.

        Example::

            hour_ago = int(time.time() * 1000) - 3_600_000
            recent = storage.list_by_time(hour_ago, 2**63 - 1, newest_first=True, limit=50)
        """
        key_range = time_query(start_ms, end_ms)
        return query.list_page(self._engine, key_range, limit, cursor, reverse=newest_first)

    def iter_by_time(
        self, start_ms: int, end_ms: int, *, newest_first: bool = False
    ) -> Iterator[Instance]:
        """Like :meth:`list_by_time`, lazily."""
        return query.iterate(self._engine, time_query(start_ms, end_ms), reverse=newest_first)


class PinnedView:
    """What :mod:`.query` asks of an engine, with every read in one transaction, *txn*."""

    __slots__ = ("_engine", "env", "txn")

    def __init__(self, engine: Engine, env: lmdb_env.LmdbEnvironment, txn: Any) -> None:
        self._engine = engine
        self.env = env
        self.txn = txn

    @property
    def closed(self) -> bool:
        return self.txn is None

    def current(self) -> Any:
        """The transaction, while the reader's with block runs."""
        if self.txn is None:
            raise StorageClosedError(
                "the reader has ended: read (and iterate) inside its with block"
            )
        return self.txn

    def read(self, read: Callable[[Any], T]) -> T:
        return read(self.current())

    def live(self) -> lmdb_env.LmdbEnvironment:
        return self.env

    def applied_tail(self) -> WalTail:
        return self.read(self._engine.meta.tail)

    def typed(self, exc: Exception, doing: str) -> Exception:
        return self._engine.typed(exc, doing)  # type: ignore[arg-type]


class Reader(Lookups):
    """One consistent view of the store: every lookup through it sees the state as of the
    moment :meth:`Storage.reader` began, whatever writers commit meanwhile, and none begins
    a read transaction of its own. Use it in the thread that made it, and keep it short: an
    open view keeps LMDB from reusing the pages it sees, and a fork or a growth of the map in
    another thread waits for it to end. Writes from its own thread are refused meanwhile.

    Example::

        with storage.reader() as r:
            order = r.get_instance("order-1")
            pending = r.list_by_state("order", "pending", limit=100)
            seen_at = r.applied_seq  # both answers are as of this sequence number
    """

    __slots__ = ("_engine",)

    def __init__(self, view: PinnedView) -> None:
        self._engine = view

    @property
    def applied_seq(self) -> int:
        """The sequence number of the newest WAL record applied in this view."""
        return self._engine.applied_tail().applied_seq

    def get_instance(self, instance_id: str) -> Instance | None:
        """The instance stored under *instance_id* in this view, or None.

        :raises InvalidInputError: the id is empty or too long
        :raises CorruptionError: the stored value fails its checksum
        """
        key = query.instance_key(instance_id)
        view = self._engine
        txn = view.txn
        if txn is None:
            txn = view.current()  # raises
        try:
            raw = txn.get(key, None, view.env.instances)
        except lmdb.Error as exc:
            raise lmdb_env.lmdb_error(view.env.path, exc, "reading") from exc
        return None if raw is None else decode_instance(key, raw)


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Reader]:
    """A :class:`Reader` on one read transaction, for the with block (see
    :meth:`rstmdb_storage.Storage.reader`)."""
    env = engine.live()
    pinned, me = env.gate.pinned, threading.get_ident()
    with env.read() as txn:
        view = PinnedView(engine, env, txn)
        pinned[me] = pinned.get(me, 0) + 1
        try:
            yield Reader(view)
        finally:
            view.txn = None  # a lazy listing still running past the block refuses, not reads
            if pinned[me] == 1:
                del pinned[me]
            else:
                pinned[me] -= 1
