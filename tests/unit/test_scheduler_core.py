"""The scheduler core without gRPC: lease lifecycle, host loss, heartbeats, FIFO waiting, restart from the store."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gpupool.scheduler.capacity import SHARE_UNITS
from gpupool.scheduler.hosts import DeviceSpec
from gpupool.scheduler.leases import Core, CoreConfig
from gpupool.scheduler.placement import Request
from gpupool.scheduler.store import Change, MemoryStore, SqliteStore, StateOwned, Store

from gpupool import tokens
from gpupool.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from gpupool.protocol import HostState, LeaseState, Policy

KEY = b"k" * 32
GiB = 1024**3


def core_with(store: Store | None = None, hosts: int = 2, **cfg: float) -> Core:
    core = Core(store or MemoryStore(), KEY, CoreConfig(**cfg))
    for h in range(hosts):
        core.hosts.register(f"h{h}", f"127.0.0.1:{6000 + h}", [DeviceSpec(0, f"uuid-{h}", "fake", 8 * GiB, True)])
    return core


def half() -> Request:
    return Request(1, fraction=0.5)


def allocated(core: Core) -> dict[tuple[str, int], tuple[int, int]]:
    return {d.key: (d.allocated_bytes, d.allocated_units) for h in core.pool.hosts.values() for d in h.devices.values()}


def in_line(core: Core, n: int) -> None:
    """Wait until `n` requests wait in the core's line (a thread's `allocate` got there), not a fixed sleep."""
    deadline = time.monotonic() + 30
    while len(core.waiters) < n:
        assert time.monotonic() < deadline, f"{len(core.waiters)} of {n} requests waiting after 30 s"
        time.sleep(0.01)


def test_grant_mints_verifiable_tokens() -> None:
    core = core_with()
    lease = core.allocate(Request(1, fraction=0.25), tenant="alice", ttl=30)
    claims = tokens.verify(KEY, core.token(lease, 0))
    assert (claims.lease_id, claims.share, claims.quota_bytes, claims.tenant) == (
        lease.lease_id,
        0.25,
        2 * GiB,
        "alice",
    )
    assert claims.expires_at == pytest.approx(time.time() + 30, abs=2)


def test_renew_extends_and_release_frees() -> None:
    core = core_with()
    lease = core.allocate(half(), ttl=5)
    before = lease.expires_at
    time.sleep(0.01)
    assert core.renew(lease.lease_id).expires_at > before
    core.release(lease.lease_id)
    assert all(units == 0 for _, units in allocated(core).values())
    with pytest.raises(FailedPrecondition, match="released"):
        core.renew(lease.lease_id)
    core.release(lease.lease_id)  # again: harmless
    with pytest.raises(NotFound):
        core.renew("nope")
    with pytest.raises(NotFound):
        core.release("nope")


def test_unrenewed_lease_expires_and_frees() -> None:
    core = core_with(hosts=1)
    lease = core.allocate(Request(1, fraction=1.0), ttl=1)
    with pytest.raises(ResourceExhausted, match="largest free fraction of any device is 0"):
        core.allocate(half())
    core.sweep(time.time() + 2)
    assert core.leases[lease.lease_id].state == "expired"
    assert core.allocate(half())
    with pytest.raises(FailedPrecondition, match="expired"):
        core.renew(lease.lease_id)
    revoked, again = core.hosts.heartbeat("h0", [], {}, False)
    assert revoked == [lease.lease_id] and not again


def test_silent_host_goes_down_and_its_leases_are_lost() -> None:
    core = core_with(host_timeout=1)
    lease = core.allocate(half())
    host = lease.grants[0].host_id
    core.sweep(time.time() + 5)
    assert core.pool.hosts[host].state == HostState.DOWN
    with pytest.raises(FailedPrecondition, match="lost: host .* is down"):
        core.renew(lease.lease_id)
    assert core.hosts.heartbeat(host, [], {}, False) == ([], True)
    core.hosts.register(host, "127.0.0.1:6000", [DeviceSpec(0, "uuid-x", "fake", 8 * GiB, True)])
    revoked, again = core.hosts.heartbeat(host, [lease.lease_id], {0: 123}, False)
    assert revoked == [lease.lease_id] and not again
    assert core.pool.hosts[host].devices[0].used_bytes == 123


def test_heartbeat_revokes_sessions_of_unknown_leases() -> None:
    core = core_with()
    lease = core.allocate(half())
    host = lease.grants[0].host_id
    other = "h1" if host == "h0" else "h0"
    assert core.hosts.heartbeat(host, [lease.lease_id], {}, False) == ([], False)
    assert core.hosts.heartbeat(other, [lease.lease_id, "forged"], {}, False) == (
        sorted([lease.lease_id, "forged"]),
        False,
    )


def test_draining_host_gets_no_new_leases() -> None:
    core = core_with()
    core.hosts.heartbeat("h0", [], {}, True)
    for _ in range(2):
        assert core.allocate(half()).grants[0].host_id == "h1"
    with pytest.raises(ResourceExhausted):
        core.allocate(half())
    core.hosts.heartbeat("h0", [], {}, False)
    assert core.allocate(half()).grants[0].host_id == "h0"


def test_waiters_are_served_in_fifo_order() -> None:
    core = core_with(hosts=1)
    first = core.allocate(Request(1, fraction=1.0))
    order: list[str] = []

    def wait(name: str, fraction: float) -> None:
        core.allocate(Request(1, fraction=fraction), tenant=name, wait=10)
        order.append(name)

    big = threading.Thread(target=wait, args=("big", 1.0))
    big.start()
    while not core.waiters:
        time.sleep(0.01)
    small = threading.Thread(target=wait, args=("small", 0.1))
    small.start()
    while len(core.waiters) < 2:
        time.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="2 request"):
        core.allocate(Request(1, fraction=0.1))  # no waiting: does not jump the queue
    core.release(first.lease_id)
    big.join(5)
    assert order == ["big"]
    assert len(core.waiters) == 1  # small waits behind big's whole device
    active = [x for x in core.leases.values() if x.state == LeaseState.ACTIVE]
    core.release(active[0].lease_id)
    small.join(5)
    assert order == ["big", "small"]


def test_wait_times_out_with_exhausted() -> None:
    core = core_with(hosts=1)
    core.allocate(Request(1, fraction=0.75))
    t0 = time.monotonic()
    with pytest.raises(ResourceExhausted, match="waited in vain.*0.25"):
        core.allocate(Request(1, fraction=0.5), wait=0.3)
    assert 0.25 < time.monotonic() - t0 < 10  # it waited its 0.3 s (then gave up: a busy machine may be late)
    assert not core.waiters


@pytest.mark.parametrize(
    "devices, words",
    [
        ([], "no devices"),
        ([DeviceSpec(0, "a", "m", 1), DeviceSpec(0, "b", "m", 1)], "twice"),
        ([DeviceSpec(0, "a", "m", 0)], "no memory"),
    ],
)
def test_malformed_registration(devices: list[DeviceSpec], words: str) -> None:
    core = core_with()
    before = allocated(core)
    with pytest.raises(InvalidArgument, match=words):
        core.hosts.register("h9", "127.0.0.1:1", devices)
    with pytest.raises(InvalidArgument, match="address"):
        core.hosts.register("h9", "nowhere", [DeviceSpec(0, "a", "m", 1)])
    assert "h9" not in core.pool.hosts and allocated(core) == before


def test_restart_from_sqlite_keeps_hosts_and_leases(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = SqliteStore(path)
    core = core_with(first)
    kept = [core.allocate(half(), tenant="t") for _ in range(3)]
    gone = core.allocate(Request(1, fraction=0.25))
    core.release(gone.lease_id)
    books = allocated(core)
    first.disown()  # no close(): as after kill -9, whose death drops the ownership lock
    again = Core(SqliteStore(path), KEY, CoreConfig())
    assert set(again.pool.hosts) == {"h0", "h1"}
    assert allocated(again) == books
    assert {x.lease_id for x in again.active_leases()} == {x.lease_id for x in kept}
    assert again.renew(kept[0].lease_id).tenant == "t"
    with pytest.raises(FailedPrecondition):
        again.renew(gone.lease_id)
    # the one free half is the only room left: nothing is handed out twice
    again.allocate(half())
    with pytest.raises(ResourceExhausted):
        again.allocate(Request(1, fraction=1 / SHARE_UNITS))


def test_reregistering_host_keeps_its_leases_when_devices_match() -> None:
    core = core_with(hosts=1)
    lease = core.allocate(half())
    # (its address of before: another one, while h0 is live, is another daemon's claim to its id, refused since
    # round 44: test_another_address_of_a_live_host_is_refused)
    core.hosts.register("h0", "127.0.0.1:6000", [DeviceSpec(0, "uuid-0", "fake", 8 * GiB, True)])
    assert core.leases[lease.lease_id].state == LeaseState.ACTIVE
    assert allocated(core)[("h0", 0)] == (4 * GiB, SHARE_UNITS // 2)
    core.hosts.register("h0", "127.0.0.1:6000", [DeviceSpec(0, "uuid-0", "fake", 4 * GiB, True)])
    assert core.leases[lease.lease_id].state == "lost"
    assert allocated(core)[("h0", 0)] == (0, 0)


def test_another_address_of_a_live_host_is_refused() -> None:
    """A Register of a live host's id from another address (a second daemon given the same --host-id) is refused,
    the first kept with its lease; once the host has been silent for half the host timeout (a daemon restarted
    elsewhere), or is down, the new address is taken and the lease kept (its devices unchanged)."""
    core = core_with(hosts=1, host_timeout=10.0)
    lease = core.allocate(half())
    with pytest.raises(AlreadyExists, match="host h0 is live at 127.0.0.1:6000"):
        core.hosts.register("h0", "127.0.0.1:7000", [DeviceSpec(0, "uuid-0", "fake", 8 * GiB, True)])
    assert core.pool.hosts["h0"].address == "127.0.0.1:6000"
    core.pool.hosts["h0"].last_seen -= 5.0  # silent for half the host timeout
    core.hosts.register("h0", "127.0.0.1:7000", [DeviceSpec(0, "uuid-0", "fake", 8 * GiB, True)])
    assert core.pool.hosts["h0"].address == "127.0.0.1:7000"
    assert core.leases[lease.lease_id].state == LeaseState.ACTIVE


def test_the_waiting_line_is_bounded() -> None:
    core = core_with(hosts=1, max_waiters=1)
    core.allocate(Request(1, fraction=1.0))
    waiter = threading.Thread(target=lambda: pytest.raises(ResourceExhausted, core.allocate, half(), wait=1))
    waiter.start()
    while not core.waiters:
        time.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="waiting line is full"):
        core.allocate(half(), wait=5)
    waiter.join(5)
    assert not core.waiters


class FailingStore(MemoryStore):
    """A MemoryStore whose writes can be made to fail, as a full disk makes SQLite's fail."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def write(self, change: Change) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        super().write(change)


