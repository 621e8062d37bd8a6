"""A small read-only HTTP lookup service over a data directory that other processes write to.

Run it beside the workers example, from the repository root, one command each (two terminals)::

    python examples/lookup_service.py --data-dir ./rstmdb-data --port 8080
    python examples/multiprocess_workers.py --data-dir ./rstmdb-data

The first line the service prints is the URL it listens on (with ``--port 0`` it picks a free
port). Then, while the workers run::

    curl localhost:8080/health
    curl localhost:8080/counts/order
    curl 'localhost:8080/by-state/order/paid?limit=5'
    curl 'localhost:8080/by-state/order/paid?limit=5&cursor=<next_cursor of the last page>'
    curl localhost:8080/instances/<id>
    curl 'localhost:8080/by-metadata/customer/customer-3?limit=10'
    curl 'localhost:8080/by-metadata/priority/2?type=int'
    curl 'localhost:8080/by-time?start_ms=0&newest_first=true&limit=10'

Every answer is JSON. Listings return ``{"items": [...], "count": n, "next_cursor": c}``; pass
``c`` back as ``cursor`` for the next page (``null`` on the last one). ``limit`` defaults to
100 and is at most 1000. Path segments are percent-decoded, so ids may hold ``/`` as ``%2F``.
``bytes`` in a context come back as ``{"$base64": "..."}``, non-finite floats as
``{"$float": "inf"}`` (the mapping of :mod:`rstmdb_storage.jsonable`, the same as the CLI's).

Status codes: 200; 404 for an unknown id or route; 400, with ``{"error": "..."}``, for bad
parameters (including what the store itself refuses: ``InvalidInputError`` and
``InvalidTypeError``); 405 for POST, PUT, PATCH and DELETE (HEAD is a GET without the body);
500 only for faults of the store or the service, never for bad input.

The service only reads: it opens the store in read-only mode (:func:`open_store`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

from rstmdb_storage import (
    InvalidInputError,
    InvalidTypeError,
    NotFoundError,
    Storage,
    StorageConfig,
)
from rstmdb_storage.jsonable import instance_to_json

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
END_OF_TIME_MS = 2**63 - 1


def open_store(data_dir: str) -> Storage:
    """Open the store read-only: the service takes no write lock and writes nothing. A data
    directory with no store yet gets an empty one first, so that the service may start before
    the workers."""
    if not (Path(data_dir) / "indexes" / "data.mdb").exists():
        Storage.open(data_dir).close()
    return Storage.open(StorageConfig(data_dir=data_dir, read_only=True))


class BadRequest(Exception):
    """A parameter the service itself cannot use (answered with 400)."""


class NotFound(Exception):
    """No such route or instance (answered with 404)."""


# --- turning instances into JSON ----------------------------------------------------------------


def page_json(page: Any) -> dict[str, Any]:
    return {
        "items": [instance_to_json(instance) for instance in page],
        "count": len(page),
        "next_cursor": page.next_cursor,
    }


# --- parameters ---------------------------------------------------------------------------------


class Query:
    """The query string of a request: each parameter at most once, every one of them used."""

    def __init__(self, text: str, allowed: tuple[str, ...]) -> None:
        try:
            parsed = parse_qs(text, keep_blank_values=True, errors="strict", max_num_fields=20)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"query string: {exc}") from None
        for name, values in parsed.items():
            if name not in allowed:
                expected = ", ".join(allowed) if allowed else "none"
                raise BadRequest(f"unknown parameter {name!r} (expected: {expected})")
            if len(values) > 1:
                raise BadRequest(f"parameter {name!r} given {len(values)} times")
        self.values = {name: values[0] for name, values in parsed.items()}

    def text(self, name: str) -> str | None:
        return self.values.get(name)

    def integer(self, name: str, default: int) -> int:
        text = self.values.get(name)
        if text is None:
            return default
        try:
            return int(text, 10)
        except ValueError:
            raise BadRequest(f"{name}: expected an integer, got {text!r}") from None

    def boolean(self, name: str, default: bool) -> bool:
        text = self.values.get(name)
        if text is None:
            return default
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise BadRequest(f"{name}: expected true or false, got {text!r}")

    def limit(self) -> int:
        limit = self.integer("limit", DEFAULT_LIMIT)
        if limit > MAX_LIMIT:
            raise BadRequest(f"limit: at most {MAX_LIMIT}, got {limit}")
        return limit  # the store refuses 0 and negative limits with InvalidInputError


LABEL_TYPES = ("str", "int", "float", "bool")


def label_value(text: str | None, kind: str, what: str) -> Any:
    """A metadata label value from its text, as ``?type=`` says (one of LABEL_TYPES)."""
    if text is None:
        return None
    try:
        if kind == "str":
            return text
        if kind == "int":
            return int(text, 10)
        if kind == "float":
            return float(text)
        if kind == "bool" and text in ("true", "false"):
            return text == "true"
    except ValueError:
        pass
    raise BadRequest(f"{what}: {text!r} is not of type {kind}")


# --- routes -------------------------------------------------------------------------------------


Route = Callable[[Storage, list[str], str], tuple[int, Any]]


def health(storage: Storage, args: list[str], query: str) -> tuple[int, Any]:
    Query(query, ())
    return 200, {
        "status": "ok",
        "instances": storage.count_instances(),
        "applied_seq": storage.applied_seq,
    }


def get_instance(storage: Storage, args: list[str], query: str) -> tuple[int, Any]:
    Query(query, ())
    (instance_id,) = args
    instance = storage.get_instance(instance_id)
    if instance is None:
        raise NotFound(f"no instance {instance_id!r}")
    return 200, instance_to_json(instance)


def by_state(storage: Storage, args: list[str], query: str) -> tuple[int, Any]:
    params = Query(query, ("limit", "cursor"))
    machine, state = args
    page = storage.list_by_state(machine, state, limit=params.limit(), cursor=params.text("cursor"))
    return 200, page_json(page)


def by_metadata(storage: Storage, args: list[str], query: str) -> tuple[int, Any]:
    """``/by-metadata/<key>/<value>`` (exact) or ``/by-metadata/<key>?start=&end=`` (range)."""
    names = ("limit", "cursor", "type") + (() if len(args) == 2 else ("start", "end"))
    params = Query(query, names)
    kind = params.text("type") or "str"
    if kind not in LABEL_TYPES:
        raise BadRequest(f"type: expected one of {', '.join(LABEL_TYPES)}, got {kind!r}")
    key = args[0]
    value = label_value(args[1], kind, "value") if len(args) == 2 else None
    start = label_value(params.text("start"), kind, "start")
    end = label_value(params.text("end"), kind, "end")
    page = storage.list_by_metadata(
        key, value, start=start, end=end, limit=params.limit(), cursor=params.text("cursor")
    )
    return 200, page_json(page)


def by_time(storage: Storage, args: list[str], query: str) -> tuple[int, Any]:
    params = Query(query, ("start_ms", "end_ms", "newest_first", "limit", "cursor"))
    page = storage.list_by_time(
        params.integer("start_ms", 0),
        params.integer("end_ms", END_OF_TIME_MS),
        newest_first=params.boolean("newest_first", False),
        limit=params.limit(),
        cursor=params.text("cursor"),
    )
    return 200, page_json(page)


def counts(storage: Storage, args: list[str], query: str) -> tuple[int, Any]:
    Query(query, ())
    (machine,) = args
    by_state = storage.count_by_state(machine)
    return 200, {"machine": machine, "counts": by_state, "total": sum(by_state.values())}


#: first path segment -> (handler, how many segments follow it)
ROUTES: dict[str, tuple[Route, tuple[int, ...]]] = {
    "health": (health, (0,)),
    "instances": (get_instance, (1,)),
    "by-state": (by_state, (2,)),
    "by-metadata": (by_metadata, (1, 2)),
    "by-time": (by_time, (0,)),
    "counts": (counts, (1,)),
}


def answer(storage: Storage, target: str) -> tuple[int, Any]:
    """(status, JSON body) for a GET of *target* (path and query string)."""
    url = urlsplit(target)
    raw = url.path.split("/")[1:]  # split before decoding: "%2F" stays inside a segment
    if raw and raw[-1] == "" and len(raw) > 1:
        raw.pop()  # a trailing slash
    route = ROUTES.get(raw[0] if raw else "")
    if route is None or len(raw) - 1 not in route[1]:
        return 404, {"error": f"no route for {url.path!r}", "routes": ROUTE_HELP}
    try:
        args = [unquote(segment, errors="strict") for segment in raw[1:]]
    except UnicodeDecodeError:
        return 400, {"error": f"path {url.path!r} is not percent-encoded UTF-8"}
    handler = route[0]
    try:
        return handler(storage, args, url.query)
    except NotFound as exc:
        return 404, {"error": str(exc)}
    except (BadRequest, InvalidInputError, InvalidTypeError) as exc:
        return 400, {"error": str(exc)}
    except NotFoundError as exc:
        return 404, {"error": str(exc)}


ROUTE_HELP = [
    "/health",
    "/instances/<id>",
    "/by-state/<machine>/<state>?limit=&cursor=",
    "/by-metadata/<key>/<value>?type=&limit=&cursor=",
    "/by-metadata/<key>?start=&end=&type=&limit=&cursor=",
    "/by-time?start_ms=&end_ms=&newest_first=&limit=&cursor=",
    "/counts/<machine>",
]


# --- the server ---------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    storage: ClassVar[Storage]
    server_version = "rstmdb-lookup/0.1"
    quiet: ClassVar[bool] = False

    def do_GET(self) -> None:
        try:
            status, body = answer(self.storage, self.path)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            status, body = 500, {"error": "internal error; see the service's log"}
        self.send_json(status, body)

    do_HEAD = do_GET  # send_json leaves the body out

    def refuse(self) -> None:
        self.send_json(405, {"error": f"{self.command} is not supported; use GET"}, allow="GET")

    do_POST = do_PUT = do_DELETE = do_PATCH = refuse

    def send_json(self, status: int, body: Any, allow: str | None = None) -> None:
        data = json.dumps(body, allow_nan=False).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (a malformed request line, a too-long header…), as JSON.
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        self.send_json(code, {"error": message or phrase})

    def log_message(self, format: str, *args: Any) -> None:
        if not self.quiet:
            super().log_message(format, *args)


class Server(ThreadingHTTPServer):
    daemon_threads = True


def serve(data_dir: str, host: str, port: int, quiet: bool) -> None:
    with open_store(data_dir) as storage:
        Handler.storage = storage
        Handler.quiet = quiet
        if ":" in host:
            Server.address_family = socket.AF_INET6
        with Server((host, port), Handler) as server:
            bound_host, bound_port = server.server_address[:2]
            shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
            print(f"http://{shown}:{bound_port}", flush=True)  # the first line: tests read it
            print(f"serving {data_dir} (Ctrl-C or SIGTERM to stop)", file=sys.stderr, flush=True)
            server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="rstmdb-data", help="default ./rstmdb-data")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="default 8080; 0 picks one")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    # SIGTERM ends serve_forever like Ctrl-C does, so the store is closed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.data_dir, args.host, args.port, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
