"""Round 46 review (secrev46): a certificate's revocation ends its leases and gives their room to no request of the
same certificate waiting in line. Core.revoke_certs ended the revoked certificate's leases and served the waiters
with the room before it took the revocation in: a request of that certificate waiting in line was granted the room
of its own ended lease, a lease bound to the revoked certificate that the revocation had not ended (only the gRPC
layer's later look could still release it, when it ran after the revocation was taken in)."""

from __future__ import annotations

import threading

import pytest
from gpupool.scheduler.hosts import DeviceSpec
from gpupool.scheduler.leases import Core, CoreConfig
from gpupool.scheduler.placement import Request
from gpupool.scheduler.store import MemoryStore

from gpupool.errors import GpupoolError, Unauthenticated

GiB = 1 << 30
KEY = b"k" * 32
MALLORY = " ".join(f"sha256:{c * 64}" for c in "ab")  # a certificate's fingerprint and its ECDSA twin's
ALICE = f"sha256:{'c' * 64}"


def _core() -> Core:
    core = Core(MemoryStore(), KEY, CoreConfig())
    core.hosts.register("h0", "127.0.0.1:6000", [DeviceSpec(0, "uuid-0", "fake", 8 * GiB, True)])
    return core


@pytest.mark.parametrize("revoked", [0, 1], ids=["fingerprint", "ecdsa-twin"])
def test_a_revocation_gives_the_room_of_the_leases_it_ends_to_no_request_of_that_certificate(revoked: int) -> None:
    core = _core()
    held = core.allocate(Request(1, fraction=1.0), tenant="mallory", ttl=600, cert=MALLORY)
    got: list[object] = []

    def wait(tenant: str, cert: str) -> None:
        try:
            got.append((tenant, core.allocate(Request(1, fraction=0.5), tenant=tenant, ttl=600, wait=20, cert=cert)))
        except GpupoolError as exc:
            got.append((tenant, exc))

    waiters = [
        threading.Thread(target=wait, args=("mallory", MALLORY)),
        threading.Thread(target=wait, args=("alice", ALICE)),
    ]
    waiters[0].start()
    while len(core.waiters) < 1:
        threading.Event().wait(0.01)
    waiters[1].start()
    while len(core.waiters) < 2:
        threading.Event().wait(0.01)
    core.revoke_certs([MALLORY.split()[revoked]], [], "stolen")
    # at the revocation's return no active lease is bound to the revoked certificate (on 67a03c05/624c7058 the
    # waiting request of it held one: its own ended lease's room)
    assert held.lease_id not in {x.lease_id for x in core.active_leases()}
    assert not [x for x in core.active_leases() if set(x.cert_fingerprints) & set(MALLORY.split())]
    for t in waiters:
        t.join(30)
    results = dict(got)  # type: ignore[arg-type]
    assert isinstance(results["mallory"], Unauthenticated) and "revoked" in str(results["mallory"]), results
    # the room went to the next in line, another tenant's request
    assert not isinstance(results["alice"], Exception), results
    # and a new request of the revoked certificate (one that passed the caller's check just before) gets nothing
    with pytest.raises(Unauthenticated, match="revoked"):
        core.allocate(Request(1, fraction=0.5), tenant="mallory", ttl=600, cert=MALLORY)
