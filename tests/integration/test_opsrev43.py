"""A daemon's default host id where it holds a credential of the scheduler (opsrev43, a review of ops43).

ops43 made `gpupool serve` without `--host-id` the host name only on port 50051, `<host name>-PORT` elsewhere and
`<host name>-<6 random hex>` on port 0. The scheduler lets a host credential act only as the host it names (a host
certificate's `gpupool://host/<name>`, a join token's `host <name>` line): a daemon whose certificate or join token
names the host name (the id every daemon given none had until round 43) and listening elsewhere than 50051 registered
as another id and was refused (PERMISSION_DENIED) at every retry, never joining the pool. Now a daemon given no
`--host-id` is its certificate's host name, else with a join token the host name (as before round 43); ops43's
distinct ids remain for daemons that present neither (an `--insecure` scheduler's). Real schedulers and daemons.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from scheduler_fixtures import Proc
from support import get_pki
from test_security import start_pool

from gpupool.config import write_secret
from scheduler.auth import credential_line

pytestmark = pytest.mark.slow
REGISTERED = r"registered with scheduler \S+ as (\S+) \("
REFUSED = r"scheduler \S+: .*(PERMISSION_DENIED|may not act as host)"


def _serve(address: str, public: Path, *flags: str) -> Proc:
    return Proc(
        ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--fake-gpus", "1", "--fake-gpu-memory",
         "256MiB", "--token-public-keys", str(public), "--scheduler", address, "--heartbeat-interval", "0.5",
         "--isolation", "thread", *flags]
    )  # fmt: skip


def _outcome(proc: Proc) -> str:
    """The host id the daemon registered as, or the refusal it logged."""
    m = proc.wait_for(f"{REGISTERED}|{REFUSED}", timeout=150)
    return m.group(1) or f"refused: {m.group(0)}"


def test_a_daemon_with_a_host_certificate_registers_as_the_host_it_names(tmp_path: Path) -> None:
    """`serve --listen 127.0.0.1:0 --tls-cert <host certificate>` without --host-id, against a scheduler requiring
    client certificates: it registers as the certificate's host (on 1548fe2: `<host name>-<random>`, refused), both
    for a certificate naming the host name (how a daemon was deployed until round 43) and another name."""
    pool = start_pool(tmp_path)
    daemons = []
    try:
        for name in (socket.gethostname(), "gpu-07"):
            files = get_pki().issue("host", name)
            ca = get_pki().ca_file
            daemons.append(_serve(pool.address, pool.public, "--tls-cert", str(files.cert), "--tls-key",
                                  str(files.key), "--tls-ca", ca))  # fmt: skip
        assert [_outcome(d) for d in daemons] == [socket.gethostname(), "gpu-07"]
    finally:
        for d in daemons:
            d.stop()
        pool.scheduler.stop(grace=0.5)


def test_a_daemon_with_a_join_token_keeps_the_host_name(tmp_path: Path) -> None:
    """`serve --listen 127.0.0.1:0 --join-token-file F` (a `host <host name>` token; the scheduler asks no client
    certificate) without --host-id registers as the host name, as until round 43 (on 1548fe2: refused)."""
    name = socket.gethostname()
    pool = start_pool(tmp_path, tls=get_pki().server_config())  # --tls-client-auth none: API tokens identify
    with pool.credentials.open("a") as f:
        f.write(credential_line("host", name, "j0in"))
    token = tmp_path / "join.token"
    write_secret(token, b"j0in\n")
    server = get_pki().server_config()  # (a certificate naming no host: the token alone says who the daemon is)
    daemon = _serve(pool.address, pool.public, "--join-token-file", str(token), "--tls-cert", server.cert,
                    "--tls-key", server.key, "--tls-ca", server.ca)  # fmt: skip
    try:
        assert _outcome(daemon) == name
    finally:
        daemon.stop()
        pool.scheduler.stop(grace=0.5)
