"""check_instance's common-case shortcut (short ASCII text, plain labels) decides exactly as
the precise checks: what it does not vouch for goes to them."""

from __future__ import annotations

import pytest
from helpers import order

from rstmdb_storage import InvalidInputError, InvalidTypeError
from rstmdb_storage.model import check_instance


@pytest.mark.parametrize(
    "fields",
    [
        {"id": "ordre-é"},
        {"id": "x" * 255},
        {"machine": "マシン"},
        {"state": "s" * 200},
        {"metadata": {"total": 9.5, "clé": "valeur", "big": 2**63 - 1, "neg": -(2**63)}},
        {"metadata": {"k": "v" * 255}},
    ],
)
def test_text_and_labels_the_shortcut_leaves_are_still_accepted(fields: dict) -> None:
    inst = order("o-1")
    for field, value in fields.items():
        setattr(inst, field, value)
    assert check_instance(inst) is inst


@pytest.mark.parametrize(
    ("field", "value", "error", "named"),
    [
        ("id", "", InvalidInputError, "instance id"),
        ("id", "a\x00b", InvalidInputError, "instance id"),
        ("id", "x" * 256, InvalidInputError, "instance id"),
        ("machine", "m\x00", InvalidInputError, "machine"),
        ("state", "", InvalidInputError, "state"),
        ("state", 3, InvalidTypeError, "state"),
        ("version", -1, InvalidInputError, "version"),
        ("version", 2**63, InvalidInputError, "version"),
        ("version", True, InvalidTypeError, "version"),
        ("metadata", {"": "v"}, InvalidInputError, "metadata key"),
        ("metadata", {"k\x00": "v"}, InvalidInputError, "metadata key"),
        ("metadata", {"k": 2**63}, InvalidInputError, "int outside 64 bits"),
        ("metadata", {"k": float("nan")}, InvalidInputError, "NaN"),
        ("metadata", {"k": None}, InvalidTypeError, "metadata 'k'"),
        ("metadata", {"k": "v" * 256}, InvalidInputError, "metadata 'k'"),
        ("metadata", [], InvalidTypeError, "metadata of"),
        ("ctx", {"k": {1, 2}}, InvalidTypeError, "ctx of 'o-1'"),
    ],
)
def test_what_the_shortcut_refuses_is_refused_with_its_name(
    field: str, value: object, error: type, named: str
) -> None:
    inst = order("o-1")
    setattr(inst, field, value)
    with pytest.raises(error, match=named):
        check_instance(inst)
