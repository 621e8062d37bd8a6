"""Fixtures shared by every test module: a fresh data directory, a config, an open store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rstmdb_storage import Storage, StorageConfig

# the S3 server fixtures (s3_endpoint, s3_url) of the replication tests
pytest_plugins = ["s3server"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--crash-trials",
        type=int,
        default=20,
        help="SIGKILL trials per crash test (CI runs the default; use e.g. 500 for a long run)",
    )


@pytest.fixture
def crash_trials(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--crash-trials")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def config(data_dir: Path) -> StorageConfig:
    """Small segments so that rotation happens in tests; no automatic snapshots or compaction
    (tests of those ask for them), so that what a test reads does not depend on timing."""
    return StorageConfig(
        data_dir=data_dir,
        wal_segment_size=64 * 1024,
        snapshot_interval=0,
        compaction_enabled=False,
    )


@pytest.fixture
def storage(config: StorageConfig) -> Iterator[Storage]:
    with Storage.open(config) as opened:
        yield opened
