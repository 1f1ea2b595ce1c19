"""The daemon side of the core (`HostBook`, composed into leases.py's Core): Register, Heartbeat, operators'
drain and remove, and marking silent hosts down.

A heartbeat reply revokes (a) every lease that ended since the host's last heartbeat and (b) every lease
the host reports a session for that is not active on that host - which also cleans up after a scheduler
restart or a lease that ended while the host was away. A host silent for `host_timeout` is marked down and
its leases are lost; a host the scheduler does not know (or marked down) is told to register again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gpupool import tokens
from gpupool.config import split_address
from gpupool.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable, shown
from gpupool.protocol import HostState, LeaseState

from .capacity import Host, Pool, PoolDevice, physical_gpu
from .store import Change, LeaseRecord

log = logging.getLogger(__name__)

MAX_DEVICES_PER_HOST = 1024
MAX_ID_LENGTH = 256
# Labels travel in every ListPool reply: bounded so that no host can make those replies too big to send.
MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
MAX_LABEL_BYTES = 4096
# A pending revocation is kept until its lease's last token has expired (a token lives until the lease's `expires_at`
# when it was minted), and this long after it: a daemon whose clock runs behind the scheduler's still admits it then.
REVOCATION_SLACK = 600.0


def check_printable(value: str, what: str) -> None:
    """InvalidArgument unless `value` is printable text (`str.isprintable`: no control characters such as ESC, no
    format characters such as a right-to-left override, no line breaks). What a host registers (its address, device
    models and UUIDs, labels) is printed by `gpupool smi` and `gpupool list-gpus` on operators' and tenants'
    terminals: until round 35 a join token registered escape sequences (an OSC 52 that writes the reader's clipboard,
    a screen clear) and rich markup that crashed `gpupool smi` for everyone (`[/bold]`)."""
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise InvalidArgument(f"{what} {shown(value)} holds the non-printable character U+{ord(bad):04X}")


def validate_labels(labels: Mapping[str, str], what: str = "labels") -> dict[str, str]:
    """The labels as a dict, or InvalidArgument when there are too many, they are too long or not printable."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{what}: {len(labels)} labels, at most {MAX_LABELS}")
    total = 0
    for k, v in labels.items():
        if not k or len(k) > MAX_LABEL_KEY or len(v) > MAX_LABEL_VALUE:
            raise InvalidArgument(
                f"{what}: label {k[:40]!r} - keys are 1..{MAX_LABEL_KEY} characters, values at most {MAX_LABEL_VALUE}"
            )
        check_printable(k, f"{what}: label")
        check_printable(v, f"{what}: label {k[:40]!r}'s value")
        total += len(k.encode()) + len(v.encode())
    if total > MAX_LABEL_BYTES:
        raise InvalidArgument(f"{what}: {total} bytes of labels, at most {MAX_LABEL_BYTES}")
    return dict(labels)


@dataclass(frozen=True)
class DeviceSpec:
    """A device as a daemon describes it."""

    index: int
    uuid: str
    model: str
    memory_bytes: int
    fake: bool = False


def validate_registration(
    host_id: str, address: str, devices: list[DeviceSpec], labels: Mapping[str, str] | None = None
) -> None:
    validate_labels(labels or {}, f"host {host_id[:MAX_ID_LENGTH]}")
    if not host_id or len(host_id) > MAX_ID_LENGTH:
        raise InvalidArgument(f"host_id must be 1..{MAX_ID_LENGTH} characters")
    check_printable(host_id, "host_id")
    check_printable(address, "address")
    try:
        port = split_address(address)[1]
    except ValueError:
        raise InvalidArgument(f"address {shown(address)} is not HOST:PORT") from None
    if not 0 < port < 65536 or len(address) > MAX_ID_LENGTH:  # clients dial it: a port they cannot is no address
        raise InvalidArgument(f"address {shown(address)}: a port from 1 to 65535, at most {MAX_ID_LENGTH} characters")
    if not devices:
        raise InvalidArgument(f"host {host_id} registered no devices")
    if len(devices) > MAX_DEVICES_PER_HOST:
        raise InvalidArgument(f"host {host_id} registered {len(devices)} devices (at most {MAX_DEVICES_PER_HOST})")
    seen: set[int] = set()
    for d in devices:
        if d.index in seen:
            raise InvalidArgument(f"host {host_id}: device index {d.index} appears twice")
        seen.add(d.index)
        if d.memory_bytes <= 0:
            raise InvalidArgument(f"host {host_id}: device {d.index} has no memory (memory_bytes={d.memory_bytes})")
        if len(d.uuid) > MAX_ID_LENGTH or len(d.model) > MAX_ID_LENGTH:
            raise InvalidArgument(f"host {host_id}: device {d.index} uuid/model longer than {MAX_ID_LENGTH}")
        check_printable(d.uuid, f"host {host_id}: device {d.index} uuid")
        check_printable(d.model, f"host {host_id}: device {d.index} model")


