"""Round 40 (met40): the daemon's and the scheduler's /metrics endpoints are HTTPS by default, to a client
certificate of the pool's CA that names a scraper (`gpupool://metrics/<name>`, or an operator's `admin`). Until
round 40 they were plaintext HTTP that answered whoever reached them: any local user of a host read every tenant's
names, leases and usage from the default 127.0.0.1:9450/9451 (docs/security.md). Plaintext only when the operator
asks (`--metrics-plaintext`, or the program's own `--insecure`), with a warning; a handshake is bounded as a whole.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Handle, Session
from prometheus_client import CollectorRegistry, Gauge
from scheduler_fixtures import Proc, SimHost, start_scheduler
from support import get_pki, metrics_context, scrape, tls_channel

from gpupool import metrics_http, pki, tls
from gpupool._proto import scheduler_pb2, scheduler_pb2_grpc
from gpupool.errors import InvalidArgument

PLAIN_REFUSED = (urllib.error.URLError, http.client.HTTPException, ConnectionError)


def plain_get(port: int) -> str:
    """GET http://127.0.0.1:PORT/metrics as anyone who reaches the port does (no TLS, no certificate)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def refused_code(port: int, role: str, name: str = "someone") -> int:
    with pytest.raises(urllib.error.HTTPError) as info:
        scrape(port, role, name)
    return int(info.value.code)


def test_a_plain_scrape_of_a_default_daemon_gets_no_tenant_data(daemon: Any) -> None:
    """A daemon as the tests start it (TLS, the default --metrics-listen): a tenant's session runs. Until round 40
    a plain GET of /metrics (any local user) got `tenant="met40-alice"` and her lease; now it gets no page. The
    scraper's certificate reads it; a tenant's certificate is refused (403): it would read the other tenants."""
    token = daemon.token(tenant="met40-alice", lease_id="met40-lease", share=0.5)
    with Session.attach(daemon.address, token) as s:
        h = Handle(s.upload(torch.ones(8, 8)))
        s.call("aten::mm.default", h, h)
        s.sync()
        with pytest.raises(PLAIN_REFUSED):
            page = plain_get(daemon.metrics_port)
            assert 'tenant="met40-alice"' not in page  # (what base c586b76 answered: the page, her name in it)
        for role in ("metrics", ""):  # Prometheus' certificate, and an operator's (the test process's admin one)
            text = scrape(daemon.metrics_port, role)
            assert 'tenant="met40-alice"' in text and 'lease="met40-lease"' in text
        assert refused_code(daemon.metrics_port, "tenant", "met40-bob") == 403
        assert refused_code(daemon.metrics_port, "host", "other-host") == 403


