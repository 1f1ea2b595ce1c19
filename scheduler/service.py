"""The Scheduler gRPC servicer: protobuf in, one call into the core (leases.py / hosts.py), protobuf out.

Methods raise gpupool errors; the server's `errors.ErrorInterceptor` (cli.py) turns them into statuses.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

import grpc

from gpupool import certrevoke, tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc
from gpupool.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from gpupool.protocol import MAX_HOST_SESSIONS, HostState, LeaseState, Policy

from . import auth
from .capacity import SHARE_UNITS, Host
from .hosts import MAX_DEVICES_PER_HOST, MAX_ID_LENGTH, DeviceSpec, validate_labels
from .leases import Core
from .placement import Request, policy_of
from .store import LeaseRecord

log = logging.getLogger(__name__)
# ListPool pages: at most this many hosts + leases, and about this many bytes (gRPC refuses messages over 4 MiB).
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 5000
PAGE_BYTES = 1 << 20


def _status_token_bytes(host_id: str) -> int:
    """Room a host's status token takes in a ListPool page (minted once the page is cut): its key id, claims (the
    host id as JSON, base64url) and signature, and the field's tag and length, rounded up."""
    return 224 + 4 * len(host_id.encode())  # (JSON escapes a non-ASCII character: up to 4 characters a byte)


def _cursor(lease_id: str) -> str:
    return hashlib.sha256(lease_id.encode()).hexdigest()[:32]


def _bound_cert(caller: auth.Identity, named: str, context: grpc.ServicerContext) -> str:
    """The client certificate a new lease's tokens are bound to (round 46, `LeaseRecord.cert`): its fingerprint and
    its ECDSA twins', space-separated, where the caller is named by its certificate and allocates for itself; ""
    where it is named by an API token (nothing a daemon can check) or is an operator allocating for a tenant it names
    (`named`: `AllocateRequest.tenant`; that tenant's own certificate will present the tokens). Named, whatever the
    name: until round 47 an operator whose name was the tenant's (`gpupool://admin/alice` allocating for tenant
    `alice`) had the lease bound to the operator's certificate, which alice's certificate could not attach."""
    if not caller.by_cert or (caller.admin and named):
        return ""
    pem = certrevoke.peer_pem(context)
    if pem is None:
        return ""
    try:
        return " ".join(certrevoke.fingerprints_der(certrevoke.der_of_pem(pem)))
    except InvalidArgument:
        return ""


def _check_lease_id(lease_id: str) -> None:
    """A lease id no longer than any the scheduler gives (32 hex digits; `MAX_ID_LENGTH` for room)."""
    if len(lease_id) > MAX_ID_LENGTH:
        raise InvalidArgument(f"a lease id of {len(lease_id)} characters: at most {MAX_ID_LENGTH}")