class LeaseSide(Protocol):
    """What the host book needs of the lease side (the Core, leases.py)."""

    def active_on(self, host_id: str) -> list[LeaseRecord]: ...

    def is_active_on(self, lease_id: str, host_id: str) -> bool: ...

    def tokens_until(self, lease_id: str, host_id: str) -> float | None:
        """Until when a token of the lease naming `host_id` may be presented, if the lease ended on that host."""

    def end(self, leases: Iterable[LeaseRecord], state: LeaseState, change: Change | None = None) -> None:
        """End active leases and write `change` in the same store transaction."""

    def write(self, change: Change) -> None: ...

    def serve_waiters(self) -> None: ...


def _heartbeat_state(host: Host, draining: bool) -> HostState:
    """The state a live host's heartbeat saying `draining` puts it in (an operator's cordon keeps it draining)."""
    return HostState.DRAINING if draining or host.cordoned else HostState.UP


class HostBook:
    """The daemons the Core knows: Register, Heartbeat, operators' drain and remove, silent hosts marked down,
    and the leases each host must be told are revoked. Shares the Core's lock and pool; asks the lease side
    (`LeaseSide`) to end leases, write to the store and serve waiting requests."""

    def __init__(self, lock: threading.RLock, pool: Pool, lease_side: LeaseSide, host_timeout: float = 10.0) -> None:
        self.lock = lock
        self.pool = pool
        self.lease_book = lease_side
        # A host heard from this recently is live: another daemon's Register of its id from another address is
        # refused (`_check_duplicate`); half the host timeout, so that a daemon restarted at another address is
        # taken before its host is marked down (its leases lost).
        self.live_window = host_timeout / 2
        # host -> {lease to revoke at its next heartbeat: until when one of its tokens may be alive}
        self.revoked: dict[str, dict[str, float]] = {}
        # host -> {lease already told revoked: until when} (kept until then): a daemon that restarts lost its
        # verifier's list, so its Register queues them again (until round 43 nothing refilled it: every ended lease's
        # unexpired token attached at the restarted daemon once, for a heartbeat interval each).
        self.told: dict[str, dict[str, float]] = {}

    def revoke(self, lease: LeaseRecord) -> None:
        """Tell the lease's hosts at their next heartbeat that it ended."""
        for host_id in lease.hosts:
            self.revoked.setdefault(host_id, {})[lease.lease_id] = lease.expires_at + REVOCATION_SLACK

    def forget_revocations(self, now: float) -> None:
        """Drop the pending revocations no token can need any more (their leases' tokens have all expired): a host
        that never heartbeats again (down, removed) keeps them no longer than that."""
        for book in (self.revoked, self.told):
            for host_id in [h for h, pending in book.items() if min(pending.values(), default=0.0) <= now]:
                pending = {k: until for k, until in book[host_id].items() if until > now}
                if pending:
                    book[host_id] = pending
                else:
                    del book[host_id]

    def register(
        self, host_id: str, address: str, devices: list[DeviceSpec], labels: Mapping[str, str] | None = None
    ) -> None:
        """Add a host or take it back; its active leases survive if their devices are unchanged."""
        validate_registration(host_id, address, devices, labels)
        with self.lock:
            old = self.pool.hosts.get(host_id)
            self._check_duplicate(old, host_id, address)
            self._check_uuids(host_id, devices)
            cordoned = old is not None and old.cordoned
            host = Host(
                host_id,
                address,
                {d.index: PoolDevice(host_id, d.index, d.uuid, d.model, d.memory_bytes, d.fake) for d in devices},
                dict(labels or {}),
                HostState.DRAINING if cordoned else HostState.UP,
                time.time(),
                cordoned,
            )
            told = self.told.pop(host_id, None)
            if told:  # (a restarted daemon's verifier is empty: its first heartbeat tells it again)
                self.revoked.setdefault(host_id, {}).update(told)
            mine = self.lease_book.active_on(host_id)
            keep: list[LeaseRecord] = []
            lose: list[LeaseRecord] = []
            for lease in mine:
                ok = all(
                    g.device in host.devices
                    and old is not None
                    and g.device in old.devices
                    and old.devices[g.device].capacity_bytes == host.devices[g.device].capacity_bytes
                    for g in lease.grants
                    if g.host_id == host_id
                )
                (keep if ok else lose).append(lease)
            # One transaction: the host and the leases it loses; `_end` writes both, then frees the lost
            # grants on the old devices, before the new host replaces them in memory.
            self.lease_book.end(lose, LeaseState.LOST, Change(hosts=[host]))
            self.pool.set_host(host)
            for lease in keep:
                self.pool.take([g for g in lease.grants if g.host_id == host_id])
            log.info(
                "host %s registered at %s with %d device(s)%s",
                host_id,
                address,
                len(devices),
                "" if old is None else f" (again; {len(keep)} lease(s) kept, {len(lose)} lost)",
            )
            self.lease_book.serve_waiters()

    def _check_duplicate(self, old: Host | None, host_id: str, address: str) -> None:
        """AlreadyExists when `host_id` is live (up or draining, heard from within `live_window`) at another address:
        a second daemon given the same --host-id. Until round 44 it took the host over (its address, its devices), the
        first one's sessions and heartbeats went on beside it, and the pool placed the first's leases on the second.
        The first is kept; a daemon that restarted at another address is taken once the first has been silent for
        `live_window` (its registrar retries within 5 s)."""
        if old is None or old.state == HostState.DOWN or old.address == address:
            return
        silent = time.time() - old.last_seen
        if silent >= self.live_window:
            return
        raise AlreadyExists(
            f"host {host_id} is live at {old.address} (heard from {silent:.1f} s ago): the daemon at {address} may not "
            f"register as {host_id} too (refused; the first is kept). Give it another --host-id, or stop the first: a "
            f"daemon restarted at another address takes its host id once the first has been silent for "
            f"{self.live_window:g} s"
        )

    def _check_uuids(self, host_id: str, devices: list[DeviceSpec]) -> None:
        """AlreadyExists when a device's GPU UUID is another live host's (up or draining, heard from within
        `live_window`): the UUID is bound to the first host that registered it while that host lives. Until round 48
        (warts48) a host could name another's GPU UUIDs, and placement, which gives a multi-GPU lease distinct
        physical GPUs (distinct UUIDs), then could not place some of them (a semi-trusted host's denial of service).
        The host itself re-registering (a restart) keeps them; a host silent past `live_window` or down frees them.
        A GPU without a UUID of its own (the daemon's fallback `GPU-cuda<index>`, server/devices.py, or none) is
        its host's (capacity.py `physical_gpu`, round 49): bound to that host for good, it is no other host's to
        claim and claims no other host's (round 48 left those names unbound, and counted them as one GPU pool-wide)."""
        mine = {physical_gpu(host_id, d.uuid, d.index): d.uuid for d in devices}
        now = time.time()
        taken: list[str] = []
        other = None
        for gpu in sorted(mine):  # (by the pool's index, not a look at every host: a 10,000-host pool re-registers)
            owner = self.pool.hosts.get(self.pool.uuid_host.get(gpu, host_id))
            if owner is None or owner.host_id == host_id or owner.state == HostState.DOWN:
                continue
            if now - owner.last_seen >= self.live_window or all(d.gpu != gpu for d in owner.devices.values()):
                continue
            other = other or owner
            taken += [mine[gpu]] if owner is other else []
        if taken and other is not None:
            more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
            raise AlreadyExists(
                f"host {host_id} registers GPU {taken[0]}{more}, which live host {other.host_id} registered "
                f"first (refused; a GPU UUID is its first host's while that host lives): two daemons may not "
                f"offer one physical GPU. Once {other.host_id} has been silent for {self.live_window:g} s (or is "
                f"removed) its GPUs may be registered elsewhere"
            )

    def heartbeat(
        self,
        host_id: str,
        session_leases: Iterable[str],
        used_bytes: Mapping[int, int],
        draining: bool,
        until: dict[str, float] | None = None,
        address: str = "",
        leases_on: Mapping[int, frozenset[str]] | None = None,
        measured: Mapping[int, tuple[int | None, Mapping[str, int]]] | None = None,
    ) -> tuple[list[str], bool]:
        """Record liveness and usage; returns (leases to revoke, whether the host must register again). `until`
        is given, for each lease revoked, until when one of its tokens may be presented (`HeartbeatReply`): a
        session's lease that ended on this host, its expiry and the slack; one the scheduler never placed here (or
        forgot), the longest a token lives. `address`: the heartbeating daemon's registered address ("": an older
        daemon, not compared); another than the host's is a daemon whose id was taken over (`_check_duplicate`)
        while it was silent: it must register again, and takes neither the host's revocations nor its liveness.
        Until the round 44 review such a daemon, resumed, took the revocations due to the one that took over (each
        is told once): a lease released then still attached there. `leases_on`: each device's sessions' leases (the
        heartbeat's sessions; None: not known, left as they were), kept with its usage (`PoolDevice.session_leases`).
        `measured` (terms54): each device's measured free memory (None: not measured) and its leases' bytes in use
        (`PoolDevice.measured_free`, `lease_used`); None: left as they were."""
        with self.lock:
            host = self.pool.hosts.get(host_id)
            if host is None or host.state == HostState.DOWN or (address and address != host.address):
                return [], True
            host.last_seen = time.time()  # liveness and usage are not state: never stored
            for index, used in used_bytes.items():
                dev = host.devices.get(index)
                if dev is not None:
                    dev.used_bytes = used
                    if leases_on is not None:
                        dev.session_leases = leases_on.get(index, frozenset())
                    if measured is not None:
                        dev.measured_free, dev.lease_used = measured.get(index, (None, {}))
            want = _heartbeat_state(host, draining)
            if host.state != want:
                self.lease_book.write(Change(hosts=[dataclasses.replace(host, state=want)]))
                log.info("host %s is %s", host_id, want)
                self.pool.set_state(host_id, want)
                if want == HostState.UP:
                    self.lease_book.serve_waiters()
            pending = self.revoked.pop(host_id, {})
            if pending:
                self.told.setdefault(host_id, {}).update(pending)
            revoked = set(pending)
            revoked.update(x for x in session_leases if x and not self.lease_book.is_active_on(x, host_id))
            if until is not None:
                longest = time.time() + tokens.MAX_TTL
                for x in revoked:
                    until[x] = pending.get(x) or self.lease_book.tokens_until(x, host_id) or longest
            return sorted(revoked), False

    def changes_state(self, host_id: str, draining: bool) -> bool:
        """Whether a heartbeat of `host_id` saying `draining` would write the host's state to the store."""
        with self.lock:
            host = self.pool.hosts.get(host_id)
            if host is None or host.state == HostState.DOWN:
                return False
            return host.state != _heartbeat_state(host, draining)

    def drain_host(self, host_id: str, undo: bool = False) -> None:
        """Operator: no new placements on the host (its leases run on), until `undo`; survives restarts."""
        with self.lock:
            host = self.pool.hosts.get(host_id)
            if host is None:
                raise NotFound(f"unknown host {shown(host_id)}")
            state = host.state
            if state != HostState.DOWN:
                state = HostState.UP if undo else HostState.DRAINING
            self.lease_book.write(Change(hosts=[dataclasses.replace(host, cordoned=not undo, state=state)]))
            host.cordoned = not undo
            self.pool.set_state(host_id, state)
            log.info("host %s %s by an operator", host_id, "put back" if undo else "drained")
            if state == HostState.UP:
                self.lease_book.serve_waiters()

    def remove_host(self, host_id: str, force: bool = False) -> int:
        """Operator: forget a host gone for good; its active leases are refused unless `force` (then lost)."""
        with self.lock:
            if host_id not in self.pool.hosts:
                raise NotFound(f"unknown host {shown(host_id)}")
            held = self.lease_book.active_on(host_id)
            if held and not force:
                raise FailedPrecondition(
                    f"host {host_id} holds {len(held)} active lease(s): drain it and wait, or remove with --force"
                )
            self.lease_book.end(held, LeaseState.LOST, Change(forget_hosts=[host_id]))
            self.pool.remove_host(host_id)
            # Its pending revocations are kept (until their tokens expire, `forget_revocations`): a daemon still
            # running registers again and is told first (as after `mark_silent_down`). Until round 39 a removal
            # without --force dropped them, and the usual case - a host silent past --host-timeout, its leases lost,
            # then removed - let the tenant of a lost lease attach there again with its unexpired token.
            log.warning("host %s removed by an operator (%d lease(s) lost)", host_id, len(held))
            return len(held)

    def mark_silent_down(self, now: float, timeout: float) -> None:
        """Hosts silent for `timeout` seconds are down and their leases lost (a step the store refuses is retried
        at the next sweep)."""
        silent = [h for h in self.pool.hosts.values() if h.state != HostState.DOWN and h.last_seen + timeout < now]
        for host in silent:
            lost = self.lease_book.active_on(host.host_id)
            try:
                self.lease_book.end(
                    lost, LeaseState.LOST, Change(hosts=[dataclasses.replace(host, state=HostState.DOWN)])
                )
            except Unavailable:
                continue  # not saved, so not done: the next sweep tries again
            log.warning("host %s silent for %.1f s: marked down, its leases lost", host.host_id, now - host.last_seen)
            self.pool.set_state(host.host_id, HostState.DOWN)
            # Its revocations (the leases just lost among them) wait for its return: the first heartbeat after it
            # registers again names them. Until round 35 they were dropped here, and a tenant attached there again
            # with the unexpired token of a lease the scheduler had ended (and whose capacity it had given away).
            # A host that never returns keeps them until their tokens have expired (`forget_revocations`).
