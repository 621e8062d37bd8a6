"""Strict JSON for instances (rstmdb_storage.jsonable): what the CLI and the lookup service
print and `load` reads back. A property test against the identity."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rstmdb_storage import Instance, InvalidInputError, InvalidTypeError
from rstmdb_storage.jsonable import from_json, instance_from_json, instance_to_json, to_json

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def same(a: object, b: object) -> bool:
    """Equality in which NaN equals NaN (and 0.0 is not -0.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@given(values)
def test_strict_json_round_trips(value: object) -> None:
    text = json.dumps(to_json(value), allow_nan=False)  # never NaN or Infinity literals
    assert same(from_json(json.loads(text)), value)


def test_the_documented_mapping() -> None:
    assert to_json({"raw": b"\x00\x01", "n": float("nan"), "i": float("-inf")}) == {
        "raw": {"$base64": "AAE="},
        "n": {"$float": "nan"},
        "i": {"$float": "-inf"},
    }


@pytest.mark.parametrize("bad", [{"$base64": "!!"}, {"$base64": 5}, {"$float": "1.5"}])
def test_malformed_markers_are_refused(bad: object) -> None:
    with pytest.raises(InvalidInputError):
        from_json({"ctx": bad})


def test_instances_round_trip_and_unknown_fields_are_refused() -> None:
    inst = Instance(id="o-1", machine="order", version=1, state="new", ctx={"b": b"\x00"})
    assert instance_from_json(json.loads(json.dumps(instance_to_json(inst)))) == inst
    with pytest.raises(InvalidInputError, match="unknown field"):
        instance_from_json({**instance_to_json(inst), "colour": "red"})
    with pytest.raises(InvalidInputError, match="missing field"):
        instance_from_json({"id": "o-1"})
    with pytest.raises(InvalidTypeError):
        instance_from_json(["o-1"])
