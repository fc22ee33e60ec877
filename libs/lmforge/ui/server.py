"""`lmforge ui`: the status page, served over HTTP by the CLI's own process.

Run it with `lmforge ui [--port 8765]` next to a running `lmforge up`, and open the
address it prints. Routes:

  /               the page (every section rendered here, on the server)
  /api/sections   the same sections as JSON {"generated", "sections": {id: html}};
                  the page's script fetches it every second and swaps them in
  /api/status     the data behind them as JSON, for scripts
  /healthz        "ok"

Why a CLI command and not the gateway at /ui: the page must show the gateway itself
failing, restarting or scaled to zero, so it cannot live inside it; it reads the
supervisor's state file and the CLI's NATS credential, which are on the operator's
machine, not in a serving replica; and it keeps the gateway's HTTP surface (API keys,
tenants, TLS) to the model API. Why the standard library's threading HTTP server:
the page is for a handful of operators' tabs, every request is a lock and a copy of
the feed's snapshot, and the base install (what the CLI needs) has no web framework.

Like the gateway, it will not serve past loopback unless told `--insecure`: the page
has no login, and shows every run of the credential's tenant.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from lmforge.ui.feed import StatusFeed
from lmforge.ui.render import clock, render_page, render_sections

log = logging.getLogger("lmforge.ui")

POLL_MS = 1000
"""How often the page fetches its sections: a training step is reported once a second."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StatusPageServer(ThreadingHTTPServer):
    """An HTTP server that answers from one `StatusFeed`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], feed: StatusFeed, *,
                 poll_ms: int = POLL_MS) -> None:
        super().__init__(address, StatusPageHandler)
        self.feed = feed
        self.poll_ms = poll_ms

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/"


class StatusPageHandler(BaseHTTPRequestHandler):
    server: StatusPageServer

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8",
                       render_page(self.server.feed.snapshot(), poll_ms=self.server.poll_ms))
        elif path == "/api/sections":
            snapshot = self.server.feed.snapshot()
            self._send_json({"generated": clock(snapshot["generated"]),
                             "sections": render_sections(snapshot)})
        elif path == "/api/status":
            self._send_json(self.server.feed.snapshot())
        elif path == "/healthz":
            self._send(HTTPStatus.OK, "text/plain; charset=utf-8", "ok\n")
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8",
                       f"no page at {path}; the status page is at /\n")

    def _send_json(self, body: dict[str, Any]) -> None:
        self._send(HTTPStatus.OK, "application/json", json.dumps(body))

    def _send(self, status: HTTPStatus, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def serve(feed: StatusFeed, *, host: str, port: int,
          on_ready: Callable[[str], None] = print) -> None:
    """Serve the page until SIGTERM or Ctrl-C; `on_ready` hears the address once it
    listens (port 0 picks a free one)."""
    server = StatusPageServer((host, port), feed)
    feed.start()

    def stop(_signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        on_ready(f"lmforge status page at {server.url} (Ctrl-C to stop)")
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
        feed.stop()
