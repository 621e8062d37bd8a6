"""Instances as strict JSON, and back: the one mapping the CLI's output, ``dump``/``load`` and
the lookup service agree on.

JSON has no bytes and no non-finite numbers, and a context may hold both, so they are written as
one-key objects that no plain JSON value collides with in practice:

=========================  ======================================
Python value               JSON
=========================  ======================================
``b"\\x00\\x01"``            ``{"$base64": "AAE="}``
``float("nan")``           ``{"$float": "nan"}``
``float("inf")``           ``{"$float": "inf"}`` (``"-inf"`` too)
anything else JSON-like    itself (lists for tuples)
=========================  ======================================

:func:`from_json` reverses :func:`to_json` exactly, so ``dump`` then ``load`` gives back equal
instances. The output never holds ``NaN`` or ``Infinity`` literals (``json.dumps(...,
allow_nan=False)`` holds).

Example::

    >>> to_json({"raw": b"\\x00", "x": float("inf")})
    {'raw': {'$base64': 'AA=='}, 'x': {'$float': 'inf'}}
    >>> from_json(to_json({"raw": b"\\x00"}))
    {'raw': b'\\x00'}
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from typing import Any

from .errors import InvalidInputError, InvalidTypeError
from .model import Instance

_BYTES = "$base64"
_FLOAT = "$float"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_INSTANCE_FIELDS = frozenset(field.name for field in dataclasses.fields(Instance))


def to_json(value: Any) -> Any:
    """*value* with bytes and non-finite floats made explicit (see the module docstring)."""
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, bytes):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    return value


def from_json(value: Any) -> Any:
    """The inverse of :func:`to_json`.

    :raises InvalidInputError: a ``$base64`` or ``$float`` object that is not well formed
    """
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES in value:
            encoded = value[_BYTES]
            try:
                return base64.b64decode(encoded, validate=True)
            except (binascii.Error, TypeError, ValueError) as exc:
                raise InvalidInputError(f"{_BYTES}: not base64: {encoded!r:.60}") from exc
        if len(value) == 1 and _FLOAT in value:
            if value[_FLOAT] not in _NON_FINITE:
                raise InvalidInputError(f"{_FLOAT}: need nan, inf or -inf, got {value[_FLOAT]!r}")
            return _NON_FINITE[value[_FLOAT]]
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    return value


def instance_to_json(instance: Instance) -> dict[str, Any]:
    """An :class:`Instance` as a JSON object with one key per field."""
    return to_json(dataclasses.asdict(instance))


def instance_from_json(document: Any) -> Instance:
    """An :class:`Instance` from a JSON object such as :func:`instance_to_json` makes (keys it
    does not know are refused; ``last_wal_offset`` is accepted and ignored by the store).

    :raises InvalidTypeError: *document* is not an object
    :raises InvalidInputError: a field is unknown or a required one is missing
    """
    if not isinstance(document, dict):
        raise InvalidTypeError(f"an instance must be a JSON object, got {type(document).__name__}")
    unknown = sorted(set(document) - _INSTANCE_FIELDS)
    if unknown:
        raise InvalidInputError(f"instance: unknown field(s) {', '.join(unknown)}")
    missing = [name for name in ("id", "machine", "version", "state") if name not in document]
    if missing:
        raise InvalidInputError(f"instance: missing field(s) {', '.join(missing)}")
    return Instance(**from_json(document))
