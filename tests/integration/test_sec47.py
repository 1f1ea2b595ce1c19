"""Round 47 (sec47): what round 46 left of the scheduler as a credential authority and the daemon as a tenant boundary,
against real daemons (and schedulers) on loopback.

1. A session's lease end was read from the wall clock alone: after a forward step the session ran on until the
   reaper's next look (up to `reap_interval`, 10 s), and after a backward step by X it ran X past its end, and tokens
   that expired within X before the step attached and refreshed again. A step of the daemon's wall clock is simulated
   here by the `time` its module reads (`server.daemon.time`, and `gpupool.tokens.time`, which verifies tokens when
   given no time), for in-process daemons only and undone after each test.
2. `gpupool token mint` had no `--cert`: a hand-minted token was always unbound (a bearer's at every daemon).
3. An operator whose name was a tenant's, allocating for that tenant, had the lease bound to the operator's own
   certificate, which the tenant's could not attach (secrev46).
4. `gpupool serve`'s default `--tls-client-auth none` held a certificate pool's daemon (one started without the flag)
   to nothing: now `auto`, `require` where the daemon proves itself to its scheduler with its certificate.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import test_control45
import torch
from gpupool.client.session import Session
from gpupool.server import daemon as server_daemon
from support import REGISTER_WAIT_S, TEST_HOST, DaemonFactory, get_pki, operator_tls, start_serve_process, stop_process
from test_control45 import _code, _daemon
from test_sec46 import _allocate, _attach, _fingerprint, _stub
from test_security import Pool

from gpupool import certrevoke, errors, tokencli
from gpupool import tokens as token_module
from gpupool._proto import device_pb2

pool = test_control45.pool  # the fixture: a scheduler on a SQLite state of its own

_real_time = time.time
_real_monotonic = time.monotonic


class _Stepped:
    """The `time` module, its wall clock stepped by `step` seconds (`monotonic`, `sleep` and the rest as they are)."""

    def __init__(self) -> None:
        self.step = 0.0
        self.elapsed = 0.0  # added to the monotonic clock (time passing, without waiting for it)

    def time(self) -> float:
        return _real_time() + self.step + self.elapsed

    def monotonic(self) -> float:
        return _real_monotonic() + self.elapsed

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Stepped]:
    stepped = _Stepped()
    monkeypatch.setattr(server_daemon, "time", stepped)
    monkeypatch.setattr(token_module, "time", stepped)
    yield stepped


def _open(daemon: Any, s: Session) -> bool:
    return s.session_id in [x.session_id for x in daemon.running.daemon.session_list()]


def test_a_backward_step_of_the_wall_clock_does_not_lengthen_a_session(daemon: Any, clock: _Stepped) -> None:
    """A session whose lease ends in 1.5 s; the daemon's wall clock steps back an hour: the session still ends at its
    lease's end (its monotonic end, taken at attach). On 41939607 it ran on for the hour.

    The clock steps right after the attach (round 50): stepped after an upload and a sync, the sync had to come within
    the lease's 1.5 s, and at load 30-47 it came after (the lease had ended: "expired", 1 run in 10). Whether the sync
    comes before the end or after it, the session's end must not move."""
    s = Session.attach(daemon.address, daemon.token(ttl=1.5))
    ends = time.monotonic() + 1.5
    clock.step = -3600.0
    s.upload(torch.ones(4))
    try:
        s.sync()
    except errors.FailedPrecondition as exc:  # its lease ended already (a loaded box): at its end, not an hour on
        assert "expired" in str(exc), exc
    ends_by(daemon, s, ends + 3.0, "a step back of the wall clock kept the session open past its lease's end")


def ends_by(daemon: Any, s: Session, deadline: float, why: str) -> None:
    """`s`, sending no frame, is closed before `deadline` (monotonic), and then its next frame finds it expired."""
    while _open(daemon, s):
        assert time.monotonic() < deadline, why
        time.sleep(0.05)
    with pytest.raises(errors.FailedPrecondition, match="expired"):
        s.sync()
    s.close()


def test_a_backward_step_revives_no_expired_token(daemon: Any, clock: _Stepped) -> None:
    """Tokens that expired 30 s ago, the daemon's wall clock then stepped back an hour: Attach and RefreshToken still
    refuse them (the daemon's lease clock does not go back: `LeaseClock`). On 41939607 both took them, and the refresh
    moved the session's end to the expired token's, an hour on."""
    live = Session.attach(daemon.address, daemon.token(ttl=600, lease_id="sec47-live"))
    expired = daemon.token(ttl=-30)
    stale_renewal = daemon.token(ttl=-30, lease_id="sec47-live")
    clock.step = -3600.0
    with pytest.raises(errors.Unauthenticated, match="expired"):
        Session.attach(daemon.address, expired).close()
    with pytest.raises(errors.Unauthenticated, match="expired"):
        live.refresh(stale_renewal)
    live.sync()  # (a refused refresh ends nothing)
    live.close()