def _check_heartbeat(request: scheduler_pb2.HeartbeatRequest) -> tuple[list[str], set[str]]:
    """A heartbeat's repeated fields within what a daemon can send, before the core's lock (each session's lease is
    looked up under it): at most `MAX_HOST_SESSIONS` sessions (`gpupool serve --max-sessions`' bound) and
    `MAX_DEVICES_PER_HOST` devices. Returns the sessions' lease ids to look up and those longer than `MAX_ID_LENGTH`,
    which are no lease of this scheduler's (32 hex digits): revoked without a look-up. Until schedrev41 such an id
    refused the whole heartbeat (INVALID_ARGUMENT): one session of a hand-minted token (`gpupool token --lease-id`, a
    token is up to 4,096 characters) made every heartbeat of its daemon fail, and the host went down with every
    lease on it, where before round 41 that session's lease was revoked."""
    if len(request.sessions) > MAX_HOST_SESSIONS:
        raise InvalidArgument(
            f"a heartbeat naming {len(request.sessions)} sessions: at most {MAX_HOST_SESSIONS} (a daemon's "
            "--max-sessions bound)"
        )
    if len(request.devices) > MAX_DEVICES_PER_HOST:
        raise InvalidArgument(f"a heartbeat of {len(request.devices)} devices: at most {MAX_DEVICES_PER_HOST}")
    leases = [s.lease_id for s in request.sessions]
    return [x for x in leases if len(x) <= MAX_ID_LENGTH], {x for x in leases if len(x) > MAX_ID_LENGTH}


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        core: Core | None,
        default_policy: Policy = Policy.BINPACK,
        host_writes: auth.HostWriteRate | None = None,
    ) -> None:
        self._core = core  # None while a standby (or after stepping down): every call answers UNAVAILABLE
        self.default_policy = default_policy
        self.host_writes = host_writes if host_writes is not None else auth.HostWriteRate(0.0)
        # The scheduler's credentials file, for when an admin's API token was last removed (`status_tokens_not_before`)
        self.credentials: auth.Credentials | None = None
        self.authn: auth.Authenticator | None = None  # (ListPool checks its caller again once it minted status tokens)

    @property
    def core(self) -> Core:
        core = self._core
        if core is None:
            raise Unavailable("this scheduler is a standby (another replica leads): try the next address")
        return core

    @core.setter
    def core(self, core: Core | None) -> None:
        self._core = core

    def _host_write(self, host_id: str, what: str) -> None:
        """Take one of the host's store writes (`auth.HostWriteRate`); ResourceExhausted past its bucket."""
        if auth.current().role == auth.HOST and not self.host_writes.take(host_id):
            raise ResourceExhausted(
                f"host {host_id!r} is over its {self.host_writes.rate:g} registrations and state changes a second "
                f"(--host-write-rate): {what} refused, nothing changed; retry in a few seconds"
            )

    def Register(self, request: scheduler_pb2.RegisterRequest, context: grpc.ServicerContext) -> Any:
        auth.current().check_host(request.host_id)
        self._host_write(request.host_id, "Register")
        devices = [DeviceSpec(d.index, d.uuid, d.model, d.memory_bytes, d.fake) for d in request.devices]
        self.core.hosts.register(request.host_id, request.address, devices, dict(request.labels))
        return scheduler_pb2.RegisterReply(
            heartbeat_interval_seconds=self.core.config.heartbeat_interval, scheduler_id=self.core.scheduler_id
        )

    def Heartbeat(self, request: scheduler_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> Any:
        # (a host's heartbeats past --host-heartbeat-rate are refused before their bytes are parsed: auth.py `_wrap`)
        auth.current().check_host(request.host_id)
        leases, foreign = _check_heartbeat(request)
        if self.core.hosts.changes_state(request.host_id, request.draining):
            self._host_write(request.host_id, "a heartbeat that changes the host's state")
        used = {d.info.index: d.used_bytes for d in request.devices}
        on: dict[int, set[str]] = {}  # each device's sessions' leases ("": an id longer than any lease's)
        by: dict[int, dict[str, int]] = {}  # (terms54) each device's leases' bytes in use
        for x in request.sessions:
            lease_id = x.lease_id if len(x.lease_id) <= MAX_ID_LENGTH else ""
            on.setdefault(x.device, set()).add(lease_id)
            mine = by.setdefault(x.device, {})
            mine[lease_id] = mine.get(lease_id, 0) + x.used_bytes
        measured = {d.info.index: (d.free_bytes if d.HasField("free_bytes") else None, by.get(d.info.index, {}))
                    for d in request.devices}  # fmt: skip
        until: dict[str, float] = {}
        revoked, again = self.core.hosts.heartbeat(
            request.host_id, leases, used, request.draining, until, address=request.address,
            leases_on={i: frozenset(x) for i, x in on.items()}, measured=measured,
        )  # fmt: skip
        if foreign and not again:
            revoked = sorted(foreign.union(revoked))
        if not again:  # (terms53) the bytes kept past a lowered quota, counted until the daemon reports them freed
            self.core.note_kept(request.host_id, ((x.lease_id, x.device, x.used_bytes) for x in request.sessions))
        longest = time.time() + tokens.MAX_TTL
        reply = scheduler_pb2.HeartbeatReply(
            revoked_leases=revoked,
            revoked_until=[until.get(x, longest) for x in revoked],
            reregister=again,
            scheduler_id=self.core.scheduler_id,
            status_tokens_not_before=self.status_tokens_not_before(),
        )
        if not again:  # (a daemon asked to register again is not the host's: it hears nothing)
            certs = self.core.certs
            reply.revoked_certificates_version = certs.version
            if request.revoked_certificates_version != certs.version:  # the whole list, only when it changed
                reply.revoked_certificates.extend(certs.fingerprints())
        return reply

    def status_tokens_not_before(self) -> float:
        """Status tokens minted before this are revoked (daemons refuse them): those of an earlier scheduler process
        (or leader), those minted before an admin's API token was last removed, and (round 45) before a client
        certificate was last revoked. Until round 44 a removed admin's status tokens showed every session of their
        hosts for their whole life (`tokens.STATUS_TTL`, 120 s). Never ahead of the clock (round 45): a time noted
        before the clock jumped back is moved back to now (`Core.revocation_times`), else every daemon refused every
        status token until the clock caught up with it."""
        now = time.time()
        self.core.revocation_times(now)
        if self.credentials is not None and self.credentials.admin_removed_at > now:
            self.credentials.admin_removed_at = now
        removed = self.credentials.admin_removed_at if self.credentials is not None else 0.0
        return max(self.core.started_at, self.core.certs_revoked_at, removed)

    def RevokeCertificates(
        self, request: scheduler_pb2.RevokeCertificatesRequest, context: grpc.ServicerContext
    ) -> Any:
        """Operators (auth.py: not in METHOD_ROLES): revoke client certificates by fingerprint, or take back."""
        if len(request.revoke) + len(request.unrevoke) > certrevoke.MAX_REVOKED:
            raise InvalidArgument(f"at most {certrevoke.MAX_REVOKED} fingerprints a call")
        rows = self.core.revoke_certs(request.revoke, request.unrevoke, request.note)
        return scheduler_pb2.RevokeCertificatesReply(
            revoked=[scheduler_pb2.RevokedCertificate(fingerprint=f, revoked_at=t, note=n) for f, t, n in rows]
        )

    def Allocate(self, request: scheduler_pb2.AllocateRequest, context: grpc.ServicerContext) -> Any:
        which = request.WhichOneof("size")
        if which is None:
            raise InvalidArgument("give a fraction or a memory size")
        if not (math.isfinite(request.wait_seconds) and math.isfinite(request.ttl_seconds)):
            raise InvalidArgument("wait and ttl must be finite")
        req = Request(
            gpus=request.gpus,
            fraction=request.fraction if which == "fraction" else None,
            memory_bytes=request.memory_bytes if which == "memory_bytes" else None,
            labels=validate_labels(request.labels),
            policy=policy_of(request.policy) if request.policy else self.default_policy,
        )
        caller = auth.current()
        tenant = caller.tenant_for(request.tenant)
        cert = _bound_cert(caller, request.tenant, context)
        lease = self.core.allocate(
            req,
            tenant=tenant,
            ttl=request.ttl_seconds,
            wait=request.wait_seconds,
            cancelled=lambda: not context.is_active(),
            cert=cert,
        )
        if cert and self.core.certs.holds(cert.split()):
            # revoked while it waited (granted after the revocation, which ends only the leases it finds): ended here
            self.core.release(lease.lease_id)
            raise Unauthenticated("the client certificate this lease was asked with was revoked meanwhile")
        return self._lease_pb(lease, with_tokens=True)

    def Renew(self, request: scheduler_pb2.RenewRequest, context: grpc.ServicerContext) -> Any:
        _check_lease_id(request.lease_id)
        self._check_owner(request.lease_id)
        core = self.core
        # The renewal and its tokens are one decision under the core's lock: until round 40 the lock was let go
        # between them, and a Release (an expiry, a host lost) waiting on it came in between: Renew minted fresh
        # tokens of a lease already ended (in 18 of 300 rounds of a Renew racing a Release, a SQLite state file).
        with core.lock:
            return self._lease_pb(core.renew(request.lease_id), with_tokens=True)

    def Release(self, request: scheduler_pb2.ReleaseRequest, context: grpc.ServicerContext) -> Any:
        _check_lease_id(request.lease_id)
        self._check_owner(request.lease_id)
        self.core.release(request.lease_id)
        return scheduler_pb2.ReleaseReply()

    def SetLeaseTerms(self, request: scheduler_pb2.SetLeaseTermsRequest, context: grpc.ServicerContext) -> Any:
        """Operators (auth.py: not in METHOD_ROLES, so a tenant's or a host's credential is PERMISSION_DENIED, its own
        lease or not): an active lease's new quota and share (`Core.set_terms`); its next Renew carries them."""
        _check_lease_id(request.lease_id)
        which = request.WhichOneof("size")
        if not (math.isfinite(request.fraction) and math.isfinite(request.share)) or request.share < 0:
            raise InvalidArgument("fraction and share must be finite, and the share not negative")
        lease = self.core.set_terms(
            request.lease_id,
            fraction=request.fraction if which == "fraction" else None,
            memory_bytes=request.memory_bytes if which == "memory_bytes" else None,
            share=request.share or None,
        )
        return self._lease_pb(lease, with_tokens=False)

    def _check_owner(self, lease_id: str) -> None:
        """Renew/Release only by the lease's tenant (or an operator); unknown ids fall through to NOT_FOUND."""
        with self.core.lock:
            lease = self.core.leases.get(lease_id)
        if lease is not None:
            auth.current().check_lease(lease_id, lease.tenant)

    def ListPool(self, request: scheduler_pb2.ListPoolRequest, context: grpc.ServicerContext) -> Any:
        reply = self._pool_page(request, auth.current())
        if auth.current().admin:
            # An operator gets a status token for each host that is not down (`gpupool smi` shows it to the host's
            # daemon, which then shows every session where it sees no client certificate): signed outside the core's
            # lock, ~0.1 ms each.
            for h in reply.hosts:
                if h.state != HostState.DOWN:
                    h.status_token = tokens.mint_status(self.core.key, h.host_id)
            if self.authn is not None and any(h.status_token for h in reply.hosts):
                # The credential checked again once the tokens are minted (round 45): an admin removed (its API token,
                # its certificate revoked) while this call ran is either seen here (the reply refused) or noted after
                # the tokens were minted (`status_tokens_not_before` then refuses them). Until round 45 a ListPool in
                # flight at the removal returned tokens minted after it, served for their 120 s.
                if self.authn.identify(context.invocation_metadata(), context) != auth.current():
                    raise Unauthenticated("the credential changed while the call ran: retry")
        return reply

    def _pool_page(self, request: scheduler_pb2.ListPoolRequest, caller: auth.Identity) -> scheduler_pb2.PoolState:
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        kind, _, after = request.page_token.partition(":")
        if request.page_token and kind not in ("h", "l"):
            raise InvalidArgument(f"page_token {request.page_token[:40]!r} is not one this scheduler gave")
        reply = scheduler_pb2.PoolState()
        used = count = 0
        last = ""
        with self.core.lock:
            reply.waiting = len(self.core.waiters)
            if kind in ("", "h"):
                hosts = sorted((h for h in self.core.pool.hosts.values() if h.host_id > after), key=lambda h: h.host_id)
                holders: dict[tuple[str, int], set[str]] = {}
                mine: dict[tuple[str, int], set[str]] = {}  # the caller's own leases on each device
                for lease in self.core.active_leases() if not caller.admin else ():  # an operator sees all
                    for g in lease.grants:
                        holders.setdefault((g.host_id, g.device), set()).add(lease.tenant)
                        if caller.may_see(lease.tenant):
                            mine.setdefault((g.host_id, g.device), set()).add(lease.lease_id)
                for host in hosts:
                    pb = self._host_pb(host)
                    for d in pb.devices:
                        # A device's memory used (the daemon's total, from its heartbeats) only where it is the
                        # caller's alone: where another tenant holds a lease on it, the total less the caller's own
                        # (its daemon's Status) is that tenant's usage (round 42: shown to every caller); nor where
                        # the daemon last reported a session of a lease not the caller's (free51: a lease just
                        # released, whose session its daemon has not closed yet, or no lease of this scheduler's:
                        # its tenant held no lease, and its usage was shown to whoever held the device or none).
                        where = (host.host_id, d.info.index)
                        dev = host.devices.get(d.info.index)
                        if not caller.admin and (
                            not all(caller.may_see(t) for t in holders.get(where, ()))
                            or (dev is not None and not dev.session_leases <= mine.get(where, set()))
                        ):
                            d.used_bytes = 0
                        free = host.measured_free(dev) if caller.admin and dev is not None else None
                        if free is not None:  # (smi54) to an operator only: capacity less every tenant's use
                            d.measured_free_bytes = free
                    n = pb.ByteSize() + (_status_token_bytes(host.host_id) if caller.admin else 0)
                    if count and (count >= size or used + n > PAGE_BYTES):
                        reply.next_page_token = f"h:{reply.hosts[-1].host_id}"
                        return reply
                    reply.hosts.append(pb)
                    used, count = used + n, count + 1
                after = ""
            # Leases page in the order of a digest of their ids: the page token names no other tenant's lease id.
            keyed = sorted((_cursor(x.lease_id), x) for x in self.core.active_leases())
            for key, lease in (kx for kx in keyed if kx[0] > after):
                info = scheduler_pb2.LeaseInfo(  # other tenants' leases: usage only, no id
                    lease_id=lease.lease_id if caller.may_see(lease.tenant) else "",
                    tenant=lease.tenant,
                    state=lease.state,
                    devices=self._devices_pb(lease, with_tokens=False),
                    expires_at=lease.expires_at,
                )
                n = info.ByteSize()
                if count and (count >= size or used + n > PAGE_BYTES):
                    reply.next_page_token = f"l:{last}"
                    return reply
                reply.leases.append(info)
                last = key
                used, count = used + n, count + 1
        return reply

    def DrainHost(self, request: scheduler_pb2.DrainHostRequest, context: grpc.ServicerContext) -> Any:
        self.core.hosts.drain_host(request.host_id, undo=request.undo)
        return scheduler_pb2.DrainHostReply()

    def RemoveHost(self, request: scheduler_pb2.RemoveHostRequest, context: grpc.ServicerContext) -> Any:
        return scheduler_pb2.RemoveHostReply(leases_lost=self.core.hosts.remove_host(request.host_id, request.force))

    @staticmethod
    def _host_pb(h: Host) -> scheduler_pb2.HostState:
        return scheduler_pb2.HostState(
            host_id=h.host_id,
            address=h.address,
            state=h.state,
            last_seen=h.last_seen,
            labels=h.labels,
            devices=[
                scheduler_pb2.DeviceState(
                    info=device_pb2.DeviceInfo(
                        index=d.index, uuid=d.uuid, model=d.model, memory_bytes=d.capacity_bytes, fake=d.fake
                    ),
                    allocated_bytes=d.allocated_bytes,
                    allocated_share=d.allocated_units / SHARE_UNITS,
                    used_bytes=d.used_bytes,
                )
                for d in sorted(h.devices.values(), key=lambda d: d.index)
            ],
        )

    def _devices_pb(self, lease: LeaseRecord, with_tokens: bool) -> list[scheduler_pb2.LeasedDevice]:
        out = []
        for i, g in enumerate(lease.grants):
            host = self.core.pool.hosts.get(g.host_id)
            dev = host.devices.get(g.device) if host else None
            out.append(
                scheduler_pb2.LeasedDevice(
                    host_id=g.host_id,
                    address=host.address if host else "",
                    device=g.device,
                    uuid=dev.uuid if dev else "",
                    quota_bytes=g.quota_bytes,
                    share=g.share,
                    token=self.core.token(lease, i) if with_tokens else "",
                )
            )
        return out

    def _lease_pb(self, lease: LeaseRecord, with_tokens: bool) -> scheduler_pb2.Lease:
        """The lease as a reply; `with_tokens`: its devices' tokens, minted only while it is active (an Allocate
        whose lease its tenant released (ListPool names it), or whose host was lost, before the reply is refused)."""
        with self.core.lock:
            if with_tokens and lease.state != LeaseState.ACTIVE:
                raise FailedPrecondition(
                    f"lease {lease.lease_id} is {lease.state} (it ended before this reply): allocate a new one"
                )
            return scheduler_pb2.Lease(
                lease_id=lease.lease_id,
                devices=self._devices_pb(lease, with_tokens),
                expires_at=lease.expires_at,
                ttl_seconds=lease.ttl,
                tenant=lease.tenant,
            )