def books_in(store: Store) -> dict[tuple[str, int], tuple[int, int]]:
    """What a scheduler restarted from `store` would believe."""
    return allocated(Core(store, KEY, CoreConfig()))


def test_a_refused_write_changes_nothing() -> None:
    store = FailingStore()
    core = core_with(store)
    held = core.allocate(half(), tenant="t", ttl=30)
    before, leases_before = allocated(core), set(core.leases)
    store.fail = True
    with pytest.raises(Unavailable, match="cannot save its state.*nothing was changed"):
        core.allocate(half())
    with pytest.raises(Unavailable):
        core.release(held.lease_id)
    expires = held.expires_at
    time.sleep(0.01)
    with pytest.raises(Unavailable):
        core.renew(held.lease_id)
    with pytest.raises(Unavailable):
        core.hosts.register("h9", "127.0.0.1:6009", [DeviceSpec(0, "uuid-9", "fake", 8 * GiB, True)])
    assert allocated(core) == before and set(core.leases) == leases_before
    assert core.leases[held.lease_id].state == LeaseState.ACTIVE and held.expires_at == expires
    assert "h9" not in core.pool.hosts
    # a silent host is not marked down (nor its leases lost) unless that can be saved
    core.sweep(time.time() + 1000)
    assert core.pool.hosts[held.grants[0].host_id].state != HostState.DOWN
    assert core.leases[held.lease_id].state == LeaseState.ACTIVE
    store.fail = False
    assert books_in(store) == allocated(core)
    core.release(held.lease_id)
    assert books_in(store) == allocated(core) and all(u == 0 for _, u in allocated(core).values())


