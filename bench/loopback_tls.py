"""Loopback TLS for the benches that drive side sockets in one process (side_reader.py, side_syscalls.py,
bulk_duplex.py): the side socket's own TLS contexts on a throwaway loopback PKI, and a loopback TCP connection
between them, handshaken. Until round 42 (front42) each of those benches made its own.

Each bench may run with another checkout's python (`--against-python`): only `pki.loopback_env`, `tls.TlsConfig`,
`tls.SocketServerTls` and `tls.socket_client_context` of the imported gpupool are used, as every tree since round 38
has them.
"""

from __future__ import annotations

import select
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the daemon's side port context, the client's): `tls.SocketServerTls` and `tls.socket_client_context` as the
    daemon and the client make them, with a loopback PKI made in a temporary folder (the contexts hold what they
    loaded: the folder goes)."""
    from gpupool import pki, tls

    with tempfile.TemporaryDirectory() as tmp:
        env = pki.loopback_env(Path(tmp) / "pki")
        cfg = tls.TlsConfig(ca=env["GPUPOOL_TLS_CA"], cert=env["GPUPOOL_TLS_CERT"], key=env["GPUPOOL_TLS_KEY"])
        server_ctx = tls.SocketServerTls(cfg).context()
        client_ctx = tls.socket_client_context(cfg)
    assert client_ctx is not None
    return server_ctx, client_ctx


def pair(ctxs: tuple[ssl.SSLContext, ssl.SSLContext] | None, nodelay: bool = True) -> tuple[Any, Any]:
    """A loopback TCP connection: (the accepting end, the connecting end), with TCP_NODELAY (as both ends of a
    side socket set it) unless `nodelay` is False; with `ctxs` (`contexts()`), each end wrapped in its TLS context
    (the client's for the server name "localhost") and handshaken, in this thread (no thread is started: a bench
    under callgrind numbers its threads by creation). Both ends come back non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        connecting = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    ends: list[Any] = [accepted, connecting]
    for end in ends:
        if nodelay:
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end.setblocking(False)
    if ctxs is None:
        return accepted, connecting
    ends = [
        ctxs[0].wrap_socket(accepted, server_side=True, do_handshake_on_connect=False),
        ctxs[1].wrap_socket(connecting, server_hostname="localhost", do_handshake_on_connect=False),
    ]
    pending, deadline = list(ends), time.monotonic() + 30.0
    while pending:  # both handshakes in turns, each going on as its peer's bytes arrive
        for end in list(pending):
            try:
                end.do_handshake()
                pending.remove(end)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError("loopback TLS handshake")
            select.select(pending, [], [], 0.05)
    return ends[0], ends[1]