def test_a_daemon_whose_clock_was_corrected_back_takes_valid_tokens_again(daemon: Any, clock: _Stepped) -> None:
    """(secrev47) The daemon's wall clock stepped back 30 s (an NTP correction of a clock that was ahead): its lease
    clock meets the wall clock again (at half speed, 60 s on), so a token valid by the wall clock attaches once the
    lease clock has passed no more of it. On d5fc4fa4 the lease clock ran on at full speed, 30 s ahead for good: every
    token within 30 s of its expiry was refused until the daemon restarted (here: 40 s after the step, one with 15 s
    left by the wall clock). A token that either clock calls expired is still refused."""
    start = _real_time()
    clock.step = -30.0
    clock.elapsed = 40.0  # (40 s on: the wall clock says start + 10, the lease clock start + 20; d5fc4fa4's: + 40)
    ran = daemon.running.daemon
    try:
        ran.clock.now()  # (the step seen at once, as the daemon's next token would)
        valid = daemon.token(ttl=start + 25 - _real_time())  # (expires at start + 25: 15 s left by the wall clock)
        Session.attach(daemon.address, valid).close()
        near = daemon.token(ttl=start + 15 - _real_time())  # (5 s left by the wall clock, behind the lease clock)
        with pytest.raises(errors.Unauthenticated, match="expired"):
            Session.attach(daemon.address, near).close()
    finally:
        clock.step = clock.elapsed = 0.0
        ran.clock = server_daemon.LeaseClock()  # (this module's daemon serves the next tests on the real clocks)


@pytest.mark.parametrize("carrier", ["stream", "side socket"])
def test_a_forward_step_ends_the_session_at_its_next_frame(
    daemon_factory: DaemonFactory, clock: _Stepped, carrier: str
) -> None:
    """A session of an hour's lease, its frames on its stream or its side socket; the daemon's wall clock steps two
    hours on (its lease has ended on that clock): the session's next frame finds it ended (FAILED_PRECONDITION,
    expired) and nothing of it runs. On 41939607 it ran on until the reaper's next look, up to 10 s
    (`reap_interval`)."""
    daemon = daemon_factory(bulk_listen="127.0.0.1:0") if carrier == "side socket" else daemon_factory()
    s = Session.attach(daemon.address, daemon.token(ttl=3600))
    assert (s._carrier is not None) == (carrier == "side socket")
    s.upload(torch.ones(4))
    s.sync()
    clock.step = 7200.0
    with pytest.raises(errors.FailedPrecondition, match="expired"):
        s.sync()
    assert not _open(daemon, s)
    s.close()


def test_the_expiry_hold_keeps_an_ended_lease_s_session_at_its_frames(daemon: Any) -> None:
    """While the registrar holds expiries (its scheduler unreachable: nobody can renew), a session whose lease ended
    runs on, at its frames too; once the hold is over the reaper closes it. (A guard of the hold, which round 47 keeps
    on the monotonic clock: it passes on 41939607 too.)"""
    d = daemon.running.daemon
    d.hold_expiry(time.time() + 60)
    s = Session.attach(daemon.address, daemon.token(ttl=0.5))
    time.sleep(1.0)
    s.upload(torch.ones(4))
    s.sync()
    assert _open(daemon, s)
    d.hold_expiry(time.time())
    deadline = time.monotonic() + 5.0
    while _open(daemon, s):
        assert time.monotonic() < deadline, "the session outlived the hold"
        time.sleep(0.05)
    s.close()


def _mint(capsys: pytest.CaptureFixture[str], key_file: Path, *extra: str) -> str:
    capsys.readouterr()
    assert tokencli.main(["mint", "--token-key-file", str(key_file), "--host", TEST_HOST, "--ttl", "600", *extra]) == 0
    return capsys.readouterr().out.strip()