def test_a_waiter_whose_grant_cannot_be_saved_keeps_its_place() -> None:
    store = FailingStore()
    core = core_with(store, hosts=1)
    first = core.allocate(Request(1, fraction=1.0))
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(core.allocate(half(), wait=10)))
    t.start()
    in_line(core, 1)
    store.fail = True
    with pytest.raises(Unavailable):
        core.release(first.lease_id)
    assert len(core.waiters) == 1 and not got
    store.fail = False
    core.release(first.lease_id)
    t.join(5)
    assert got and books_in(store) == allocated(core)


def test_a_second_owner_of_a_sqlite_state_is_refused(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "s.db")
    with pytest.raises(StateOwned, match=r"owned by another running scheduler \(pid \d+"):
        SqliteStore(tmp_path / "s.db")
    first.close()
    SqliteStore(tmp_path / "s.db").close()  # free once the owner has gone


def test_a_pause_of_the_scheduler_is_not_blamed_on_hosts_or_tenants() -> None:
    core = core_with(host_timeout=0.4, pause_threshold=0.2, outage_grace=5)
    lease = core.allocate(half(), ttl=0.3)
    core.alive()  # as the server's sweeper does every interval ...
    time.sleep(0.6)  # ... except while the process is stopped
    core.sweep()
    assert all(h.state != HostState.DOWN for h in core.pool.hosts.values())
    assert core.renew(lease.lease_id).state == LeaseState.ACTIVE  # expired during the pause, yet renewable
    # A host silent while the scheduler runs is down: 0.4 s of sweeps without a gap of 0.2 s between two. Swept
    # until then (10 s at most), not 8 times 0.1 s: a loaded box that stalls this process for 0.2 s between two
    # sweeps is a pause to the core too, which rightly forgives the hosts again.
    deadline = time.monotonic() + 10
    while not all(h.state == HostState.DOWN for h in core.pool.hosts.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
        core.sweep()
    assert all(h.state == HostState.DOWN for h in core.pool.hosts.values())


def test_leases_restored_after_a_restart_get_a_grace_to_be_renewed(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "s.db")
    core = core_with(first, outage_grace=30)
    lease = core.allocate(half(), ttl=0.2)
    first.disown()
    time.sleep(0.4)  # the scheduler is "down" past the lease's expiry
    again = Core(SqliteStore(tmp_path / "s.db"), KEY, CoreConfig(outage_grace=30))
    again.sweep()
    assert again.renew(lease.lease_id).state == LeaseState.ACTIVE


def test_a_tenant_cannot_hold_more_than_its_share_limit() -> None:
    core = core_with(tenant_max_share=1.0)
    a1, _ = core.allocate(half(), tenant="a"), core.allocate(half(), tenant="a")
    with pytest.raises(ResourceExhausted, match="tenant 'a' holds or waits for 1 GPU.*limit of 1"):
        core.allocate(Request(1, fraction=0.25), tenant="a")
    core.allocate(half(), tenant="b")  # others are not held back
    core.release(a1.lease_id)
    core.allocate(Request(1, fraction=0.25), tenant="a")
    with pytest.raises(ResourceExhausted, match="tenant 'a'"):  # waiting counts too
        core.allocate(Request(1, fraction=0.5), tenant="a", wait=1)


def test_a_tenant_cannot_fill_the_waiting_line() -> None:
    core = core_with(hosts=1, tenant_max_waiting=1)
    core.allocate(Request(1, fraction=1.0), tenant="x")
    t = threading.Thread(target=lambda: pytest.raises(ResourceExhausted, core.allocate, half(), "a", 0, 3.0))
    t.start()
    in_line(core, 1)  # a's request waits (3 s: room for a loaded box between here and the next line)
    with pytest.raises(ResourceExhausted, match="tenant 'a' already has 1 request"):
        core.allocate(half(), tenant="a", wait=1)
    got: list[Exception] = []

    def other() -> None:
        try:
            core.allocate(half(), tenant="b", wait=0.5)
        except ResourceExhausted as exc:
            got.append(exc)

    other()
    assert "waited in vain" in str(got[0])  # b was let into the line (and timed out there)
    t.join()


def test_lease_ttl_is_capped() -> None:
    core = core_with(max_lease_ttl=10)
    assert core.allocate(half(), ttl=3600).ttl == 10


@pytest.mark.parametrize(
    "labels",
    [
        {f"k{i}": "v" for i in range(65)},
        {"k": "v" * 257},
        {"k" * 64: "v"},
        {"": "v"},
        {f"k{i}": "v" * 200 for i in range(30)},
    ],
)
def test_register_bounds_labels(labels: dict[str, str]) -> None:
    core = core_with(hosts=0)
    with pytest.raises(InvalidArgument, match="label"):
        core.hosts.register("h", "127.0.0.1:6000", [DeviceSpec(0, "u", "fake", GiB, True)], labels)
    assert not core.pool.hosts


def test_operators_drain_and_remove_hosts(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    core = core_with(store)
    core.hosts.drain_host("h0")
    assert {core.allocate(Request(1, fraction=0.1)).grants[0].host_id for _ in range(3)} == {"h1"}
    # the daemon's own "not draining" heartbeats and a re-registration do not undo an operator's drain
    core.hosts.heartbeat("h0", [], {}, False)
    core.hosts.register("h0", "127.0.0.1:6000", [DeviceSpec(0, "uuid-0", "fake", 8 * GiB, True)])
    assert core.pool.hosts["h0"].state == "draining"
    core.hosts.drain_host("h0", undo=True)
    held = core.allocate(Request(1, fraction=1.0))
    assert held.grants[0].host_id == "h0"
    with pytest.raises(FailedPrecondition, match="holds 1 active lease"):
        core.hosts.remove_host("h0")
    assert core.hosts.remove_host("h0", force=True) == 1
    with pytest.raises(FailedPrecondition, match="lost"):
        core.renew(held.lease_id)
    with pytest.raises(NotFound):
        core.hosts.remove_host("h0")
    store.disown()
    again = Core(SqliteStore(tmp_path / "s.db"), KEY, CoreConfig())
    assert set(again.pool.hosts) == {"h1"}


def test_a_lease_is_renewable_and_releasable_only_by_its_tenant_when_the_caller_is_known() -> None:
    core = core_with()
    lease = core.allocate(half(), tenant="alice")
    with pytest.raises(NotFound):
        core.renew(lease.lease_id, tenant="mallory")
    with pytest.raises(NotFound):
        core.release(lease.lease_id, tenant="mallory")
    core.renew(lease.lease_id, tenant="alice")
    core.release(lease.lease_id, tenant="alice")


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://gpupool:s3cret@db.example:5432/gpupool?sslmode=require",
        "postgresql://gpupool@db.example/gpupool?password=s3cret",
        "postgres://db.example/gpupool?sslmode=require&password=s3cret&connect_timeout=5",
        "postgresql://gpupool@db.example/gpupool?sslpassword=s3cret",
        "postgresql://gpupool@db.example/gpupool?PassWord=s3cret",
        "postgresql://gpupool:s3cret@[::1]:5432/gpupool",
    ],
)
def test_a_state_location_in_the_log_shows_no_password(dsn: str) -> None:
    """The scheduler logs its --state at start ("listening on ... (state ...)") and when a standby takes over; round
    30 hid the password of `user:password@` only, and libpq also takes it as a URI parameter (`?password=`,
    `sslpassword=` for the client key's passphrase), which went to the log as written."""
    from gpupool.scheduler.cli import _redact

    shown = _redact(dsn)
    assert "s3cret" not in shown and "***" in shown
    assert "db.example" in shown or "[::1]" in shown  # still says where


