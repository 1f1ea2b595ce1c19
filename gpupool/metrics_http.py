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

TLS (round 40): the endpoints answer every tenant's names and usage, so they serve HTTPS with the program's own
certificate (`--tls-cert/--tls-key`) and require a client certificate signed by its `--tls-ca` that names a scraper:
``gpupool://metrics/<name>`` (what `gpupool up` issues for Prometheus, `pki-metrics-prometheus`; no gRPC service
accepts that role) or ``gpupool://admin/<name>`` (an operator, who sees every tenant through the scheduler's
ListPool anyway). A tenant's or a host's certificate is answered 403: a tenant would read the other tenants'
figures. Until round 40 they were plaintext HTTP that answered anyone who reached them (any local user on the
default 127.0.0.1). Plaintext only where the operator asks (`--metrics-plaintext`, or the program's own
`--insecure`), with a warning. The handshake runs in the connection's thread, never the accept loop, bounded as a
whole by `REQUEST_SECONDS` (not per read: a client trickling its hello a byte at a time is dropped too), and a
connection in its handshake counts as waiting for its request: a newcomer takes its slot.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cryptography import x509
from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from gpupool import certrevoke, pki, tls
from gpupool.errors import InvalidArgument

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05  # seconds: the longest a stop waits for the serving loop
REQUEST_SECONDS = 5.0  # a connection's socket timeout: a client silent this long is dropped
MAX_CONNECTIONS = 32  # connections served at once (a thread each); more are closed at once
SCRAPERS = ("metrics", "admin")  # the roles of the client certificates that may scrape over TLS
REFUSED = "gpupool.refused"  # the WSGI environ key: why this connection's client may not scrape ("" : it may)


def scraper_refusal(
    der: bytes | None, cfg: tls.TlsConfig | None = None, revoked: certrevoke.RevokedCerts | None = None
) -> str:
    """Why the client certificate `der` (verified against the CA already) may not scrape, "" when it may: exactly
    one gpupool identity, of a role in SCRAPERS (believed as `cfg` believes it: `TlsConfig.believed`, a daemon's
    --tls-client-ca's certificate no operator's), and not in `revoked` (the program's revoked client certificates,
    `gpupool cert revoke`: round 49, sec49; until then a revoked metrics or admin certificate, refused at every gRPC
    call, still read every tenant's figures here)."""
    if not der:
        return "no client certificate"
    if revoked is not None and revoked.refused_der(der):
        return "a revoked client certificate (gpupool cert revoke)"
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "a client certificate that does not parse"
    named = cfg.believed(cert) if cfg is not None else set(pki.identities(cert))
    if cfg is not None and not named and pki.identities(cert):
        return "a metrics or admin certificate not of the pool's CA (--tls-ca: --tls-client-ca's name tenants only)"
    if len(named) != 1:
        return f"a client certificate naming {len(named)} gpupool identities (one gpupool://metrics/<name> is needed)"
    role, name = named.pop()
    if role not in SCRAPERS:
        return f"the {role} certificate {name[:64]!r} may not read the metrics (a metrics or admin certificate may)"
    return ""


