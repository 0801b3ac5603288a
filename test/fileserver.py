"""A local HTTP server on 127.0.0.1 for download tests: byte ranges, cut transfers, request log."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    """What the server answers for one path.

    Attributes:
        body: the bytes served.
        content_type: the Content-Type header.
        cut_after: when set, the next answer announces the full length, sends only this
            many bytes and closes the connection (then the setting is cleared).
        honour_ranges: False to answer every request with the whole body (status 200).
    """

    body: bytes
    content_type: str = "application/octet-stream"
    cut_after: int | None = None
    honour_ranges: bool = True


@dataclass
class FileServer:
    """Routes by path, and the log of (path, Range header) of every request."""

    port: int = 0
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.requests.append((self.path, self.headers.get("Range")))
            route = server.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            start = 0
            range_header = self.headers.get("Range")
            if range_header and route.honour_ranges:
                start = int(range_header.removeprefix("bytes=").rstrip("-"))
                if start >= len(route.body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header(
                    "Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}"
                )
            else:
                self.send_response(200)
            payload = route.body[start:]
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if route.cut_after is not None:
                self.wfile.write(payload[: route.cut_after])
                route.cut_after = None
                self.close_connection = True
                return
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the tests read `server.requests`."""

    return Handler


@contextmanager
def serving() -> Iterator[FileServer]:
    """A FileServer running on a free port of 127.0.0.1 for the duration of the block."""
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