def test_the_help_shows_no_password_of_the_state_from_the_environment() -> None:
    """`--help` shows each flag's default, taken from its GPUPOOL_* variable: round 30 printed a PostgreSQL state's
    password from $GPUPOOL_STATE (a Secret's value in a pod) to whoever read the help output."""
    env = {**os.environ, "GPUPOOL_STATE": "postgresql://gpupool:s3cretpw@db.example/gpupool?sslpassword=s3cretkey"}
    cmd = [sys.executable, "-m", "gpupool.cli", "scheduler", "--help"]
    shown = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    text = "".join(shown.stdout.split())  # argparse wraps (and breaks) long words
    assert shown.returncode == 0 and "db.example" in text, shown.stderr
    assert "s3cret" not in text


def test_pending_revocations_last_until_their_tokens_have_expired() -> None:
    """A down (or removed) host's pending revocations are kept while a token of their lease may be alive, then
    forgotten (a host that never returns holds no memory for good); 1428b53 dropped them at a removal."""
    from gpupool.scheduler.hosts import REVOCATION_SLACK

    core = core_with(host_timeout=1, lease_ttl=60)
    lease = core.allocate(half())
    host = lease.grants[0].host_id
    now = time.time()
    core.sweep(now + 5)  # silent: down, its lease lost
    assert core.hosts.remove_host(host) == 0
    core.sweep(now + 10)
    assert set(core.hosts.revoked[host]) == {lease.lease_id}
    core.hosts.register(host, "127.0.0.1:6000", [DeviceSpec(0, "uuid-x", "fake", 8 * GiB, True)])
    assert core.hosts.heartbeat(host, [], {}, False) == ([lease.lease_id], False)
    later = core.allocate(half())
    core.sweep(time.time() + 5)  # silent again
    assert set(core.hosts.revoked[later.grants[0].host_id]) >= {later.lease_id}
    core.sweep(later.expires_at + REVOCATION_SLACK + 1)
    assert all(later.lease_id not in pending for pending in core.hosts.revoked.values())


