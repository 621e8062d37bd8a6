"""Queries run against the store and the model alike (``tests/model_store.py``): one
:class:`Query` of any kind, its pages, and :func:`check_query`, which holds the unpaged list, the
lazy iterator and every paging to the model's brute-force answer (importable as
``query_checks``, like ``helpers``)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from model_store import ModelStore, Record, view

from rstmdb_storage import Instance, Page, Storage


@dataclass(frozen=True)
class Query:
    """One query: ``kind`` is state, metadata (exact), range (metadata bounds) or time."""

    kind: str
    args: tuple[Any, ...]
    newest_first: bool = False

    def page(self, storage: Storage, limit: int | None = None, cursor: str | None = None) -> Page:
        paging: dict[str, Any] = {"limit": limit, "cursor": cursor}
        if self.kind == "state":
            return storage.list_by_state(*self.args, **paging)
        if self.kind == "metadata":
            return storage.list_by_metadata(*self.args, **paging)
        if self.kind == "range":
            key, start, end = self.args
            return storage.list_by_metadata(key, start=start, end=end, **paging)
        return storage.list_by_time(*self.args, newest_first=self.newest_first, **paging)

    def iterate(self, storage: Storage) -> Iterator[Instance]:
        if self.kind == "state":
            return storage.iter_by_state(*self.args)
        if self.kind == "metadata":
            return storage.iter_by_metadata(*self.args)
        if self.kind == "range":
            key, start, end = self.args
            return storage.iter_by_metadata(key, start=start, end=end)
        return storage.iter_by_time(*self.args, newest_first=self.newest_first)

    def expected(self, model: ModelStore) -> list[Record]:
        if self.kind == "state":
            return model.by_state(*self.args)
        if self.kind == "metadata":
            return model.by_metadata(*self.args)
        if self.kind == "range":
            return model.by_metadata_range(*self.args)
        return model.by_time(*self.args, newest_first=self.newest_first)


def pages(query: Query, storage: Storage, size: int) -> list[Page]:
    """Every page of *query* at page size *size*, following the cursors."""
    got = [query.page(storage, limit=size)]
    while got[-1].next_cursor is not None:
        assert len(got) <= 10_000, "cursors do not end"
        got.append(query.page(storage, limit=size, cursor=got[-1].next_cursor))
    return got


def check_query(storage: Storage, model: ModelStore, query: Query, sizes: list[int]) -> None:
    """The unpaged list, the lazy iterator and every paging at *sizes* equal the model."""
    expected = [view(record) for record in query.expected(model)]
    full = query.page(storage)
    assert [view(one) for one in full] == expected, query
    assert full.next_cursor is None
    assert [view(one) for one in query.iterate(storage)] == expected, query
    for size in sizes:
        got = pages(query, storage, size)
        assert [view(one) for page in got for one in page] == expected, (query, size)
        # Full pages until the last one, which alone has no cursor; nothing empty but a lone
        # first page of an empty result.
        assert len(got) == max(1, math.ceil(len(expected) / size)), (query, size)
        assert all(len(page) == size for page in got[:-1])
        assert 0 < len(got[-1]) <= size or expected == []
