"""Tampered lease tokens at a real daemon (round 33): a scheduler signs a real lease of alice's on a daemon registered
with it, and each mutation of her token - a character of its key id, claims or signature changed, parts swapped
or dropped, the claims re-encoded with one claim changed (tenant, host, device, quota, share, expiry, lease id,
network, group) under the old signature, padding, huge, non-ASCII, whitespace - is presented to the daemon's Attach.
Each must be refused with UNAUTHENTICATED (or PERMISSION_DENIED / NOT_FOUND / INVALID_ARGUMENT, all actionable),
no message may carry the token, and the daemon must still admit alice's real token afterwards.
"""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import grpc
import pytest
from support import DaemonFactory, registered_host, tls_channel
from test_security import HOST, Pool, start_pool

from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2

ACTIONABLE = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mutations(token: str, rng: random.Random) -> list[tuple[str, str]]:
    kid, body, sig = token.split(".")
    claims = json.loads(_unb64(body))
    out: list[tuple[str, str]] = []
    for name, part in (("kid", 0), ("claims", 1), ("signature", 2)):
        for _ in range(6):
            parts = [kid, body, sig]
            i = rng.randrange(len(parts[part]))
            alphabet = (
                "0123456789abcdef" if part == 0 else "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            )
            parts[part] = parts[part][:i] + rng.choice(alphabet.replace(parts[part][i], "")) + parts[part][i + 1 :]
            out.append((f"{name} char {i}", ".".join(parts)))
    changed: dict[str, Any] = {
        "tenant": "mallory", "host": "other-host", "device": 1, "quota_bytes": 2**62, "share": 1.0,
        "expires_at": claims["expires_at"] + 86_000, "lease_id": "0" * 32, "network": True, "group": "a" * 64,
    }  # fmt: skip
    for field, value in changed.items():
        forged = dict(claims, **{field: value})
        text = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
        out.append((f"claims {field}={value!r} under the old signature", f"{kid}.{_b64(text)}.{sig}"))
    out += [
        ("padding", f"{kid}.{body}=.{sig}"),
        ("no signature", f"{kid}.{body}."),
        ("two parts", f"{kid}.{body}"),
        ("four parts", f"{token}.{sig}"),
        ("parts swapped", f"{kid}.{sig}.{body}"),
        ("huge", token + "A" * 5000),
        ("non-ASCII", token[:-1] + "é"),
        ("whitespace", f" {token}"),
        ("NUL", token + "\x00"),
        ("empty", ""),
        ("claims not JSON", f"{kid}.{_b64(b'{not json')}.{sig}"),
        ("kid of nobody", f"{'f' * 16}.{body}.{sig}"),
    ]
    return out


@pytest.fixture
def pool(tmp_path: Any) -> Any:
    p = start_pool(tmp_path)
    yield p
    p.scheduler.stop(grace=0.5)


def test_tampered_lease_tokens_are_refused_and_the_daemon_serves_on(pool: Pool, daemon_factory: DaemonFactory) -> None:
    host = registered_host(daemon_factory, pool.address, pool.public, HOST)
    alice = pool.client("tenant", "alice")
    lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    token = lease.devices[0].token
    stub = device_pb2_grpc.DeviceStub(tls_channel(host.address))
    problems = []
    for what, bad in mutations(token, random.Random(33)):
        try:
            reply = stub.Attach(device_pb2.AttachRequest(token=bad), timeout=20)
            problems.append(f"{what}: admitted (session of {reply.quota_bytes} bytes)")
            continue
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""  # type: ignore[attr-defined]
        except ValueError:  # a string protobuf refuses to encode (not UTF-8): never sent
            continue
        if code not in ACTIONABLE:
            problems.append(f"{what}: {code.name} {details[:200]}")
        if "Traceback" in details or (len(token) > 20 and token[-40:] in details):
            problems.append(f"{what}: the message carries a traceback or the token: {details[:200]}")
    assert not problems, "\n".join(problems)
    reply = stub.Attach(device_pb2.AttachRequest(token=token), timeout=20)  # the real one still attaches
    stub.Detach(device_pb2.DetachRequest(session_id=reply.session_id), timeout=20)
    alice.release(lease.lease_id)
    alice.close()
