"""The instances that every comparison writes and reads, as caller-supplied fields."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rstmdb_storage import Instance

T = TypeVar("T")

BATCH_SIZE = 10_000
"""Instances per ``storage.batch()`` (and rows per SQLite transaction)."""

LIST_MACHINE = "order"
LIST_STATES = ("pending", "paid", "shipped", "delivered", "cancelled")
"""The listing stores hold ``list_matches`` instances in each of these states, in turn."""

LIST_STATE = "paid"
"""The state the listing comparisons ask for: exactly ``list_matches`` instances."""


def instance_id(prefix: str, i: int) -> str:
    return f"{prefix}-{i:08d}"


def instance_fields(iid: str, i: int) -> dict[str, Any]:
    """The caller-supplied fields of one ~200-byte instance."""
    return {
        "id": iid,
        "machine": "order",
        "version": 1,
        "state": ("pending", "paid", "shipped", "delivered")[i % 4],
        "ctx": {
            "total": 99.5 + i % 1000,
            "items": i % 7 + 1,
            "currency": "EUR",
            "priority": i % 3,
            "note": "leave at the back door, ring twice",
        },
        "metadata": {"customer": f"customer-{i % 5000:05d}", "region": "eu-west-1"},
    }


def fields_of(prefix: str, numbers: Iterable[int]) -> list[dict[str, Any]]:
    """:func:`instance_fields` of instances ``prefix-i`` for each ``i`` of ``numbers``."""
    return [instance_fields(instance_id(prefix, i), i) for i in numbers]


def dataset(records: int) -> Iterator[dict[str, Any]]:
    """The ``records`` instances ``order-00000000`` ... of the lookup stores."""
    for i in range(records):
        yield instance_fields(instance_id("order", i), i)


def listing_fields(i: int) -> dict[str, Any]:
    """Instance ``i`` of the listing stores, in ``LIST_STATES[i % len(LIST_STATES)]``."""
    fields = instance_fields(instance_id("list", i), i)
    fields["state"] = LIST_STATES[i % len(LIST_STATES)]
    return fields


def make_instance(fields: dict[str, Any]) -> Instance:
    return Instance(**fields)


def chunks(items: Iterable[T], size: int | None) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter; all in one list without a size)."""
    it = iter(items)
    while part := list(itertools.islice(it, size)):
        yield part


class Counter:
    """Hands out fresh id ranges so that every repetition inserts new instances."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> range:
        start = self.next
        self.next += n
        return range(start, start + n)


def fresh_fields(counter: Counter, prefix: str, n: int) -> list[dict[str, Any]]:
    return fields_of(prefix, counter.take(n))
