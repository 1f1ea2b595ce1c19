"""A hostile client and a hostile host against a live scheduler (round 33): mutated real requests (scheduler_fuzz.py)
with a fixed seed and a bounded number of cases (about 15 s), and the defects that campaign and round 32's review
found, each pinned by a test of its own. `GPUPOOL_SCHEDULER_FUZZ_CASES=20000 GPUPOOL_SCHEDULER_FUZZ_SEED=<n>` (or
`python tests/integration/scheduler_fuzz.py CASES SEED`) for a long hunt."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import scheduler_fuzz as sf
from gpupool.server.registration import Registrar
from support import REGISTER_WAIT_S, get_pki

from gpupool import tls
from gpupool._proto import device_pb2, scheduler_pb2
from gpupool.config import write_secret
from gpupool.errors import MAX_DETAILS

CASES = int(os.environ.get("GPUPOOL_SCHEDULER_FUZZ_CASES", "1000"))
SEED = int(os.environ.get("GPUPOOL_SCHEDULER_FUZZ_SEED", "33"))


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[sf.Pool]:
    p = sf.Pool(tmp_path, get_pki().ca_file, get_pki().server_config(), auth_fail_rate=0.0, tenant_rate=0.0)
    yield p
    p.close()


def raw(pool: sf.Pool, method: str, body: bytes, who: str | None = "mallory") -> tuple[grpc.StatusCode, str]:
    call = pool.channel.unary_unary(
        f"/gpupool.v1.Scheduler/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    try:
        call(body, metadata=sf.Pool.md(who) if who else (), timeout=10)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""  # type: ignore[attr-defined]


def test_mutated_requests_get_actionable_statuses_and_harm_nothing(tmp_path: Path) -> None:
    """The campaign: every status actionable, no traceback, no other party's secret, refused calls change nothing
    stored, and alice served after every case (scheduler_fuzz.py's docstring)."""
    problems, codes = sf.campaign(tmp_path, get_pki().ca_file, get_pki().server_config(), CASES, SEED)
    assert not problems, f"{len(problems)} problem(s) in {CASES} cases (seed {SEED}), e.g.:\n" + "\n".join(
        problems[:20]
    )
    for code in ("OK", "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "NOT_FOUND"):
        assert codes[code], f"no case answered {code}: {dict(codes)}"  # the campaign reached every kind of refusal


def test_a_request_that_does_not_parse_is_invalid_argument_and_leaks_no_stream(pool: sf.Pool) -> None:
    """gRPC answers a request its deserializer cannot parse INTERNAL ("Exception deserializing request!"), before
    the caller is checked, and (grpcio 1.7x) leaves the stream open on the server: after MAX_STREAMS (100) such
    requests the connection refused every call (UNAVAILABLE, RST_STREAM REFUSED_STREAM), alice's too had she shared
    it. Now: UNAUTHENTICATED without a credential, INVALID_ARGUMENT with one, and the connection serves on."""
    assert raw(pool, "Renew", b"\x0a\xff\xff\xff\x7f", who=None)[0] == grpc.StatusCode.UNAUTHENTICATED
    for _ in range(120):
        code, details = raw(pool, "Renew", b"\x0a\xff\xff\xff\x7f")
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert raw(pool, "Register", b"\x12\x05ab", who="h1")[0] == grpc.StatusCode.INVALID_ARGUMENT  # host_id unread
    assert not pool.serves_alice()


def test_a_huge_id_is_answered_with_its_status_not_a_transport_error(pool: sf.Pool) -> None:
    """Round 32 quoted a caller's ids whole in its errors: a 20,000-character lease id, policy or host id made a
    message over gRPC's 16 KiB trailer limit, and the client got RESOURCE_EXHAUSTED "Stream removed" instead of
    the status. (A lease id over 256 characters is INVALID_ARGUMENT since round 41, NOT_FOUND before.)"""
    cases = [
        ("Renew", scheduler_pb2.RenewRequest(lease_id="z" * 20_000), "mallory", grpc.StatusCode.INVALID_ARGUMENT),
        ("Allocate", scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, policy="p" * 20_000), "mallory",
         grpc.StatusCode.INVALID_ARGUMENT),
        ("Heartbeat", scheduler_pb2.HeartbeatRequest(host_id="h" * 20_000), "h1", grpc.StatusCode.PERMISSION_DENIED),
        ("DrainHost", scheduler_pb2.DrainHostRequest(host_id="h" * 20_000), "ops", grpc.StatusCode.NOT_FOUND),
    ]  # fmt: skip
    for method, request, who, want in cases:
        code, details = raw(pool, method, request.SerializeToString(), who)
        assert code == want and len(details) < MAX_DETAILS, (method, code, details[:200])


def test_repeated_authorization_headers_are_refused(pool: sf.Pool) -> None:
    """Two `authorization` values: round 32 took the first, whatever the second said (a proxy adding its own, or a
    client's two, decided by order). Refused as ambiguous, in either order."""
    mallory, alice = sf.Pool.md("mallory")[0], sf.Pool.md("alice")[0]
    listing = scheduler_pb2.ListPoolRequest()
    for metadata in ((mallory, alice), (alice, mallory), (alice, alice)):
        with pytest.raises(grpc.RpcError) as caught:
            pool.stub.ListPool(listing, metadata=metadata, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert not pool.serves_alice()


def test_a_host_cannot_advertise_a_port_no_client_can_dial(pool: sf.Pool) -> None:
    before = pool.rows()
    for address in ("127.0.0.1:99999", "127.0.0.1:0", "h:" + "9" * 300):
        request = scheduler_pb2.RegisterRequest(host_id="h1", address=address, devices=sf.devices("h1"))
        assert raw(pool, "Register", request.SerializeToString(), "h1")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert pool.rows() == before


def test_a_valid_host_flooding_registrations_is_bounded_and_an_honest_restart_still_registers(
    pool: sf.Pool, tmp_path: Path
) -> None:
    """Each Register is a durable store write under the core's lock; round 32 bounded a host credential acting as
    another host, not one acting as itself. Past `--host-write-rate` (1 a second, bursts of 10) a host's Register,
    and its heartbeats that flip its draining state, get RESOURCE_EXHAUSTED and write nothing; another host is not
    touched, nor are operators; and the daemon's own registration loop (a restart, right after the flood) backs
    off and registers within seconds."""
    # (its own address: since round 44 a Register of the live h1 from another is ALREADY_EXISTS, writing nothing)
    h1 = scheduler_pb2.RegisterRequest(host_id="h1", address="127.0.0.1:4001", devices=sf.devices("h1"))
    codes = []
    for _ in range(30):
        before = pool.rows()
        code = raw(pool, "Register", h1.SerializeToString(), "h1")[0]
        codes.append(code)
        if code != grpc.StatusCode.OK:
            assert pool.rows() == before
    assert codes.count(grpc.StatusCode.OK) <= 12 and codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    drain = scheduler_pb2.HeartbeatRequest(host_id="h1", draining=True).SerializeToString()  # a state change
    assert {raw(pool, "Heartbeat", drain, "h1")[0] for _ in range(3)} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert raw(pool, "Heartbeat", scheduler_pb2.HeartbeatRequest(host_id="h1").SerializeToString(), "h1")[0] == (
        grpc.StatusCode.OK
    )  # a heartbeat that changes nothing is never limited: the host stays up
    h2 = scheduler_pb2.RegisterRequest(host_id="h2", address="127.0.0.1:4002", devices=sf.devices("h2"))
    assert raw(pool, "Register", h2.SerializeToString(), "h2")[0] == grpc.StatusCode.OK
    assert raw(pool, "Register", h1.SerializeToString(), "ops")[0] == grpc.StatusCode.OK

    class Source:
        def devices(self) -> list[device_pb2.DeviceInfo]:
            return sf.devices("h1")

        def usage(self) -> tuple[list[device_pb2.SessionUsage], list[device_pb2.DeviceUsage]]:
            return [], []

        def draining(self) -> bool:
            return False

        def revoke_leases(self, lease_ids: list[str]) -> None:
            pass

    for _ in range(12):  # the bucket empty again
        raw(pool, "Register", h1.SerializeToString(), "h1")
    token = tmp_path / "h1.token"
    write_secret(token, sf.API_TOKENS["h1"].encode())
    cfg = tls.TlsConfig(ca=get_pki().ca_file, api_token_file=str(token))
    registrar = Registrar(pool.server.address, "h1", "127.0.0.1:4001", Source(), interval=0.3, tls_config=cfg)  # type: ignore[arg-type]
    start = time.monotonic()
    registrar.start()
    try:
        assert registrar.registered.wait(REGISTER_WAIT_S), "the honest host never registered"
        assert time.monotonic() - start > 0.2  # it was refused first, then backed off
        hosts = {
            h.host_id: h for h in pool.stub.ListPool(scheduler_pb2.ListPoolRequest(), metadata=pool.md("ops")).hosts
        }
        assert hosts["h1"].address == "127.0.0.1:4001" and hosts["h1"].state == "up"
    finally:
        registrar.stop()
    assert not pool.serves_alice()


def test_refused_calls_leave_the_store_as_it_was(pool: sf.Pool) -> None:
    """A few of the campaign's refusals, spelled out: another tenant's lease, another host's id, an operator's method
    by a tenant (a lease's terms by its own tenant too), a tampered token."""
    alice_lease = pool.alice.lease_id
    before = pool.rows()
    refused = [
        ("Release", scheduler_pb2.ReleaseRequest(lease_id=alice_lease), "mallory", grpc.StatusCode.PERMISSION_DENIED),
        ("Renew", scheduler_pb2.RenewRequest(lease_id=alice_lease), "mallory", grpc.StatusCode.PERMISSION_DENIED),
        ("Register", scheduler_pb2.RegisterRequest(host_id="h2", address="127.0.0.1:1", devices=sf.devices("h2")),
         "h1", grpc.StatusCode.PERMISSION_DENIED),
        ("RemoveHost", scheduler_pb2.RemoveHostRequest(host_id="h1", force=True), "mallory",
         grpc.StatusCode.PERMISSION_DENIED),
        ("DrainHost", scheduler_pb2.DrainHostRequest(host_id="h1"), "h1", grpc.StatusCode.PERMISSION_DENIED),
        # (terms53) a lease's terms are an operator's: not its own tenant's, another's, nor a host's
        *(("SetLeaseTerms", scheduler_pb2.SetLeaseTermsRequest(lease_id=alice_lease, fraction=1.0), who,
            grpc.StatusCode.PERMISSION_DENIED) for who in ("alice", "mallory", "h1")),
    ]  # fmt: skip
    for method, request, who, want in refused:
        code, details = raw(pool, method, request.SerializeToString(), who)
        assert code == want, (method, code, details)
    tampered = sf.API_TOKENS["alice"][:-1] + "x"
    call = pool.channel.unary_unary("/gpupool.v1.Scheduler/Release", request_serializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as caught:
        call(scheduler_pb2.ReleaseRequest(lease_id=alice_lease).SerializeToString(),
             metadata=(("authorization", f"Bearer {tampered}"),), timeout=10)  # fmt: skip
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert pool.rows() == before
    assert not pool.serves_alice()
