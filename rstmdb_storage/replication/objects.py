"""The object store: an S3-compatible bucket (AWS S3, Ceph RGW, SeaweedFS, MinIO) through boto3.

A store ships to a URL ``s3://bucket/prefix``. The endpoint, region and credentials come from
boto3's own configuration (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``~/.aws/``), so the same code runs against any of them.

Every object is written once: ``If-None-Match: *`` makes the server refuse a second write of a
key, and ``ChecksumCRC32C`` (base64 of the big-endian CRC-32C of the body) makes it refuse a
body damaged on the way (``BadDigest``). The CRC-32C is also kept in the object's metadata
(``crc32c``, 8 hex digits), and every read checks it again here: an object changed in the
bucket afterwards is a :class:`~rstmdb_storage.errors.CorruptionError` naming it, never data.

No exception of boto3 or botocore leaves this module: an unreachable server is an
:class:`~rstmdb_storage.errors.ObjectStoreUnavailableError`, any other refusal an
:class:`~rstmdb_storage.errors.ObjectStoreError`.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from crc32c import crc32c

from ..errors import (
    CorruptionError,
    InvalidInputError,
    InvalidTypeError,
    ObjectStoreError,
    ObjectStoreUnavailableError,
    StorageError,
)
from ..fsutil import atomic_file, write_all

#: metadata key holding the body's CRC-32C, as 8 hex digits
CRC_METADATA = "crc32c"
_CHUNK = 1 << 20


#: files larger than this go up in parts (one ``PUT`` takes at most 5 GiB)
MULTIPART_THRESHOLD = 1 << 30
#: the size of a part (S3 takes 5 MiB to 5 GiB, and at most 10,000 parts)
PART_SIZE = 64 << 20


def _base64_crc(crc: int) -> str:
    """The form of ``ChecksumCRC32C``: base64 of the big-endian CRC-32C."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _crc_and_size(body: bytes | BinaryIO) -> tuple[int, int]:
    """The CRC-32C and size of *body*; a file is read through and put back at its start."""
    if isinstance(body, bytes):
        return crc32c(body), len(body)
    crc, size = 0, 0
    while chunk := body.read(_CHUNK):
        crc, size = crc32c(chunk, crc), size + len(chunk)
    body.seek(0)
    return crc, size


