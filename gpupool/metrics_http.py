"""The /metrics endpoint of the daemon and the scheduler: prometheus_client's WSGI app on a threading HTTP server
that stops at once.

prometheus_client's `start_http_server` runs `serve_forever()` with its default 0.5 s poll interval, and
`shutdown()` waits for that poll to come round: every daemon or scheduler stop took 0.3-0.5 s in that wait alone.
Here the loop polls every `POLL_INTERVAL` s, so a stop waits at most that long.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

POLL_INTERVAL = 0.05  # seconds: the longest a stop waits for the serving loop


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """No access log (as prometheus_client's own handler)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the process open


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serve `registry` on http://HOST:PORT/metrics (port 0 picks one; `server.server_port` is the bound port) from a
    daemon thread; stop with `stop_metrics`. An IPv6 host gets an IPv6 socket (as prometheus_client does)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_Server):
        address_family = family

    server = make_server(str(sockaddr[0]), port, make_wsgi_app(registry), Server, handler_class=_Quiet)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL}, name="metrics-http", daemon=True
    )
    thread.start()
    return server


def stop_metrics(server: WSGIServer) -> None:
    """Stop serving (within `POLL_INTERVAL` s) and close the socket."""
    server.shutdown()
    server.server_close()
