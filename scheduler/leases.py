"""The scheduler's core: hosts come and go, leases are granted, renewed, released, expire or are lost.

Plain domain code - no gRPC here. One lock serializes every decision; each decision is written to the
store in one transaction *before* it is applied in memory, so a crash never hands out capacity twice and a
write the store refuses (disk full) changes nothing: the caller gets UNAVAILABLE. Requests that do not
fit may wait, served strictly in FIFO order as capacity frees up (but one that no device up could hold, were they
empty, waits without holding those behind it).

The scheduler's own absence (a restart, a pause of the process) is not held against anyone: after it,
every host gets a fresh `host_timeout` to heartbeat and every active lease a grace period
(`outage_grace`) to be renewed before it expires.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gpupool import certrevoke, tokens
from gpupool.config import format_size
from gpupool.errors import (
    FailedPrecondition,
    GpupoolError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    shown,
)
from gpupool.protocol import HostState, LeaseState

from .capacity import SHARE_UNITS, Grant, Pool
from .hosts import REVOCATION_SLACK, HostBook
from .placement import Request, could_fit, fraction_units, min_units, place, size_on, validate
from .store import CertRow, Change, LeaseRecord, Store

log = logging.getLogger(__name__)


def _drop_ended(heap: list[float], now: float) -> None:
    """Take the times at or before `now` off a heap of token end times (`Core.revoked_until`, `revoked_all`)."""
    while heap and heap[0] <= now:
        heapq.heappop(heap)


@dataclass(frozen=True)
class CoreConfig:
    lease_ttl: float = 60.0
    max_lease_ttl: float = 24 * 3600.0
    host_timeout: float = 10.0
    heartbeat_interval: float = 2.0
    # How long an ended lease is remembered at least (Renew says why it ended, not NOT_FOUND); one whose tokens may
    # still be presented is kept longer, until they have expired (`sweep`).
    retention: float = 600.0
    max_waiters: int = 1000  # each waiter holds a server thread: beyond this, fail at once instead
    tenant_max_share: float = 0.0  # GPUs' worth of shares one tenant may hold (and wait for); 0: no limit
    tenant_max_waiting: int = 0  # waiting requests of one tenant; 0: no limit beyond max_waiters
    # Active leases (and waiting requests) of one tenant; 0: no limit. A share limit alone does not bound them: a
    # lease may be one share unit (a millionth of a GPU), and every lease costs memory, a row, and ListPool time.
    tenant_max_leases: int = 0
    # Ended leases of one tenant whose tokens may still be presented (their expiry and REVOCATION_SLACK not passed):
    # every daemon of such a lease remembers it until then (tokens.Verifier), so this bounds what a tenant that
    # allocates and releases long leases makes each daemon hold; 0: no limit.
    tenant_max_revoked: int = 0
    # The same, all tenants together (round 45: `tenant_max_revoked` alone let many tenants, or an `--insecure`
    # scheduler's any tenant names, grow every daemon's list without bound); 0: no limit.
    max_revoked: int = 0
    outage_grace: float = 30.0  # after the scheduler was away, how long leases it could not renew are kept
    # A gap this long between two sweeps means the scheduler itself was not running (SIGSTOP, VM pause):
    # the hosts' silence over that time is ours, not theirs. None: min(3 s, host_timeout / 2).
    pause_threshold: float | None = None


class Events:
    """What the core reports as it decides; metrics.py records it (this default records nothing)."""

    def lease_event(self, event: str) -> None: ...

    def store_error(self) -> None: ...

    def allocation(self, result: str, seconds: float) -> None: ...


@dataclass
class _AllocationWaiter:
    req: Request
    tenant: str
    ttl: float
    units: int = 0  # an estimate of the share units it will take (for the tenant's limit)
    done: threading.Event = field(default_factory=threading.Event)
    lease: LeaseRecord | None = None
    # room came, but taking it would pass the tenant's limit (ResourceExhausted), or its client certificate was
    # revoked meanwhile (Unauthenticated: `revoke_certs`)
    refused: GpupoolError | None = None
    fits: tuple[int, bool] = (-1, False)  # (the pool's epoch, `placement.could_fit` then)
    cert: str = ""  # the client certificate it is asked with (`LeaseRecord.cert`)


class Core:
    """Leases and the FIFO of waiting requests; the hosts are its `hosts` book (hosts.py), which shares its lock
    and pool."""

    def __init__(
        self,
        store: Store,
        key: tokens.Signer | bytes,
        config: CoreConfig = CoreConfig(),
        events: Events | None = None,
        certs: certrevoke.RevokedCerts | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.pool = Pool()
        self.store = store
        self.key = key
        self.config = config
        self.events = events or Events()
        self.leases: dict[str, LeaseRecord] = {}
        self.waiters: deque[_AllocationWaiter] = deque()
        self.hosts = HostBook(self.lock, self.pool, self, config.host_timeout)
        self.held_units: dict[str, int] = {}  # share units held per tenant (active leases)
        self.held_leases: dict[str, int] = {}  # active leases per tenant
        # (terms53) lease id -> until when a token minted before its quota was lowered may live: its bytes past the
        # new quota stay counted until then (`note_kept`)
        self.kept_until: dict[str, float] = {}
        # per tenant: until when the tokens of each of its ended leases may live (a heap; `tenant_max_revoked`)
        self.revoked_until: dict[str, list[float]] = {}
        self.revoked_all: list[float] = []  # the same, every tenant's together (a heap; `max_revoked`)
        # Revoked client certificates: fingerprint -> (fingerprint, revoked at, note), in the store; `certs` is the
        # set the authenticator refuses (shared with it: the server's), replaced whole at each change.
        self.cert_rows: dict[str, CertRow] = {}
        self.certs = certs if certs is not None else certrevoke.RevokedCerts()
        self.certs_revoked_at = 0.0  # when a certificate was last revoked: status tokens minted before are refused
        self.scheduler_id = uuid.uuid4().hex
        self.started_at = time.time()  # status tokens minted before (by another process, or leader) are revoked
        self._last_alive: tuple[float, float] | None = None  # (monotonic, wall) of the last `alive()`
        self._load()

    def _load(self) -> None:
        hosts, leases = self.store.load()
        load_certs = getattr(self.store, "load_certs", None)
        self.cert_rows = {row[0]: row for row in (load_certs() if load_certs is not None else [])}
        self.certs.replace(self.cert_rows)
        now = time.time()
        for host in hosts:
            host.last_seen = now  # give every host a full timeout to heartbeat the restarted scheduler
            self.pool.set_host(host)
        for lease in leases:
            self.leases[lease.lease_id] = lease
            if lease.state == LeaseState.ACTIVE:
                self.pool.take(lease.grants)  # (with the bytes kept past a lowered quota: terms54)
                self._hold(lease, +1)
                if any(g.kept_bytes for g in lease.grants):
                    self.kept_until[lease.lease_id] = lease.kept_until or lease.expires_at
                # Nobody could renew it while we were down: give its tenant time to do so now.
                lease.grace_until = now + self.config.outage_grace
            elif lease.expires_at + REVOCATION_SLACK > now:
                # Its hosts may not have heard that it ended (the revocations waiting for their heartbeats were in
                # the memory of the process that stopped): tell them again. Until round 39 a restart forgot them,
                # and the ended lease's unexpired tokens attached at its hosts again.
                self.hosts.revoke(lease)
                self._count_revoked(lease)
        active = sum(1 for x in leases if x.state == LeaseState.ACTIVE)
        if hosts or leases:
            log.info("loaded %d hosts and %d active leases from the store", len(hosts), active)

    # ---- clients ----

    def allocate(
        self,
        req: Request,
        tenant: str = "",
        ttl: float = 0.0,
        wait: float = 0.0,
        cancelled: Callable[[], bool] = lambda: False,
        cert: str = "",
    ) -> LeaseRecord:
        """Grant a lease now, or after waiting up to `wait` seconds in FIFO order; else ResourceExhausted. `cert`: the
        fingerprints of the client certificate it is allocated with (`LeaseRecord.cert`): its tokens are bound to it."""
        start = time.monotonic()
        try:
            if not (math.isfinite(ttl) and math.isfinite(wait)):  # a NaN ttl would be a lease that never expires
                raise InvalidArgument("ttl and wait must be finite")
            if ttl < 0 or wait < 0:
                raise InvalidArgument("ttl and wait must not be negative")
            ttl = min(ttl or self.config.lease_ttl, self.config.max_lease_ttl)
            with self.lock:
                validate(req, self.pool)
                self._check_lease_count(tenant)
                self._check_revoked(tenant)
                self._check_cert(cert)
                units = req.gpus * min_units(self.pool, req)
                if not any(self._holds_line(w) for w in self.waiters):
                    grants = place(self.pool, req)
                    if grants is not None:
                        self._check_tenant(tenant, req, sum(g.units for g in grants))
                        lease = self._grant(grants, tenant, ttl, cert)
                        self.events.allocation("granted", time.monotonic() - start)
                        return lease
                self._check_tenant(tenant, req, units)
                if wait <= 0:
                    raise ResourceExhausted(self._exhausted_message(req))
                if len(self.waiters) >= self.config.max_waiters:
                    raise ResourceExhausted(f"{self._exhausted_message(req)}; the waiting line is full")
                mine = sum(1 for w in self.waiters if w.tenant == tenant)
                if self.config.tenant_max_waiting and mine >= self.config.tenant_max_waiting:
                    raise ResourceExhausted(
                        f"{self._exhausted_message(req)}; tenant {tenant!r} already has {mine} request(s) waiting "
                        f"(at most {self.config.tenant_max_waiting})"
                    )
                waiter = _AllocationWaiter(req, tenant, ttl, units, cert=cert)
                self.waiters.append(waiter)
        except InvalidArgument:
            self.events.allocation("invalid", time.monotonic() - start)
            raise
        except ResourceExhausted:
            self.events.allocation("exhausted", time.monotonic() - start)
            raise
        lease = self._wait(waiter, start, start + wait, cancelled)
        self.events.allocation("granted", time.monotonic() - start)
        return lease

    def _wait(
        self, waiter: _AllocationWaiter, start: float, deadline: float, cancelled: Callable[[], bool]
    ) -> LeaseRecord:
        while not waiter.done.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() < deadline and not cancelled():
                continue
            with self.lock:
                if waiter.done.is_set():  # granted (or refused) in the instant before the deadline
                    break
                self.waiters.remove(waiter)
                self.serve_waiters()  # the head may have been blocking those behind it
                message = f"waited in vain: {self._exhausted_message(waiter.req)}"
            self.events.allocation("timeout", time.monotonic() - start)
            raise ResourceExhausted(message)
        if waiter.refused is not None:
            if isinstance(waiter.refused, ResourceExhausted):  # (not a revoked certificate's: `_cert_refused`)
                self.events.allocation("exhausted", time.monotonic() - start)
            raise waiter.refused
        assert waiter.lease is not None
        return waiter.lease

    def _holds_line(self, waiter: _AllocationWaiter) -> bool:
        """Whether `waiter` keeps those behind it waiting: it would fit the devices up were they empty. One that
        would not (more GPUs than are up, labels no device up has) waits for hosts without holding the line: until
        round 39 one tenant's request for 1024 GPUs, waiting, made every other tenant's Allocate wait behind it (or
        fail at once) on an idle pool for as long as it asked to wait."""
        if waiter.fits[0] != self.pool.epoch:
            waiter.fits = (self.pool.epoch, could_fit(self.pool, waiter.req))
        return waiter.fits[1]

    def serve_waiters(self) -> None:
        """Grant waiting requests in FIFO order while the head fits. A head whose placement would pass its tenant's
        limit is refused (its estimate, counted when it began to wait, is a lower bound for memory requests: the
        largest device's share of it, where a smaller device gives a larger share), and the next one served. A
        request that could not fit the devices up even were they empty is passed over (`_holds_line`)."""
        i = 0
        while i < len(self.waiters):
            head = self.waiters[i]
            head.refused = self._cert_refused(head.cert)  # (secrev46) revoked while it waited: out of line at once
            if head.refused is not None:
                del self.waiters[i]
                head.done.set()
                continue
            grants = place(self.pool, head.req)
            if grants is None:
                if self._holds_line(head):
                    return
                i += 1
                continue
            head.refused = self._over_limit(head.tenant, head.req, sum(g.units for g in grants), head)
            if head.refused is not None:
                del self.waiters[i]
                head.done.set()
                continue
            try:
                head.lease = self._grant(grants, head.tenant, head.ttl, head.cert)
            except Unavailable:
                return  # the store refused: the head keeps its place, the next sweep tries again
            del self.waiters[i]
            head.done.set()

    def _cert_refused(self, cert: str) -> Unauthenticated | None:
        """The refusal of a request whose client certificate (`LeaseRecord.cert`'s fingerprints) is revoked: one that
        passed the caller's check just before the revocation, or waited in line meanwhile (secrev46: the revocation
        ended the certificate's leases and gave their room to its waiting request, a lease it did not end)."""
        if cert and self.certs.holds(cert.split()):
            return Unauthenticated("the client certificate this lease was asked with was revoked meanwhile")
        return None

    def _check_cert(self, cert: str) -> None:
        refused = self._cert_refused(cert)
        if refused is not None:
            raise refused

    def write(self, change: Change) -> None:
        """One store transaction; a refused write becomes UNAVAILABLE (the caller has changed nothing yet)."""
        try:
            self.store.write(change)
        except GpupoolError:
            raise
        except Exception as exc:  # noqa: BLE001 - sqlite3.Error, OSError, a database driver's errors
            self.events.store_error()
            log.error("the state store refused a write: %s: %s", type(exc).__name__, exc)
            raise Unavailable(
                f"the scheduler cannot save its state ({type(exc).__name__}: {exc}); nothing was changed, retry later"
            ) from exc

    def _hold(self, lease: LeaseRecord, sign: int) -> None:
        units = self.held_units.get(lease.tenant, 0) + sign * sum(g.units for g in lease.grants)
        if units:
            self.held_units[lease.tenant] = units
        else:
            self.held_units.pop(lease.tenant, None)
        count = self.held_leases.get(lease.tenant, 0) + sign
        if count:
            self.held_leases[lease.tenant] = count
        else:
            self.held_leases.pop(lease.tenant, None)

    def _check_lease_count(self, tenant: str) -> None:
        """ResourceExhausted when the tenant's active leases and waiting requests are at `tenant_max_leases`."""
        limit = self.config.tenant_max_leases
        if limit <= 0:
            return
        held = self.held_leases.get(tenant, 0)
        waiting = sum(1 for w in self.waiters if w.tenant == tenant)
        if held + waiting >= limit:
            raise ResourceExhausted(
                f"tenant {tenant!r} holds {held} lease(s) and waits for {waiting}: at most {limit} "
                "(--tenant-max-leases); release one first"
            )

    def _count_revoked(self, lease: LeaseRecord) -> None:
        """Count an ended lease whose tokens may live towards its tenant's `tenant_max_revoked` and `max_revoked`."""
        until = lease.expires_at + REVOCATION_SLACK
        if self.config.tenant_max_revoked > 0:
            heapq.heappush(self.revoked_until.setdefault(lease.tenant, []), until)
        if self.config.max_revoked > 0:
            heapq.heappush(self.revoked_all, until)

    def _check_revoked(self, tenant: str) -> None:
        """ResourceExhausted when the ended leases whose tokens may live are at `max_revoked` (every tenant's) or the
        tenant's at `tenant_max_revoked`. At the bound no lease is granted (to any tenant, for the first) until the
        oldest such lease's tokens expire: forgetting a revocation instead would let its token attach again. Past nine
        tenths of the bound, tenants holding their share or more wait (`_check_share`)."""
        pool = self.revoked_all
        if self.config.max_revoked > 0:
            _drop_ended(pool, time.time())
            self._check_share(tenant, len(pool))
            if len(pool) >= self.config.max_revoked:
                raise ResourceExhausted(
                    f"the pool holds {len(pool)} ended lease(s) whose tokens are still alive (every daemon of such a "
                    f"lease remembers it until it expires): at most {self.config.max_revoked} (--max-revoked), all "
                    f"tenants together; the next frees at {time.strftime('%H:%M:%S', time.gmtime(pool[0]))} UTC "
                    "(ask shorter TTLs)"
                )
        limit = self.config.tenant_max_revoked
        pending = self.revoked_until.get(tenant)
        if limit <= 0 or pending is None:
            return
        _drop_ended(pending, time.time())
        if not pending:
            del self.revoked_until[tenant]
        elif len(pending) >= limit:
            raise ResourceExhausted(
                f"tenant {tenant!r} ended {len(pending)} lease(s) whose tokens are still alive (their daemons "
                f"remember each until it expires): at most {limit} (--tenant-max-revoked); the next frees at "
                f"{time.strftime('%H:%M:%S', time.gmtime(pending[0]))} UTC (ask shorter TTLs)"
            )

    def _check_share(self, tenant: str, total: int) -> None:
        """Past `max_revoked`'s last tenth (its reserve), ResourceExhausted for a tenant that holds its share or more
        of the ended leases (the bound's first nine tenths over the tenants holding any): round 45 (secrev45), a few
        tenants releasing long leases filled the bound and refused every other tenant's Allocate for up to a day.
        Needs the per-tenant counts (`tenant_max_revoked` > 0); the bound itself is never passed."""
        soft = self.config.max_revoked - self.config.max_revoked // 10
        if total < soft or self.config.tenant_max_revoked <= 0:
            return
        now = time.time()
        holders = 0
        for name, pending in list(self.revoked_until.items()):
            _drop_ended(pending, now)
            if pending:
                holders += 1
            else:
                del self.revoked_until[name]
        mine = self.revoked_until.get(tenant, [])
        share = max(1, soft // max(1, holders))
        if len(mine) >= share:
            raise ResourceExhausted(
                f"the pool holds {total} ended lease(s) whose tokens are still alive, past {soft} of at most "
                f"{self.config.max_revoked} (--max-revoked): the rest is kept for tenants holding less than their "
                f"share ({share}); tenant {tenant!r} holds {len(mine)}, the next frees at "
                f"{time.strftime('%H:%M:%S', time.gmtime(mine[0]))} UTC (ask shorter TTLs)"
            )

    def _check_tenant(self, tenant: str, req: Request, units: int) -> None:
        """ResourceExhausted when `units` more (with what the tenant holds and waits for) pass its limit."""
        refused = self._over_limit(tenant, req, units)
        if refused is not None:
            raise refused

    def _over_limit(
        self, tenant: str, req: Request, units: int, waiter: _AllocationWaiter | None = None
    ) -> ResourceExhausted | None:
        """The refusal when `units` more pass the tenant's limit, with what it holds and its waiting requests'
        estimates (but `waiter`'s own, which `units` replaces); None when they fit."""
        limit = self.config.tenant_max_share
        if limit <= 0:
            return None
        waiting = sum(w.units for w in self.waiters if w.tenant == tenant and w is not waiter)
        held = self.held_units.get(tenant, 0) + waiting
        if held + units <= round(limit * SHARE_UNITS):
            return None
        return ResourceExhausted(
            f"tenant {tenant!r} holds or waits for {held / SHARE_UNITS:.3g} GPU(s) worth of shares; "
            f"{req.describe()} would pass its limit of {limit:g}"
            + (f" (where room came it takes {units / SHARE_UNITS:.3g})" if waiter is not None else "")
        )

    def _exhausted_message(self, req: Request) -> str:
        up = sum(1 for _ in self.pool.up_devices())
        msg = (
            f"no room for {req.describe()}: the largest free fraction of any device is "
            f"{self.pool.largest_free_fraction():.3g} "
            f"(largest free memory {format_size(self.pool.largest_free_bytes())}; {up} device(s) up)"
        )
        if self.waiters:
            msg += f"; {len(self.waiters)} request(s) waiting ahead"
        return msg

    def _grant(self, grants: list[Grant], tenant: str, ttl: float, cert: str = "") -> LeaseRecord:
        now = time.time()
        lease = LeaseRecord(uuid.uuid4().hex, tenant, grants, now + ttl, ttl, now, cert=cert)
        self.write(Change(leases=[lease]))
        self.pool.take(grants)
        self._hold(lease, +1)
        self.leases[lease.lease_id] = lease
        self.events.lease_event("granted")
        return lease

    def renew(self, lease_id: str, tenant: str | None = None) -> LeaseRecord:
        """Extend an active lease by its TTL (its tokens are re-minted by the caller); `tenant`, when the
        caller's identity is known, must be the lease's."""
        with self.lock:
            lease = self._get(lease_id, tenant)
            now = time.time()
            if self._last_alive is not None:
                self.alive()
            if lease.state == LeaseState.ACTIVE and lease.expires_at <= now and lease.grace_until <= now:
                self.end([lease], LeaseState.EXPIRED)
            if lease.state == LeaseState.LOST:
                # FAILED_PRECONDITION, not UNAVAILABLE: the lease is gone for good, retrying cannot help.
                hosts = self.pool.hosts
                down = sorted(
                    h for h in lease.hosts if getattr(hosts.get(h), "state", HostState.DOWN) == HostState.DOWN
                )
                raise FailedPrecondition(
                    f"lease {lease_id} was lost: host {', '.join(down) or 'of the lease'} is down; allocate a new one"
                )
            if lease.state != LeaseState.ACTIVE:
                raise FailedPrecondition(f"lease {lease_id} is {lease.state}; allocate a new one")
            # By the policy of now: a lease asked for a day while --max-lease-ttl allowed it is renewed by the
            # scheduler's TTL bound of now (until round 35 it was renewed by its day for good, the bound lowered).
            ttl = min(lease.ttl, self.config.max_lease_ttl)
            self.write(Change(leases=[dataclasses.replace(lease, expires_at=now + ttl, ttl=ttl)]))
            lease.expires_at, lease.ttl, lease.grace_until = now + ttl, ttl, 0.0
            return lease

    def set_terms(
        self, lease_id: str, fraction: float | None = None, memory_bytes: int | None = None, share: float | None = None
    ) -> LeaseRecord:
        """Operators (terms53): an active lease's new terms on each of its devices, as Allocate sizes them: `fraction`
        (quota = fraction x capacity, share = fraction) or `memory_bytes` (share = memory / capacity), `share` in
        (0, 1] whatever the size says; a quota left out stays. Decided under the lock and saved before it applies,
        as a grant is: the pool's accounting (each device's bytes and share units, the tenant's held share) takes
        them at once, so a device's leases never hold more than its memory or one whole share. Its next renewal's
        tokens carry them (`token`); its daemons' sessions hold them from that refresh on (server/daemon.py
        `Daemon.refresh`: a quota below what a session holds refuses its allocations, and takes nothing). The share
        a lowering gives back serves the waiting requests at once; its memory once the session cannot hold it any
        more (`Grant.kept_bytes`, `note_kept`). Refused, nothing changed: more than a device's free memory or share
        beside what the lease holds on it, a raise past the memory its daemon measures free (`_check_measured`), or
        past the tenant's --tenant-max-share (RESOURCE_EXHAUSTED); a lease not active (FAILED_PRECONDITION)."""
        if fraction is None and memory_bytes is None and share is None:
            raise InvalidArgument("give the lease's new fraction, memory or share")
        if fraction is not None and memory_bytes is not None:
            raise InvalidArgument("give a fraction or a memory size, not both")
        for name, value in (("fraction", fraction), ("share", share)):
            if value is not None and not (math.isfinite(value) and 0.0 < value <= 1.0):
                raise InvalidArgument(f"{name} must be in (0, 1], got {value:g}")
        if memory_bytes is not None and memory_bytes <= 0:
            raise InvalidArgument("memory must be positive")
        with self.lock:
            lease = self._get(lease_id)
            now = time.time()
            if lease.state == LeaseState.ACTIVE and lease.expires_at <= now and lease.grace_until <= now:
                self.end([lease], LeaseState.EXPIRED)
            if lease.state != LeaseState.ACTIVE:
                raise FailedPrecondition(f"lease {lease_id} is {lease.state}: its terms are those it ended with")
            grants = [self._new_terms(g, fraction, memory_bytes, share) for g in lease.grants]
            for old, new in zip(lease.grants, grants, strict=True):
                if new.quota_bytes > old.held_bytes:  # (a raise: it must fit what the device has free, terms54)
                    self._check_measured(lease, new)
            more = sum(g.units for g in grants) - sum(g.units for g in lease.grants)
            limit = self.config.tenant_max_share
            if more > 0 and limit > 0:
                held = self.held_units.get(lease.tenant, 0) + sum(
                    w.units for w in self.waiters if w.tenant == lease.tenant
                )
                if held + more > round(limit * SHARE_UNITS):
                    raise ResourceExhausted(
                        f"tenant {lease.tenant!r} holds or waits for {held / SHARE_UNITS:.3g} GPU(s) worth of shares; "
                        f"these terms add {more / SHARE_UNITS:.3g}: past its limit of {limit:g} (--tenant-max-share); "
                        "nothing changed"
                    )
            # (the tokens minted before now end at the lease's end of now; stored with the kept bytes: terms54)
            kept = any(g.kept_bytes for g in grants)
            until = max(self.kept_until.get(lease_id, 0.0), lease.expires_at) if kept else 0.0
            self.write(Change(leases=[dataclasses.replace(lease, grants=grants, kept_until=until)]))
            self._regrant(lease, grants)
            lease.kept_until = until
            if until:
                self.kept_until[lease_id] = until
            self.events.lease_event("changed")
            log.info(
                "lease %s of tenant %r: terms set to %s",
                lease_id,
                lease.tenant,
                ", ".join(f"{g.host_id}/{g.device} {format_size(g.quota_bytes)} share {g.share:g}" for g in grants),
            )
            self.serve_waiters()  # (room a lowered quota or share gave back)
            return lease

    def _new_terms(self, g: Grant, fraction: float | None, memory_bytes: int | None, share: float | None) -> Grant:
        """`g` with the new terms on its device (`set_terms`); refused where they do not fit beside the others'."""
        dev = self.pool.device(g.key)
        if dev is None:
            raise FailedPrecondition(f"device {g.device} of host {g.host_id!r} is no longer in the pool")
        quota, units = g.quota_bytes, g.units
        if fraction is not None or memory_bytes is not None:
            size = size_on(Request(1, fraction, memory_bytes), dev)
            if size is None:
                raise InvalidArgument(
                    f"memory {format_size(memory_bytes or 0)} is more than device {g.device} of host {g.host_id!r} "
                    f"has ({format_size(dev.capacity_bytes)})"
                )
            quota, units = size
        if share is not None:
            units = fraction_units(share)
        # What the lease may hold there now (its quota, or what an older token's quota lets its session hold) stays
        # counted: a lowered quota's bytes come back through `note_kept`, never here.
        kept = max(0, g.held_bytes - quota)
        free_bytes, free_units = dev.free_bytes + g.held_bytes, dev.free_units + g.units
        if quota + kept > free_bytes or units > free_units:
            raise ResourceExhausted(
                f"device {g.device} of host {g.host_id!r} has {format_size(free_bytes)} and share "
                f"{free_units / SHARE_UNITS:.6g} free with this lease's {format_size(g.held_bytes)} and share "
                f"{g.share:.6g}: a quota of {format_size(quota)} and share {units / SHARE_UNITS:.6g} do not fit; "
                "nothing changed"
            )
        return Grant(g.host_id, g.device, quota, units, kept)

    def _check_measured(self, lease: LeaseRecord, g: Grant) -> None:
        """(terms54) ResourceExhausted unless `lease`'s raised quota `g` fits its device's free memory as the daemon
        last measured it (`PoolDevice.measured_free`: a real GPU's driver's count, where memory outside the pool is
        not free - other processes, CUDA contexts; a fake GPU's capacity less its sessions' bytes): what this lease
        may still grow by (its quota less what its sessions hold) and what every other lease on the device was
        promised and does not hold yet (their `held_bytes` less their use; a lease using more than it holds leaves
        nothing) must both fit it. Not measured (an older daemon, a real GPU NVML cannot measure (quota55), no
        heartbeat since a restart): the books alone (`_new_terms`)."""
        dev = self.pool.device(g.key)
        if dev is None or dev.measured_free is None:
            return
        used = dev.lease_used
        grow = max(0, g.quota_bytes - used.get(lease.lease_id, 0))
        others = sum(
            max(0, o.held_bytes - used.get(x.lease_id, 0))
            for x in self.active_on(g.host_id)
            if x is not lease
            for o in x.grants
            if o.key == g.key
        )
        if grow + others > dev.measured_free:
            raise ResourceExhausted(
                f"device {g.device} of host {g.host_id!r} has {format_size(dev.measured_free)} free by its daemon's "
                f"last measure, {format_size(others)} of it promised to other leases: a quota of "
                f"{format_size(g.quota_bytes)} (this lease's sessions hold {format_size(used.get(lease.lease_id, 0))}) "
                "does not fit; nothing changed"
            )

    def _regrant(self, lease: LeaseRecord, grants: list[Grant]) -> None:
        """Replace an active lease's grants in the pool's accounting and its tenant's (the lock held)."""
        self.pool.give(lease.grants)
        self._hold(lease, -1)
        lease.grants = grants
        self.pool.take(grants)
        self._hold(lease, +1)

    def note_kept(self, host_id: str, sessions: Iterable[tuple[str, int, int]], now: float | None = None) -> None:
        """A heartbeat of `host_id` (its sessions' lease id, device and bytes used): the bytes a lease may hold past
        a quota an operator lowered (`set_terms`, `Grant.kept_bytes`) stay counted on their device until every token
        minted before the change has ended (`kept_until`: one of those attaches, or keeps its session, at the older
        quota), and from then on only what its daemon reports its session holding past the new quota, never more
        than before (the session holds the new terms now: it cannot grow past them); the room freed serves the
        waiting requests. (Given back at once, a lowered quota's room would be promised to others while the session
        still held it.)"""
        if not self.kept_until:
            return
        now = time.time() if now is None else now
        with self.lock:
            used: dict[tuple[str, int], int] | None = None
            freed = False
            for lease_id, until in list(self.kept_until.items()):
                lease = self.leases.get(lease_id)
                if lease is None or lease.state != LeaseState.ACTIVE or not any(g.kept_bytes for g in lease.grants):
                    del self.kept_until[lease_id]
                    continue
                if until > now or host_id not in lease.hosts:
                    continue
                if used is None:
                    used = {}
                    for lease_of, device, n in sessions:
                        used[(lease_of, device)] = used.get((lease_of, device), 0) + n
                grants = [
                    dataclasses.replace(
                        g, kept_bytes=min(g.kept_bytes, max(0, used.get((lease_id, g.device), 0) - g.quota_bytes))
                    )
                    if g.host_id == host_id
                    else g
                    for g in lease.grants
                ]
                if grants != lease.grants:
                    stored = lease.kept_until if any(g.kept_bytes for g in grants) else 0.0
                    try:  # (stored first, as every change: a restart must not count more, nor less - terms54)
                        self.write(Change(leases=[dataclasses.replace(lease, grants=grants, kept_until=stored)]))
                    except Unavailable:
                        continue  # (counted as it was; the next heartbeat tries again)
                    self._regrant(lease, grants)
                    lease.kept_until = stored
                    freed = True
            if freed:
                self.serve_waiters()

    def release(self, lease_id: str, tenant: str | None = None) -> None:
        """Give a lease's capacity back (releasing an ended lease again is harmless)."""
        with self.lock:
            lease = self._get(lease_id, tenant)
            if lease.state == LeaseState.ACTIVE:
                self.end([lease], LeaseState.RELEASED)

    def _get(self, lease_id: str, tenant: str | None = None) -> LeaseRecord:
        lease = self.leases.get(lease_id)
        if lease is None or (tenant is not None and lease.tenant != tenant):
            raise NotFound(f"unknown lease {shown(lease_id)}")  # another tenant's lease is not even visible
        return lease

    def end(
        self, leases: Iterable[LeaseRecord], state: LeaseState, change: Change | None = None, serve: bool = True
    ) -> None:
        """End active leases: persist (with `change`'s hosts, one transaction), then free their capacity, tell
        their daemons and serve the waiters (`serve`; the caller does, after it, where it is False)."""
        now = time.time()
        ended = [x for x in leases if x.state == LeaseState.ACTIVE]
        copies = [dataclasses.replace(x, state=state, ended_at=now) for x in ended]
        with_hosts = change or Change()
        self.write(dataclasses.replace(with_hosts, leases=[*with_hosts.leases, *copies]))
        for lease in ended:
            lease.state, lease.ended_at = state, now
            self.pool.give(lease.grants)
            self._hold(lease, -1)
            self.hosts.revoke(lease)
            self._count_revoked(lease)
            self.events.lease_event(state if state != LeaseState.RELEASED else "released")
        if ended and serve:
            self.serve_waiters()

    def token(self, lease: LeaseRecord, index: int) -> str:
        g = lease.grants[index]
        # Only the sessions of a lease of several devices form a collective group between daemons: only their
        # workers get network sockets (the daemon's --worker-network is the upper bound).
        # Their tokens carry the lease's group secret, the same at every renewal (tokens.lease_group).
        # (round 46) Bound to the client certificate the lease was allocated with, where it was: a daemon that sees
        # client certificates attaches it for that certificate only, renewed or not.
        several = len(lease.grants) > 1
        bound = lease.cert_fingerprints
        claims = tokens.TokenClaims(
            lease.lease_id, g.host_id, g.device, g.quota_bytes, g.share, lease.expires_at, lease.tenant,
            network=several, group=tokens.lease_group(self.key, lease.lease_id) if several else "",
            cert=bound[0] if bound else "",
        )  # fmt: skip
        return tokens.mint(self.key, claims)

    # ---- housekeeping ----

    def sweep(self, now: float | None = None) -> None:
        """Expire unrenewed leases, mark silent hosts down (their leases lost), forget long-ended leases."""
        now = time.time() if now is None else now
        with self.lock:
            if self._last_alive is not None:
                self.alive()
            self.hosts.mark_silent_down(now, self.config.host_timeout)
            self.hosts.forget_revocations(now)
            active = (x for x in self.leases.values() if x.state == LeaseState.ACTIVE)
            expired = [x for x in active if max(x.expires_at, x.grace_until) <= now]
            horizon = now - self.config.retention
            # An ended lease is kept (in memory and in the store) `retention` after its end and, beyond that, until
            # its last token has expired and the slack (`REVOCATION_SLACK`): a restarted scheduler tells its hosts
            # again from the store which ended leases' tokens to refuse (`_load`), and the tenant's
            # `--tenant-max-revoked` count is rebuilt from it. Until round 44 a lease was forgotten 600 s after its
            # end: a lease of an hour released, then a scheduler restart and a daemon restart, and its unexpired token
            # attached at the restarted daemon again (nobody told it). How many are kept is `--tenant-max-revoked`'s.
            old = [
                k
                for k, x in self.leases.items()
                if x.state != LeaseState.ACTIVE and x.ended_at < horizon and x.expires_at + REVOCATION_SLACK <= now
            ]
            try:  # a step the store refuses is simply retried at the next sweep
                if expired:
                    self.end(expired, LeaseState.EXPIRED)
                    log.info("expired %d lease(s): %s", len(expired), ", ".join(x.lease_id for x in expired[:5]))
                if old:
                    self.write(Change(forget=old))
                    for k in old:
                        del self.leases[k]
            except Unavailable:
                pass
            self.serve_waiters()  # in case a grant for the head failed to be saved before

    def alive(self) -> None:
        """Called every sweep interval by the server (and on each renewal once it is): a long gap since the last
        call means the scheduler itself did not run (paused), so forgive what that silence looks like."""
        mono, now = time.monotonic(), time.time()
        with self.lock:
            last = self._last_alive
            self._last_alive = (mono, now)
            if last is None:
                return
            gap = max(mono - last[0], now - last[1])
            threshold = self.config.pause_threshold or min(3.0, self.config.host_timeout / 2)
            if gap >= threshold:
                self._forgive(now, gap)

    def _forgive(self, now: float, gap: float) -> None:
        log.warning(
            "the scheduler itself was not running for %.1f s (paused?): hosts get a fresh %g s to heartbeat, "
            "leases %g s to be renewed",
            gap,
            self.config.host_timeout,
            self.config.outage_grace,
        )
        for host in self.pool.hosts.values():
            host.last_seen = max(host.last_seen, now)
        for lease in self.leases.values():
            if lease.state == LeaseState.ACTIVE:
                lease.grace_until = max(lease.grace_until, now + self.config.outage_grace)

    def active_leases(self) -> list[LeaseRecord]:
        with self.lock:
            return [x for x in self.leases.values() if x.state == LeaseState.ACTIVE]

    def active_on(self, host_id: str) -> list[LeaseRecord]:
        """The active leases with a grant on `host_id`."""
        return [x for x in self.leases.values() if x.state == LeaseState.ACTIVE and host_id in x.hosts]

    def is_active_on(self, lease_id: str, host_id: str) -> bool:
        lease = self.leases.get(lease_id)
        return lease is not None and lease.state == LeaseState.ACTIVE and host_id in lease.hosts

    def tokens_until(self, lease_id: str, host_id: str) -> float | None:
        lease = self.leases.get(lease_id)
        if lease is None or lease.state == LeaseState.ACTIVE or host_id not in lease.hosts:
            return None
        return lease.expires_at + REVOCATION_SLACK

    # ---- revoked client certificates ----

    def revoke_certs(self, revoke: Iterable[str], unrevoke: Iterable[str], note: str = "") -> list[CertRow]:
        """Revoke client certificates (fingerprints, `certrevoke.normalize`d) and take revocations back, in one store
        transaction; the whole list after it. The authenticator refuses the revoked at once; daemons hear the list at
        their next heartbeat. Revoking also revokes the status tokens minted so far (`certs_revoked_at`): one of a
        revoked admin's would show its host's sessions for two minutes more. And (round 46) it ends the active leases
        allocated with a revoked certificate (or its ECDSA twin), in the same transaction: their tokens are revoked at
        their daemons' next heartbeat, whatever certificate (or none, under `--tls-client-auth none`) presents them;
        until round 46 they attached with another tenant's certificate until the leases ended."""
        add = sorted({certrevoke.normalize(x) for x in revoke})
        drop = sorted({certrevoke.normalize(x) for x in unrevoke} - set(add))
        if len(note) > 256 or not note.isprintable():
            raise InvalidArgument("a revocation's note is at most 256 printable characters")
        with self.lock:
            now = time.time()
            rows = [(fp, now, note) for fp in add if fp not in self.cert_rows]
            gone = [fp for fp in drop if fp in self.cert_rows]
            if len(self.cert_rows) + len(rows) - len(gone) > certrevoke.MAX_REVOKED:
                raise ResourceExhausted(
                    f"{len(self.cert_rows)} certificates are revoked: at most {certrevoke.MAX_REVOKED} (take back "
                    "those that have expired: `gpupool cert unrevoke`)"
                )
            hit = set(add)
            bound = [x for x in self.active_leases() if hit.intersection(x.cert_fingerprints)]
            if bound:  # (their room is served to the line below, once the revocation is in: `serve_waiters`)
                self.end(bound, LeaseState.RELEASED, Change(certs=rows, forget_certs=gone), serve=False)
                log.warning(
                    "%d lease(s) allocated with the revoked certificate(s) ended: %s",
                    len(bound),
                    ", ".join(x.lease_id for x in bound[:5]),
                )
            elif rows or gone:
                self.write(Change(certs=rows, forget_certs=gone))
            for row in rows:
                self.cert_rows[row[0]] = row
            for fp in gone:
                del self.cert_rows[fp]
            self.certs.replace(self.cert_rows)
            if bound or rows:  # (secrev46) until then the ended leases' room went to their certificate's waiters
                self.serve_waiters()  # and the revoked certificate's waiters are refused now, not at a later sweep
            if rows:
                self.certs_revoked_at = now
                log.warning("client certificate(s) revoked: %s", ", ".join(fp[:23] for fp, _, _ in rows[:5]))
            if gone:
                log.warning("client certificate revocation(s) taken back: %s", ", ".join(fp[:23] for fp in gone[:5]))
            return sorted(self.cert_rows.values())

    def revocation_times(self, now: float) -> None:
        """A clock that jumped back (round 45): the times status tokens were revoked at (the start, a certificate's
        revocation) are moved back to `now` where they lie ahead of it. Until round 45 a scheduler started during a
        forward jump of its clock sent every daemon a `status_tokens_not_before` in the future, which refused every
        status token until the clock caught up."""
        self.started_at = min(self.started_at, now)
        self.certs_revoked_at = min(self.certs_revoked_at, now)