def test_token_mint_cert_binds_a_hand_minted_token(
    daemon_factory: DaemonFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gpupool token mint --cert FILE` (or `--cert sha256:HEX`) writes the certificate's fingerprint as the token's
    `cert` claim, as the scheduler does: a daemon under `--tls-client-auth require` attaches it for that certificate
    only. Without `--cert` the token stays anyone's. On 41939607 `--cert` was no flag (exit 2)."""
    token_key_file, public = tmp_path / "token.key", tmp_path / "token.pub"
    assert tokencli.main(["keygen", str(token_key_file), "--public", str(public)]) == 0
    host = daemon_factory(tls=operator_tls(), isolation="thread", token_key=token_module.load_verifier(public))
    alice = get_pki().issue("tenant", "alice47")
    fingerprint = _fingerprint("tenant", "alice47")
    by_file = _mint(capsys, token_key_file, "--cert", str(alice.cert))
    by_fingerprint = _mint(capsys, token_key_file, "--cert", fingerprint.upper().replace("SHA256:", "sha256:"))
    for token in (by_file, by_fingerprint):
        assert token_module.unverified_claim(token, "cert") == fingerprint
        code, words = _attach(host.address, "bob47", token)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "bound to client certificate" in words, (code, words)
        assert _attach(host.address, "alice47", token) == (grpc.StatusCode.OK, "")
    unbound = _mint(capsys, token_key_file)
    assert not token_module.unverified_claim(unbound, "cert")
    assert _attach(host.address, "bob47", unbound) == (grpc.StatusCode.OK, "")
    capsys.readouterr()
    assert tokencli.main(["mint", "--token-key-file", str(token_key_file), "--cert", "no-such-file.pem"]) == 1
    assert "no certificate fingerprint" in capsys.readouterr().err


def test_an_operator_named_as_the_tenant_allocates_it_an_unbound_lease(
    pool: Pool, daemon_factory: DaemonFactory
) -> None:
    """Operator `alice47` (an admin certificate) allocating for tenant `alice47`: the lease is the tenant's, not bound
    to the operator's certificate (as an operator's lease for any named tenant), so the tenant's certificate attaches
    it. On 41939607 it was bound to the admin certificate and the tenant's was refused. An operator allocating with no
    tenant named (its own lease) is still bound to its certificate."""
    host = _daemon(daemon_factory, pool)
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    named = _allocate(pool, "admin", "alice47", tenant="alice47")
    assert named.tenant == "alice47"
    token = named.devices[0].token
    assert not token_module.unverified_claim(token, "cert")
    assert _attach(host.address, "alice47", token) == (grpc.StatusCode.OK, "")
    own = _allocate(pool, "admin", "alice47")
    assert token_module.unverified_claim(own.devices[0].token, "cert") == certrevoke.fingerprint_pem(
        get_pki().issue("admin", "alice47").cert.read_bytes()
    )
    code, words = _attach(host.address, "alice47", own.devices[0].token)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "bound to client certificate" in words, (code, words)


def _client_auth(tmp_path: Path, *flags: str) -> str:
    """What `gpupool serve`'s own parser and config make of `flags` (with a host certificate, a CA and token keys)."""
    from gpupool.server.cli import build_parser, config_from_args

    files = get_pki().issue("host", "gpu-47")
    public = tmp_path / "token.pub"
    if not public.exists():
        tokens_key = tmp_path / "token.key"
        assert tokencli.main(["keygen", str(tokens_key), "--public", str(public)]) == 0
    common = ["--token-public-keys", str(public), "--host-id", "gpu-47", "--tls-cert", str(files.cert), "--tls-key"]
    args = build_parser().parse_args([*common, str(files.key), "--tls-ca", get_pki().ca_file, *flags])
    return config_from_args(args).tls.client_auth


def test_serve_requires_client_certificates_where_it_joins_its_scheduler_by_certificate(
    pool: Pool, tmp_path: Path
) -> None:
    """`--tls-client-auth auto`, serve's default: `require` for a daemon with a `--scheduler`, a `--tls-ca` and no
    `--join-token-file` (its scheduler requires client certificates: every client of the pool has one), `none` for a
    daemon joining with a token or without a scheduler (API-token tenants, hand-minted tokens' users), an explicit
    flag as given. A real `gpupool serve` registering with a real scheduler by its host certificate then refuses a
    client without a certificate and serves one with. On 41939607 the default was `none` everywhere."""
    join = tmp_path / "join.token"
    join.write_text("join-secret\n")
    join.chmod(0o600)
    assert _client_auth(tmp_path, "--scheduler", pool.address) == "require"
    assert _client_auth(tmp_path, "--scheduler", pool.address, "--join-token-file", str(join)) == "none"
    assert _client_auth(tmp_path) == "none"
    assert _client_auth(tmp_path, "--scheduler", pool.address, "--tls-client-auth", "none") == "none"
    assert _client_auth(tmp_path, "--tls-client-auth", "require") == "require"

    files = get_pki().issue("host", TEST_HOST)
    seed = tmp_path / "seed.key"
    seed.write_bytes(b"sec47-seed\n")
    proc, address = start_serve_process(
        seed, "--fake-gpus", "1", "--isolation", "thread", "--scheduler", pool.address, "--tls-cert",
        str(files.cert), "--tls-key", str(files.key), "--tls-ca", get_pki().ca_file,
    )  # fmt: skip
    try:
        log = "".join(proc.log_lines)  # type: ignore[attr-defined]
        assert "--tls-client-auth auto: require" in log and "asks no client" not in log, log
        for name, expected in ((None, grpc.StatusCode.UNAVAILABLE), ("alice47", grpc.StatusCode.OK)):
            ch, stub = _stub(address, name)
            with ch:
                code, words = _code(lambda stub=stub: stub.Status(device_pb2.StatusRequest(), timeout=10))
            assert code == expected, (name, code, words)
    finally:
        stop_process(proc)


_SHOW_LEASE = (
    "import sys; from gpupool.client.pool import Lease; held = Lease.from_env(); "
    "print('LEASE', held.tenant, held.devices[0].token, flush=True); sys.stdin.read()"
)


@contextlib.contextmanager
def _run_lease(pool: Pool, role: str, name: str, *flags: str) -> Iterator[tuple[str, str]]:
    """(tenant, token) of the lease a real `gpupool run` holds for its command (a child that waits), run with `role`
    `name`'s certificate and no API token or $GPUPOOL_TENANT; the lease is released when the context ends."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--scheduler", pool.address, "-p", "0.25", "--ttl", "600"]
    with held_lease([*cmd, *flags, "--", sys.executable, "-c", _SHOW_LEASE], role, name) as shown:
        yield shown


@contextlib.contextmanager
def held_lease(cmd: list[str], role: str, name: str, **env: str) -> Iterator[tuple[str, str]]:
    """(tenant, token) of the lease `cmd` holds, from its first line (`LEASE tenant token`) until the context ends
    (then its stdin closes: it releases the lease and exits 0), run with `role` `name`'s certificate and no API token
    or $GPUPOOL_TENANT (unless `env` sets one)."""
    files = get_pki().issue(role, name)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_TENANT", "GPUPOOL_API_TOKEN"))}
    environ.update(get_pki().env(), GPUPOOL_TLS_CERT=str(files.cert), GPUPOOL_TLS_KEY=str(files.key), **env)
    proc = subprocess.Popen(
        cmd, env=environ, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()  # (the child's first line; "" if it failed)
        shown = line.split()
        assert len(shown) == 3 and shown[0] == "LEASE", (line, proc.stderr.read() if proc.stderr else "")
        yield shown[1], shown[2]
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_an_operator_s_own_gpupool_run_lease_is_bound_to_its_certificate(
    pool: Pool, daemon_factory: DaemonFactory
) -> None:
    """(secrev47) An operator's `gpupool run` naming no tenant: its lease is its own, bound to its certificate, so a
    token of it taken from the command's environment attaches at a daemon under `require` with no other certificate.
    On d5fc4fa4 `gpupool run` named $USER as the tenant, which made the operator's lease unbound (sec47: an operator's
    Allocate naming a tenant is that tenant's): any certificate of the pool's CA attached its token. `--tenant` still
    allocates for that tenant, unbound (its certificate presents it); a tenant's own lease is bound either way."""
    check_operator_leases(
        _daemon(daemon_factory, pool),
        lambda role, name, tenant: _run_lease(pool, role, name, *(("--tenant", tenant) if tenant else ())),
        "47",
    )


def check_operator_leases(
    host: Any, lease: Callable[[str, str, str], contextlib.AbstractContextManager[tuple[str, str]]], n: str
) -> None:
    """`lease(role, name, tenant)` ((tenant, token) of a lease taken by a client presenting `role` `name`'s
    certificate, naming `tenant` where it is not "") against `host` (a daemon under `require` of the pool): an
    operator naming no tenant holds its own lease, bound to its certificate (another certificate is refused its
    token); naming one, that tenant's, unbound (its certificate attaches it); a tenant's own lease is bound."""
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    admin_cert = get_pki().issue("admin", f"ops{n}").cert.read_bytes()
    with lease("admin", f"ops{n}", "") as (tenant, token):
        assert tenant == f"ops{n}", tenant
        assert token_module.unverified_claim(token, "cert") == certrevoke.fingerprint_pem(admin_cert)
        code, words = _attach(host.address, f"bob{n}", token)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "bound to client certificate" in words, (code, words)

    with lease("admin", f"ops{n}", f"alice{n}") as (tenant, token):
        assert tenant == f"alice{n}" and not token_module.unverified_claim(token, "cert"), tenant
        assert _attach(host.address, f"alice{n}", token) == (grpc.StatusCode.OK, "")

    with lease("tenant", f"bob{n}", "") as (tenant, token):
        assert tenant == f"bob{n}" and token_module.unverified_claim(token, "cert"), tenant
