"""A bare cheroot server that takes PUTs into a plain folder: the floor under any cheroot WebDAV
server, as ``bench/bare_fuse.py`` is under any pyfuse3 mount.

Run by ``bench/compare.py`` beside dicomfs's bridge, never by the product::

    python bench/bare_webdav.py FOLDER [--bind HOST:PORT] [--threads N]

It answers ``PUT /<path>`` by streaming the body into ``FOLDER/<path>`` (its folders made as
needed) and ``201 Created``; every other request gets ``405``. The server has the bridge's cheroot
settings (``webdav.threads`` = 32 request threads, a request queue of 64, a 60 s timeout, no body
size limit) and nothing of dicomfs: no wsgidav, no authentication, no locks, no ingest. What a
client's PUTs take against it is what cheroot, the client and the kernel take, so the bridge's
``PUT until ingested`` figures against it say how much of their cost is dicomfs's own. It prints
``bare WebDAV at http://HOST:PORT/`` once it listens and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cheroot import wsgi

CHUNK = 1 << 20

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class PutOnly:
    """The WSGI application: PUT writes a file under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "PUT":
            return self._answer(start_response, "405 Method Not Allowed", [("Allow", "PUT")])
        parts = [p for p in unquote(environ.get("PATH_INFO", "")).split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            return self._answer(start_response, "403 Forbidden")
        target = self.root.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        body, left = environ["wsgi.input"], int(environ.get("CONTENT_LENGTH") or 0)
        with open(target, "wb") as out:
            while left > 0:
                data = body.read(min(CHUNK, left))
                if not data:
                    break
                out.write(data)
                left -= len(data)
        if left:
            target.unlink(missing_ok=True)
            return self._answer(start_response, "400 Bad Request")
        return self._answer(start_response, "201 Created")

    @staticmethod
    def _answer(start_response: StartResponse, status: str, headers: list[tuple[str, str]] | None = None) -> list[bytes]:
        start_response(status, [("Content-Length", "0"), *(headers or [])])
        return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--bind", default="127.0.0.1:0", help="HOST:PORT (port 0: a free one)")
    parser.add_argument("--threads", type=int, default=32, help="request threads (the bridge's default)")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    args.folder.mkdir(parents=True, exist_ok=True)
    server = wsgi.Server((host, int(port)), PutOnly(args.folder), numthreads=args.threads,
                         server_name="bare", request_queue_size=64, timeout=60, shutdown_timeout=5)
    server.max_request_body_size = 0
    server.prepare()
    stop = threading.Event()
    for received in (signal.SIGTERM, signal.SIGINT):
        signal.signal(received, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve, daemon=True)
    serving.start()
    print(f"bare WebDAV at http://{host}:{server.bind_addr[1]}/", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
