"""The /metrics endpoint of the daemon and the scheduler: prometheus_client's WSGI app on a threading HTTP server
that stops at once.

prometheus_client's `start_http_server` runs `serve_forever()` with its default 0.5 s poll interval, and
`shutdown()` waits for that poll to come round: every daemon or scheduler stop took 0.3-0.5 s in that wait alone.
Here the loop polls every `POLL_INTERVAL` s, so a stop waits at most that long.

A client is served in a thread of its own (as prometheus_client's server does), so a slow one never delays a scrape;
but prometheus_client's threads waited on their client without end: each idle or trickling connection (slowloris)
kept a thread, and a local client opening thousands held that many threads and sockets in the daemon or scheduler
(threads that gRPC, the workers and collectives then could not have). Here a connection's reads and writes give up
after `REQUEST_SECONDS`, and at most `MAX_CONNECTIONS` are served at once. Round 20 closed every connection past
them unanswered, so one client holding 32 idle or trickling connections (a byte every few seconds resets the
timeout; one dropped is reopened) kept every scrape out. Now a newcomer takes the slot of the oldest connection that
has not sent its whole request yet: a scrape (its request sent at once, then answered in milliseconds) is always
served; only when all 32 are being answered is a newcomer closed unanswered.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

POLL_INTERVAL = 0.05  # seconds: the longest a stop waits for the serving loop
REQUEST_SECONDS = 5.0  # a connection's socket timeout: a client silent this long is dropped
MAX_CONNECTIONS = 32  # connections served at once (a thread each); more are closed at once


class _Quiet(WSGIRequestHandler):
    timeout = REQUEST_SECONDS  # socketserver.StreamRequestHandler sets it on the connection

    def parse_request(self) -> bool:
        """The request line and headers read: from now on the connection is being answered (never given up to a
        newcomer, `_Server.process_request`)."""
        ok = super().parse_request()
        if ok:
            self.server.answering(self.connection)  # type: ignore[attr-defined]
        return ok

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """No access log (as prometheus_client's own handler)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the process open
    request_queue_size = 64  # the listen backlog (socketserver's 5 made a burst of connections wait seconds)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_connections = 0  # served now (a thread each): at most MAX_CONNECTIONS
        # the connections served now that have not sent their whole request yet, oldest first
        self._waiting: dict[Any, None] = {}
        self._changed = threading.Condition()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve `request` in a thread of its own. With MAX_CONNECTIONS served already, the oldest of them still
        waiting for its request is closed for it: a client holding every slot with idle or trickling connections
        (reopened as they are dropped) never keeps a scrape out, since a scrape sends its request at once and is
        then answered, never closed. Only when all of them are being answered is the newcomer closed unanswered."""
        with self._changed:
            if self.open_connections >= MAX_CONNECTIONS:
                oldest = next(iter(self._waiting), None)
                if oldest is not None:
                    del self._waiting[oldest]
                    try:
                        oldest.shutdown(socket.SHUT_RDWR)  # its thread's read ends at once: the thread ends
                    except OSError:
                        pass
                    # its thread's end frees the slot (ms): at most MAX_CONNECTIONS threads, ever
                    self._changed.wait_for(lambda: self.open_connections < MAX_CONNECTIONS, timeout=1.0)
            full = self.open_connections >= MAX_CONNECTIONS
            if not full:
                self.open_connections += 1
                self._waiting[request] = None
        if full:
            self.shutdown_request(request)  # closed unanswered: no thread for it
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (the process is out of them): the slot is free again
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def answering(self, request: Any) -> None:
        with self._changed:
            self._waiting.pop(request, None)

    def _release(self, request: Any) -> None:
        with self._changed:
            self.open_connections -= 1
            self._waiting.pop(request, None)
            self._changed.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away: nothing to log (socketserver prints a traceback to stderr)."""


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