@pytest.fixture
def sched(tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    proc, address = start_scheduler(tmp_path)  # the default TLS settings (the tests' CA and certificate)
    host = SimHost(address, "met40-secret-host").start()
    try:
        yield proc, address
    finally:
        host.stop()
        proc.stop()


def test_the_scheduler_s_metrics_answer_only_scrapers(sched: tuple[Proc, str]) -> None:
    """`gpupool scheduler` with its default --metrics-listen: a plain GET gets no page (base: the pool's hosts and
    leases); the metrics and admin certificates read it, a tenant's and a host's are answered 403, and the
    metrics certificate itself is no credential on the scheduler's gRPC port (UNAUTHENTICATED)."""
    proc, address = sched
    port = proc.metrics_port()
    with pytest.raises(PLAIN_REFUSED):
        page = plain_get(port)
        assert "met40-secret-host" not in page  # (base c586b76: the page, the host in it)
    assert any(f"metrics on https://127.0.0.1:{port}/metrics" in line for line in proc.lines), proc.log()
    for role in ("metrics", ""):
        assert "met40-secret-host" in scrape(port, role)
    assert refused_code(port, "tenant") == 403
    assert refused_code(port, "host", "met40-secret-host") == 403
    stub = scheduler_pb2_grpc.SchedulerStub(
        tls.channel(address, cfg=get_pki().client_config("metrics", "prometheus"), token=False)
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.ListPool(scheduler_pb2.ListPoolRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    assert scheduler_pb2_grpc.SchedulerStub(tls_channel(address)).ListPool(scheduler_pb2.ListPoolRequest(), timeout=10)


def test_metrics_plaintext_only_when_the_operator_asks(tmp_path: Path) -> None:
    """`--metrics-plaintext` serves plain HTTP, and says so in a warning; without it (above) no plain page.
    Base c586b76 has no such flag (the scheduler refuses to start)."""
    proc, _ = start_scheduler(tmp_path, "--metrics-plaintext")
    try:
        port = proc.metrics_port()
        assert "gpupool_" in plain_get(port)
        log = "\n".join(proc.lines)
        assert f"metrics on http://127.0.0.1:{port}/metrics" in log
        assert "PLAINTEXT HTTP" in log and "--metrics-plaintext" in log
    finally:
        proc.stop()


def test_an_insecure_daemon_serves_plain_metrics_with_a_warning(
    daemon_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon run with its explicit plaintext flag (--insecure: gRPC without TLS) has no certificate to serve
    metrics with: they are plain HTTP too, with a warning naming --insecure (pins what base did, less the warning)."""
    with caplog.at_level(logging.WARNING, logger="gpupool.metrics_http"):
        d = daemon_factory(tls=tls.TlsConfig(insecure=True))
    assert "gpupool_device_info{" in plain_get(d.metrics_port)
    assert any("PLAINTEXT HTTP" in r.getMessage() and "--insecure" in r.getMessage() for r in caplog.records)


def test_metrics_over_tls_need_the_ca_of_their_scrapers(daemon_factory: Any) -> None:
    """A daemon with a certificate but no --tls-ca (its gRPC port takes tokens, no client certificates) cannot
    tell a scraper's certificate: it refuses to start, naming --tls-ca, --metrics-plaintext and --metrics-listen 0
    (base: it served plaintext metrics to anyone)."""
    cfg = get_pki().server_config()
    with pytest.raises(InvalidArgument, match="--tls-ca.*--metrics-plaintext.*--metrics-listen 0"):
        daemon_factory(tls=tls.TlsConfig(cert=cfg.cert, key=cfg.key))
    assert daemon_factory(tls=tls.TlsConfig(cert=cfg.cert, key=cfg.key), metrics_listen="0").metrics_port == 0


@pytest.fixture
def page() -> Iterator[int]:
    """gpupool/metrics_http.py's server with the tests' certificate, serving one gauge."""
    registry = CollectorRegistry()
    Gauge("met40_gauge", "a gauge", registry=registry).set(1)
    server = metrics_http.serve_metrics("127.0.0.1", 0, registry, get_pki().server_config(), "the test")
    try:
        yield int(server.server_port)
    finally:
        metrics_http.stop_metrics(server)


def test_a_trickled_handshake_is_dropped_within_its_bound(page: int) -> None:
    """A client that sends its TLS hello a byte every 0.5 s never lets one read time out; the handshake is bounded
    as a whole (REQUEST_SECONDS), so its connection is closed then, not when the client likes. A client certificate
    of another CA fails the handshake; a scrape is still served."""
    hello = _client_hello()
    c = socket.create_connection(("127.0.0.1", page), timeout=30)
    start = time.monotonic()
    closed = None
    try:
        for byte in hello:
            c.sendall(bytes([byte]))
            time.sleep(0.5)
            if time.monotonic() - start > metrics_http.REQUEST_SECONDS + 10:
                break
    except OSError:
        closed = time.monotonic() - start
    finally:
        c.close()
    assert closed is not None and closed < metrics_http.REQUEST_SECONDS + 3, closed
    other = pki.LocalCA(Path(tempfile.mkdtemp(dir=get_pki().directory)))
    stranger = other.issue("metrics", "prometheus")
    context = ssl.create_default_context(cafile=get_pki().ca_file)
    context.load_cert_chain(str(stranger.cert), str(stranger.key))
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
        with urllib.request.urlopen(f"https://127.0.0.1:{page}/metrics", timeout=10, context=context) as resp:
            resp.read()
    assert "met40_gauge 1.0" in scrape(page, "metrics")


def _client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (what an ssl client first sends), taken from a memory BIO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = metrics_context("metrics").wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 100
    return hello