def test_an_operators_new_terms_are_accounted_at_once_saved_and_carried_by_the_next_renewal(tmp_path: Path) -> None:
    """terms53 (`Core.set_terms`; on 536d6f64 no such call: Renew minted a lease's first terms for its life). One 8 GiB
    device: alice's half, bob's quarter, carol's half waiting. Lowered to an eighth: the share (0.375) and alice's held
    share follow at once, her renewal's token says 1 GiB and 0.125, bob's lease is untouched; the memory she may still
    hold (her older token's 4 GiB) stays counted until that token has ended, then what her daemon reports her holding
    past 1 GiB (`note_kept`, never more than before): 1.5 GiB reported, carol's 4 GiB fit (7.5 GiB); 0 reported, 7.
    Raised to 6 GiB (share 0.75 by the memory) beside bob's 2 GiB and carol's 4: no room, RESOURCE_EXHAUSTED, nothing
    changed; carol gone, it fits exactly (8 GiB, a whole share). A byte more, or a share past the whole device, is
    refused; more than the device's memory INVALID_ARGUMENT. The terms survive a restart from the SQLite file."""
    path = tmp_path / "s.db"
    first = SqliteStore(path)
    core = core_with(first, hosts=1)
    alice = core.allocate(half(), tenant="alice")
    bob = core.allocate(Request(1, fraction=0.25), tenant="bob")
    dev = ("h0", 0)
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.append(core.allocate(half(), tenant="carol", wait=60)))
    waiting.start()
    in_line(core, 1)  # (a quarter is free)
    older = alice.expires_at  # (the end of the tokens minted so far)
    assert core.set_terms(alice.lease_id, fraction=0.125) is alice
    assert (allocated(core)[dev], core.held_units["alice"]) == ((6 * GiB, 375_000), 125_000)
    core.note_kept("h0", [(alice.lease_id, 0, 3 * GiB)], now=older - 1)  # her older token still lives
    assert (allocated(core)[dev], len(core.waiters)) == ((6 * GiB, 375_000), 1)
    core.note_kept("h0", [(alice.lease_id, 0, GiB + GiB // 2), ("another", 0, 8 * GiB)], now=older + 1)
    waiting.join(60)
    (carol,) = got  # the room alice's lease gave back
    assert allocated(core)[dev] == (7 * GiB + GiB // 2, 875_000)
    core.note_kept("h0", [], now=older + 2)  # (freed, or her session gone)
    core.note_kept("h0", [(alice.lease_id, 0, 3 * GiB)], now=older + 3)  # (she can no longer grow past 1 GiB)
    assert (allocated(core)[dev], core.kept_until) == ((7 * GiB, 875_000), {})
    claims = tokens.verify(KEY, core.token(core.renew(alice.lease_id), 0))
    assert (claims.quota_bytes, claims.share) == (GiB, 0.125)
    assert (bob.grants[0].quota_bytes, bob.grants[0].share) == (2 * GiB, 0.25)
    with pytest.raises(ResourceExhausted, match=r"has 2\.0GiB and share 0\.25 free .* do not fit; nothing changed"):
        core.set_terms(alice.lease_id, memory_bytes=6 * GiB)
    assert allocated(core)[dev] == (7 * GiB, 875_000)
    core.release(carol.lease_id)  # type: ignore[attr-defined]
    core.set_terms(alice.lease_id, memory_bytes=6 * GiB)
    assert (alice.grants[0].quota_bytes, alice.grants[0].units, allocated(core)[dev]) == (
        6 * GiB, 750_000, (8 * GiB, SHARE_UNITS),
    )  # fmt: skip
    for bad in ({"memory_bytes": 6 * GiB + 1}, {"share": 0.76}):
        with pytest.raises(ResourceExhausted, match="do not fit; nothing changed"):
            core.set_terms(alice.lease_id, **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"more than device 0 of host 'h0' has \(8\.0GiB\)"):
        core.set_terms(alice.lease_id, memory_bytes=9 * GiB)
    core.set_terms(alice.lease_id, share=0.5)  # the quota stays: 6 GiB, now at half the device's time
    assert (alice.grants[0].quota_bytes, alice.grants[0].share, allocated(core)[dev]) == (
        6 * GiB, 0.5, (8 * GiB, 750_000),
    )  # fmt: skip
    books = allocated(core)
    first.disown()
    again = Core(SqliteStore(path), KEY, CoreConfig())
    assert allocated(again) == books
    claims = tokens.verify(KEY, again.token(again.renew(alice.lease_id), 0))
    assert (claims.quota_bytes, claims.share) == (6 * GiB, 0.5)


def test_new_terms_are_refused_past_the_tenants_limit_or_for_a_lease_not_active_and_bad_values_change_nothing() -> None:
    """terms53: a raise past --tenant-max-share is RESOURCE_EXHAUSTED (where the device has the room); a
    released lease FAILED_PRECONDITION, an unknown one NOT_FOUND; no size, both sizes, a fraction or share outside
    (0, 1] or not finite, a memory of 0: INVALID_ARGUMENT, nothing changed."""
    core = core_with(tenant_max_share=1.0)
    one = core.allocate(half(), tenant="alice")
    two = core.allocate(Request(1, fraction=0.25, policy=Policy.SPREAD), tenant="alice")  # (the other device)
    with pytest.raises(ResourceExhausted, match=r"holds or waits for 0\.75 .* these terms add 0\.5: past its limit"):
        core.set_terms(two.lease_id, fraction=0.75)
    core.set_terms(two.lease_id, fraction=0.5)  # exactly the limit
    core.set_terms(one.lease_id, fraction=0.25)
    assert core.held_units["alice"] == 750_000
    before = allocated(core)
    for bad, words in (
        ({}, "give the lease's new fraction, memory or share"),
        ({"fraction": 0.5, "memory_bytes": GiB}, "not both"),
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
        ({"share": float("nan")}, r"share must be in \(0, 1\]"),
        ({"share": -0.5}, r"share must be in \(0, 1\]"),
        ({"memory_bytes": 0}, "memory must be positive"),
    ):
        with pytest.raises(InvalidArgument, match=words):
            core.set_terms(one.lease_id, **bad)  # type: ignore[arg-type]
    assert allocated(core) == before
    with pytest.raises(NotFound):
        core.set_terms("no-such-lease", fraction=0.5)
    core.release(one.lease_id)
    with pytest.raises(FailedPrecondition, match="released: its terms are those it ended with"):
        core.set_terms(one.lease_id, fraction=0.5)
    assert core.held_units["alice"] == 500_000


def test_the_bytes_kept_past_a_lowered_quota_stay_counted_across_a_restart(tmp_path: Path) -> None:
    """terms54. One 8 GiB device: alice's half (4 GiB), bob's quarter. The operator lowers alice to an eighth: her
    session may hold her older token's 4 GiB until that token ends (3 GiB kept past the 1 GiB quota). A scheduler
    restarted from the SQLite state inside that window still counts them: carol's 4 GiB do not fit (2 GiB free). On
    1ddcc310 the kept bytes were not stored: the restarted scheduler counted alice's 1 GiB and gave carol 4 GiB that
    alice's session still held. Past the window her daemon's report (1.5 GiB) leaves 0.5 GiB kept, stored too: a
    second restart counts 3.5 GiB; none reported, none kept, and carol fits."""
    path = tmp_path / "s.db"
    first = SqliteStore(path)
    core = core_with(first, hosts=1)
    alice = core.allocate(half(), tenant="alice")
    core.allocate(Request(1, fraction=0.25), tenant="bob")
    dev = ("h0", 0)
    older = alice.expires_at
    core.set_terms(alice.lease_id, fraction=0.125)
    assert allocated(core)[dev] == (6 * GiB, 375_000)
    first.disown()  # (as after kill -9)

    second = SqliteStore(path)
    again = Core(second, KEY, CoreConfig())
    assert (allocated(again)[dev], again.kept_until) == ((6 * GiB, 375_000), {alice.lease_id: older})
    with pytest.raises(ResourceExhausted, match=r"largest free memory 2\.0GiB"):
        again.allocate(Request(1, memory_bytes=4 * GiB), tenant="carol")
    again.note_kept("h0", [(alice.lease_id, 0, 3 * GiB)], now=older - 1)  # her older token still lives
    assert allocated(again)[dev] == (6 * GiB, 375_000)
    again.note_kept("h0", [(alice.lease_id, 0, GiB + GiB // 2)], now=older + 1)
    assert allocated(again)[dev] == (3 * GiB + GiB // 2, 375_000)
    second.disown()

    third = SqliteStore(path)
    last = Core(third, KEY, CoreConfig())
    assert (allocated(last)[dev], last.kept_until) == ((3 * GiB + GiB // 2, 375_000), {alice.lease_id: older})
    last.note_kept("h0", [], now=older + 2)
    assert allocated(last)[dev] == (3 * GiB, 375_000)
    last.allocate(Request(1, memory_bytes=4 * GiB), tenant="carol")
    third.disown()
    assert allocated(Core(SqliteStore(path), KEY, CoreConfig()))[dev] == (7 * GiB, 875_000)


def test_a_raise_must_fit_what_the_daemon_measures_free_beside_a_lease_using_more_than_its_promise() -> None:
    """terms54. One 8 GiB device: alice's half, bob's quarter (2 GiB) whose sessions hold 3 GiB (a daemon reporting
    more used than promised); measured free 5 GiB. Alice to 6 GiB fits the books (6 + 2) but not the device: 6 GiB
    to grow into, 5 free (bob's promise is all in use, and then some): RESOURCE_EXHAUSTED, nothing changed; 5 GiB fits.
    Unmeasured (None), the books alone. On 1ddcc310 the heartbeat carried no measure and the 6 GiB went through."""
    core = core_with(hosts=1)
    alice = core.allocate(half(), tenant="alice")
    bob = core.allocate(Request(1, fraction=0.25), tenant="bob")
    core.hosts.heartbeat("h0", [bob.lease_id], {0: 3 * GiB}, False, measured={0: (5 * GiB, {bob.lease_id: 3 * GiB})})
    with pytest.raises(ResourceExhausted, match=r"has 5\.0GiB free by its daemon's last measure, 0B of it promised"):
        core.set_terms(alice.lease_id, memory_bytes=6 * GiB, share=0.5)
    assert allocated(core)[("h0", 0)] == (6 * GiB, 750_000)
    core.set_terms(alice.lease_id, memory_bytes=5 * GiB, share=0.5)
    core.hosts.heartbeat("h0", [bob.lease_id], {0: 3 * GiB}, False, measured={0: (None, {bob.lease_id: 3 * GiB})})
    core.set_terms(alice.lease_id, memory_bytes=6 * GiB, share=0.5)
    assert allocated(core)[("h0", 0)] == (8 * GiB, 750_000)