class _Quiet(WSGIRequestHandler):
    timeout = REQUEST_SECONDS  # socketserver.StreamRequestHandler sets it on the connection

    def parse_request(self) -> bool:
        """The request line and headers read: from now on the connection is being answered (never given up to a
        newcomer, `_Server.process_request`)."""
        ok = super().parse_request()
        if ok:
            self.server.answering(self.connection)  # type: ignore[attr-defined]
        return ok

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        if isinstance(self.connection, ssl.SSLSocket):
            env[REFUSED] = scraper_refusal(
                self.connection.getpeercert(binary_form=True),
                getattr(self.server, "tls_config", None),
                getattr(self.server, "revoked", None),
            )
        return env

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """No access log (as prometheus_client's own handler)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the process open
    request_queue_size = 64  # the listen backlog (socketserver's 5 made a burst of connections wait seconds)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_connections = 0  # served now (a thread each): at most MAX_CONNECTIONS
        # the connections served now that have not sent their whole request yet (their handshake included), oldest
        # first: the accepted socket -> the socket that is shut to drop it (its TLS socket once wrapped)
        self._waiting: dict[Any, Any] = {}
        self._changed = threading.Condition()
        self.tls: tls.SocketServerTls | None = None  # HTTPS (the client certificate of a scraper required), or HTTP

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve `request` in a thread of its own. With MAX_CONNECTIONS served already, the oldest of them still
        waiting for its request is closed for it: a client holding every slot with idle or trickling connections
        (reopened as they are dropped) never keeps a scrape out, since a scrape sends its request at once and is
        then answered, never closed. Only when all of them are being answered is the newcomer closed unanswered."""
        with self._changed:
            if self.open_connections >= MAX_CONNECTIONS:
                oldest = next(iter(self._waiting), None)
                if oldest is not None:
                    shut = self._waiting.pop(oldest)
                    try:  # (the socket's own shutdown, not TLS's: no record written, no state of its thread changed)
                        socket.socket.shutdown(shut, socket.SHUT_RDWR)  # its thread's read ends at once: it ends
                    except OSError:
                        pass
                    # its thread's end frees the slot (ms): at most MAX_CONNECTIONS threads, ever
                    self._changed.wait_for(lambda: self.open_connections < MAX_CONNECTIONS, timeout=1.0)
            full = self.open_connections >= MAX_CONNECTIONS
            if not full:
                self.open_connections += 1
                self._waiting[request] = request
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

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Serve one connection (in its thread); over TLS, its handshake first, bounded as a whole."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        with self._changed:  # (no I/O: the handshake is below) the TLS socket is the one a newcomer shuts now
            conn = self.tls.context().wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            if request in self._waiting:
                self._waiting[request] = conn
        try:
            handshake(conn, REQUEST_SECONDS)
            self.RequestHandlerClass(conn, client_address, self)  # type: ignore[arg-type]  # (typeshed: Self)
        finally:
            try:
                socket.socket.shutdown(conn, socket.SHUT_WR)  # (as socketserver's shutdown_request does for HTTP)
            except OSError:
                pass
            conn.close()

    def answering(self, conn: Any) -> None:
        with self._changed:
            for request, shut in list(self._waiting.items()):
                if conn is request or conn is shut:
                    del self._waiting[request]

    def _release(self, request: Any) -> None:
        with self._changed:
            self.open_connections -= 1
            self._waiting.pop(request, None)
            self._changed.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away: nothing to log (socketserver prints a traceback to stderr)."""


def handshake(conn: ssl.SSLSocket, seconds: float) -> None:
    """The server side of `conn`'s TLS handshake, done within `seconds` in all (TimeoutError past them), whatever
    the client sends when; `conn` is left blocking with a timeout of `seconds` a read or write."""
    conn.setblocking(False)
    deadline = time.monotonic() + seconds
    poller = select.poll()
    while True:
        try:
            conn.do_handshake()
            break
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("TLS handshake not done in time")
        poller.register(conn, events)
        poller.poll(left * 1000)
        poller.unregister(conn)
    conn.settimeout(seconds)


def _scrapers_only(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """`app`, but 403 to a TLS client whose certificate names no scraper (`scraper_refusal`)."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        refused = environ.get(REFUSED, "")
        if refused:
            start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"refused: {refused}\n".encode()]
        return app(environ, start_response)

    return guarded


def metrics_tls(cfg: tls.TlsConfig) -> tls.SocketServerTls:
    """The metrics port's TLS: `cfg`'s certificate and key, a client certificate signed by its clients' CA required
    (`TlsConfig.clients_ca`: a daemon's --tls-client-ca, else its --tls-ca)."""
    if not cfg.clients_ca:
        raise InvalidArgument(tls.METRICS_NEED_CA)
    return tls.SocketServerTls(dataclasses.replace(cfg, client_auth="require"), side=False)


def serve_metrics(
    host: str,
    port: int,
    registry: CollectorRegistry,
    tls_config: tls.TlsConfig | None = None,
    program: str = "",
    revoked: certrevoke.RevokedCerts | None = None,
) -> WSGIServer:
    """Serve `registry` on https://HOST:PORT/metrics with `tls_config`'s certificate to scrapers' client
    certificates (see the module) that `revoked` (the program's list, kept current by it) does not hold, or on
    http:// when `tls_config` is None or insecure (warning, naming `program`);
    port 0 picks one (`server.server_port` is the bound port); from a daemon thread; stop with `stop_metrics`. An
    IPv6 host gets an IPv6 socket (as prometheus_client does)."""
    context = None if tls_config is None or tls_config.insecure else metrics_tls(tls_config)
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_Server):
        address_family = family

    try:
        server = make_server(
            str(sockaddr[0]), port, _scrapers_only(make_wsgi_app(registry)), Server, handler_class=_Quiet
        )
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # was "[Errno 98] Address already in use", naming neither the port nor the flag (journey42: a second
        # `gpupool up` on one host); the programs' one wording since round 55
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        other = program.removeprefix("the ") or "program"
        raise OSError(tls.listen_refusal(address, "--metrics-listen", other)) from None
    server.tls = context  # type: ignore[attr-defined]
    server.tls_config = tls_config  # type: ignore[attr-defined]  # (`scraper_refusal`: which identities it believes)
    server.revoked = revoked  # type: ignore[attr-defined]  # (`scraper_refusal`: which certificates are revoked)
    if context is None:
        log.warning(
            "%s serves its metrics in PLAINTEXT HTTP on %s:%d (%s): whoever reaches the port reads every tenant's "
            "names and usage",
            program or "this program", host, server.server_port,
            "--insecure" if tls_config is not None and tls_config.insecure else "--metrics-plaintext",
        )  # fmt: skip
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL}, name="metrics-http", daemon=True
    )
    thread.start()
    return server


def stop_metrics(server: WSGIServer) -> None:
    """Stop serving (within `POLL_INTERVAL` s) and close the socket."""
    server.shutdown()
    server.server_close()