def parse_url(url: object) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at its ends).

    Example::

        parse_url("s3://backups/rstmdb/orders") == ("backups", "rstmdb/orders")
    """
    if not isinstance(url, str):
        raise InvalidTypeError(f"an object store URL must be a str, got {type(url).__name__}")
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise InvalidInputError(f"not an object store URL (s3://bucket/prefix): {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def is_url(source: object) -> bool:
    return isinstance(source, str) and source.startswith("s3://")


class ObjectStore:
    """One bucket and prefix. Keys passed in are relative to the prefix.

    Example::

        objects = ObjectStore("s3://backups/rstmdb")
        objects.put_once("a/b.seg", data, {"first-seq": "1"})
        assert objects.get("a/b.seg") == data
    """

    def __init__(
        self, url: str, multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE
    ) -> None:
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        if importlib.util.find_spec("boto3") is None:  # said now, not at the first upload
            raise ObjectStoreError(
                f"{url}: an object store needs boto3: pip install 'rstmdb-storage[s3]'"
            )
        self._client: Any = None

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def put_once(self, name: str, body: bytes | BinaryIO, metadata: dict[str, str]) -> bool:
        """Write *body* (bytes, or a file open for reading, streamed from its start) under
        *name* unless an object is there: True if written, False if the same content was
        there already (a retry of an upload that succeeded: same size and CRC-32C).

        :raises ObjectStoreError: an object with other content is there
        """
        crc, size = _crc_and_size(body)
        metadata = {**metadata, CRC_METADATA: f"{crc:08x}"}
        try:
            if size > self.multipart_threshold and not isinstance(body, bytes):
                self._put_in_parts(name, body, metadata)
            else:
                self._call(
                    "put_object",
                    Bucket=self.bucket,
                    Key=self.key(name),
                    Body=body,
                    IfNoneMatch="*",
                    ChecksumCRC32C=_base64_crc(crc),
                    Metadata=metadata,
                )
            return True
        except ObjectStoreError as exc:
            if getattr(exc, "code", None) != "PreconditionFailed":
                raise
        there = self._call("head_object", Bucket=self.bucket, Key=self.key(name))
        if (there.get("Metadata", {}).get(CRC_METADATA), there["ContentLength"]) != (
            f"{crc:08x}",
            size,
        ):
            raise ObjectStoreError(f"{self.where(name)} exists with other content")
        return False

    def _put_in_parts(self, name: str, body: BinaryIO, metadata: dict[str, str]) -> None:
        """A multipart upload of *body*, ``part_size`` bytes a part, each with a CRC-32C the
        server checks, completed with ``If-None-Match: *``; aborted if anything fails (and, if
        this process dies first, when shipping starts again: :meth:`abort_uploads`)."""
        key = self.key(name)
        upload = self._call(
            "create_multipart_upload",
            Bucket=self.bucket,
            Key=key,
            Metadata=metadata,
            ChecksumAlgorithm="CRC32C",
        )
        where = {"Bucket": self.bucket, "Key": key, "UploadId": upload["UploadId"]}
        try:
            parts = []
            while part := body.read(self.part_size):
                number, checksum = len(parts) + 1, _base64_crc(crc32c(part))
                done = self._call(
                    "upload_part", **where, PartNumber=number, Body=part, ChecksumCRC32C=checksum
                )
                parts.append(
                    {"ETag": done["ETag"], "PartNumber": number, "ChecksumCRC32C": checksum}
                )
            self._call(
                "complete_multipart_upload",
                **where,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except BaseException:
            with contextlib.suppress(ObjectStoreError):  # the parts are not to linger
                self._call("abort_multipart_upload", **where)
            raise

    def download(self, name: str, path: Path, mode: int) -> dict[str, str]:
        """Stream *name* into the file *path* (written atomically), checking its CRC-32C as
        :meth:`get` does, with memory bounded by one chunk whatever the object's size; return
        the object's metadata.

        :raises CorruptionError: the bytes do not match their checksum (nothing is written)
        """
        response = self._call("get_object", Bucket=self.bucket, Key=self.key(name))
        crc, offset = 0, 0
        with atomic_file(path, mode) as fd:
            try:
                for chunk in response["Body"].iter_chunks(_CHUNK):
                    write_all(fd, chunk, offset, str(path))
                    crc, offset = crc32c(chunk, crc), offset + len(chunk)
            except StorageError:
                raise
            except Exception as exc:  # botocore's read errors: the connection went
                raise ObjectStoreUnavailableError(f"reading {self.where(name)}: {exc}") from exc
            self._check_crc(name, response.get("Metadata", {}), crc)
        return response.get("Metadata", {})

    def put_conditional(self, name: str, data: bytes, etag: str | None) -> str:
        """Write *data* under *name* only if the object there is still the one with *etag*
        (``If-Match``), or, with *etag* None, only if there is none (``If-None-Match: *``);
        return the new ETag.

        :raises ObjectStoreError: with ``code`` "PreconditionFailed" when the object changed
        """
        crc = crc32c(data)
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        response = self._call(
            "put_object",
            Bucket=self.bucket,
            Key=self.key(name),
            Body=data,
            ChecksumCRC32C=_base64_crc(crc),
            Metadata={CRC_METADATA: f"{crc:08x}"},
            **condition,
        )
        return response["ETag"]

    def get_versioned(self, name: str) -> tuple[bytes, str]:
        """:meth:`get`, with the object's ETag (for :meth:`put_conditional`)."""
        data, _, etag = self._get(name)
        return data, etag

    def get(self, name: str) -> bytes:
        """The bytes of *name*, their CRC-32C checked against the one written with them.

        :raises CorruptionError: the bytes do not match their checksum
        """
        return self._get(name)[0]

    def fetch(self, name: str) -> tuple[bytes, dict[str, str]]:
        """:meth:`get`, with the object's metadata."""
        data, metadata, _ = self._get(name)
        return data, metadata

    def _get(self, name: str) -> tuple[bytes, dict[str, str], str]:
        response = self._call("get_object", Bucket=self.bucket, Key=self.key(name))
        try:
            data = response["Body"].read()
        except Exception as exc:  # botocore's read errors: the connection went
            raise ObjectStoreUnavailableError(f"reading {self.where(name)}: {exc}") from exc
        metadata = response.get("Metadata", {})
        self._check_crc(name, metadata, crc32c(data))
        return data, metadata, response["ETag"]

    def _check_crc(self, name: str, metadata: dict[str, str], crc: int) -> None:
        expected = metadata.get(CRC_METADATA)
        if expected != f"{crc:08x}":
            raise CorruptionError(
                f"{self.where(name)}: its bytes do not match the CRC-32C written with them "
                f"({expected or 'none'})",
                path=self.where(name),
            )

    def names(self, under: str = "", after: str | None = None) -> Iterator[str]:
        """The names of every object under *under* (relative to the prefix), in key order;
        only those after the name *after* when given."""
        start = self.key(under)
        token = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": start}
            if after is not None:
                args["StartAfter"] = self.key(after)
            if token:
                args["ContinuationToken"] = token
            page = self._call("list_objects_v2", **args)
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) + 1 :] if self.prefix else item["Key"]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def abort_uploads(self, under: str) -> int:
        """Abort every multipart upload begun under *under* and never completed (this package
        writes each object with one ``PUT``; a tool that died can leave one, and its parts
        are kept, and billed, until aborted); return how many."""
        aborted, markers = 0, {}
        while True:
            page = self._call(
                "list_multipart_uploads", Bucket=self.bucket, Prefix=self.key(under), **markers
            )
            for upload in page.get("Uploads", []):
                self._call(
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=upload["Key"],
                    UploadId=upload["UploadId"],
                )
                aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            markers = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }

    def folders(self, under: str = "") -> list[str]:
        """The names of the "directories" right under *under* (relative to it, without the
        slash): the common prefixes of a listing by ``/``."""
        start = self.key(under) if under else (f"{self.prefix}/" if self.prefix else "")
        found: list[str] = []
        token = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": start, "Delimiter": "/"}
            if token:
                args["ContinuationToken"] = token
            page = self._call("list_objects_v2", **args)
            found += [p["Prefix"][len(start) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return found

    def _call(self, method: str, **args: Any) -> Any:
        client = self._client or self._connect()
        import botocore.exceptions as boto_errors

        try:
            return getattr(client, method)(**args)
        except boto_errors.ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "?")
            typed = ObjectStoreError(
                f"{method} of s3://{self.bucket}/{args.get('Key', args.get('Prefix', ''))}: "
                f"{code} ({error.get('Message', '')})"
            )
            typed.code = code  # type: ignore[attr-defined]
            raise typed from exc
        except (
            boto_errors.EndpointConnectionError,
            boto_errors.ConnectionClosedError,
            boto_errors.ReadTimeoutError,
            boto_errors.ConnectTimeoutError,
        ) as exc:
            raise ObjectStoreUnavailableError(f"the object store is unreachable: {exc}") from exc
        except boto_errors.BotoCoreError as exc:
            raise ObjectStoreError(f"{method} of s3://{self.bucket}: {exc}") from exc

    def _connect(self) -> Any:
        import boto3
        from botocore.config import Config

        # Few, quick retries: a store that cannot ship keeps its backlog and tries again.
        config = Config(
            retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=30
        )
        self._client = boto3.client("s3", config=config)
        return self._client
