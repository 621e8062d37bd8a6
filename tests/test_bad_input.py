"""Bad input to the API is a typed error (a StorageError that is also a ValueError or a
TypeError) that writes nothing, however odd the value: never a bare TypeError, never a
ValueError raised while the message is being built."""

from __future__ import annotations

import pytest
from helpers import order, wal_bytes

from rstmdb_storage import (
    ConfigError,
    Instance,
    InvalidInputError,
    InvalidTypeError,
    Storage,
    StorageConfig,
)


@pytest.mark.parametrize(
    "write",
    [
        # past the 4,300 digits Python turns into text
        lambda s: s.put_instance(Instance(id="o-1", machine="m", version=10**5000, state="s")),
        lambda s: s.put_instance(order("o-1", created_at=2**70)),
        lambda s: s.put_machine("order", 10**5000, {}),
    ],
)
def test_huge_ints_are_refused_with_a_short_message(storage: Storage, write) -> None:
    before = wal_bytes(storage.config.path)
    with pytest.raises(InvalidInputError) as caught:
        write(storage)
    assert len(str(caught.value)) < 200
    assert wal_bytes(storage.config.path) == before


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"from_seq": "x"}, InvalidTypeError),
        ({"from_seq": 1.5}, InvalidTypeError),
        ({"from_seq": 0}, InvalidInputError),
        ({"limit": "10"}, InvalidTypeError),
        ({"limit": 0}, InvalidInputError),
    ],
)
def test_read_wal_refuses_bad_arguments_at_once(storage: Storage, kwargs, error) -> None:
    with pytest.raises(error):
        storage.read_wal(**kwargs)  # raised by the call, before any iteration


def test_backup_needs_a_path(storage: Storage) -> None:
    with pytest.raises(InvalidTypeError, match="backup target"):
        storage.backup(None)


def test_a_data_dir_with_a_nul_byte_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="NUL"):
        Storage.open(StorageConfig(data_dir=f"{tmp_path}/a\x00b"))
