"""Who is calling the scheduler, and what they may do.

A caller's `Identity` (role, name) comes from, in order:
1. an API token (`authorization: Bearer <token>` metadata) listed in the credentials file (`--credentials`):
   lines ``<role> <name> sha256:<hex of sha256(token)>``; re-read when the file changes. Host join tokens are
   such lines with role ``host`` (deployments without client certificates);
2. the verified client certificate (mutual TLS): its ``gpupool://<role>/<name>`` URI SAN (see gpupool/pki.py);
3. nothing: refused, except on a plaintext `--insecure` scheduler without a credentials file, where everyone is
   an operator (with a warning at start).

Roles: ``host`` (a daemon: Register/Heartbeat for its own host id only), ``tenant`` (Allocate; Renew/Release and
the lease ids of its own leases only), ``admin`` (everything; may allocate for a named tenant and register any
host). The interceptor puts the identity where the servicer finds it (`current()`) and refuses calls whose
method the role may not use; the servicer checks ownership.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from gpupool.certrevoke import RevokedCerts, peer_pem
from gpupool.config import UnsafeFile, read_trusted
from gpupool.errors import (
    InvalidArgument,
    Malformed,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    abort,
    bounded,
    parsed,
    shown,
)
from gpupool.peers import grpc_source

log = logging.getLogger(__name__)

HOST, TENANT, ADMIN = "host", "tenant", "admin"
ROLES = (HOST, TENANT, ADMIN)
URI_PREFIX = "gpupool://"
# Which roles may call which method. A Scheduler method not listed here is for operators only (deny by default);
# other services (health) need no identity.
METHOD_ROLES = {
    "/gpupool.v1.Scheduler/Register": (HOST, ADMIN),
    "/gpupool.v1.Scheduler/Heartbeat": (HOST, ADMIN),
    "/gpupool.v1.Scheduler/Allocate": (TENANT, ADMIN),
    "/gpupool.v1.Scheduler/Renew": (TENANT, ADMIN),
    "/gpupool.v1.Scheduler/Release": (TENANT, ADMIN),
    "/gpupool.v1.Scheduler/ListPool": (TENANT, ADMIN, HOST),
    "/gpupool.v1.Scheduler/DrainHost": (ADMIN,),
    "/gpupool.v1.Scheduler/RemoveHost": (ADMIN,),
}
SCHEDULER_PREFIX = "/gpupool.v1.Scheduler/"
HEARTBEAT = "/gpupool.v1.Scheduler/Heartbeat"
HOST_METHODS = ("/gpupool.v1.Scheduler/Register", HEARTBEAT)  # act as request.host_id
MAX_NAME = 128


@dataclass(frozen=True)
class Identity:
    role: str
    name: str
    # Named by the call's verified client certificate (not an API token): a lease it allocates for itself is bound
    # to that certificate (round 46, `LeaseRecord.cert`). Not part of who it is (equality, hashing).
    by_cert: bool = field(default=False, compare=False)

    @property
    def admin(self) -> bool:
        return self.role == ADMIN

    def tenant_for(self, asked: str) -> str:
        """The tenant a new lease belongs to: the credential's name; an operator may name another tenant."""
        if self.admin and asked:
            if len(asked) > MAX_NAME:  # never cut into another tenant's name
                raise InvalidArgument(f"tenant name of {len(asked)} characters: at most {MAX_NAME}")
            return asked
        return self.name

    def check_host(self, host_id: str) -> None:
        """Only the host itself (or an operator) registers or heartbeats as `host_id`."""
        if not (self.admin or (self.role == HOST and self.name == host_id)):
            raise PermissionDenied(f"{self.role} {self.name!r} may not act as host {shown(host_id)}")

    def may_see(self, tenant: str) -> bool:
        return self.admin or (self.role == TENANT and self.name == tenant)

    def check_lease(self, lease_id: str, tenant: str) -> None:
        """Renew, Release and a lease's details belong to its tenant (and operators)."""
        if not self.may_see(tenant):
            raise PermissionDenied(f"lease {lease_id} belongs to another tenant")


OPERATOR = Identity(ADMIN, "insecure-operator")
_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("gpupool_identity", default=None)


def current() -> Identity:
    """The authenticated caller of the RPC being served (set by `AuthInterceptor`)."""
    ident = _current.get()
    if ident is None:
        raise Unauthenticated("no authenticated caller")
    return ident


# A file modified this close to when it was read may change again within one tick of the file system's clock
# (git's "racy clean"): until its mtime is older than that, every lookup reads it again.
_RACY_NS = 2_000_000_000


class Credentials:
    """The credentials file: sha256(token) -> Identity, re-read when it changes.

    A change is seen by inode, mtime, ctime and size; a file modified within two seconds of its last read is
    read again on every lookup (its content compared), so removing a token takes effect at the next call even
    when the edit kept the size and landed in the same timestamp tick (or restored the mtime)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._stamp: tuple[int, int, int, int] | None = None
        self._settled = False  # the stamp was taken long enough after the last write to stand for the content
        self._text: str | None = None
        self._table: dict[str, Identity] = {}
        self._checked = 0.0  # time.monotonic() of the last look at the file
        self._refused: tuple[int, int, int, int] | None = None  # the stamp of a version refused (said once)
        # When (time.time()) an admin's API token was last seen gone from the file (removed, or its line another
        # role's now): the status tokens minted before are revoked at every daemon (`HeartbeatReply`
        # `status_tokens_not_before`), the removed admin's among them.
        self.admin_removed_at = 0.0
        self._lock = threading.Lock()
        if self.path is not None:
            self._reload(strict=True)

    def _reload(self, strict: bool = False) -> None:
        assert self.path is not None
        self._checked = time.monotonic()
        try:
            now = time.time_ns()
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
            if (stamp == self._stamp and self._settled) or stamp == self._refused:
                return
            text = read_trusted(self.path, "credentials file").decode(errors="strict" if strict else "replace")
            table = self._table if text == self._text else parse_credentials(text, strict=strict)
        except FileNotFoundError as exc:
            if strict:
                raise InvalidArgument(f"credentials file {self.path}: {exc}") from exc
            # Removed: no API token is valid any more (certificates still are). Until round 35 the table read before
            # was kept, and every token in it stayed valid for as long as the scheduler ran.
            with self._lock:
                if self._text is not None:
                    log.warning("credentials file %s removed: every API token is refused until it is back", self.path)
                self._note_admins_removed({})
                self._table, self._stamp, self._text, self._refused = {}, None, None, None
            return
        except (OSError, InvalidArgument, UnicodeDecodeError) as exc:
            if strict:
                raise InvalidArgument(f"credentials file {self.path}: {exc}") from exc
            if isinstance(exc, UnsafeFile):  # refused until it changes again: not read (nor said) at every call
                self._refused = stamp
            log.warning("credentials file %s unreadable (keeping the previous one): %s", self.path, exc)
            return
        with self._lock:
            self._note_admins_removed(table)
            self._table, self._stamp, self._text, self._refused = table, stamp, text, None
            self._settled = max(st.st_mtime_ns, st.st_ctime_ns) < now - _RACY_NS

    def _note_admins_removed(self, table: dict[str, Identity]) -> None:
        """Note (the lock held) whether `table`, replacing the current one, drops an admin's token."""
        gone = sorted(i.name for d, i in self._table.items() if i.role == ADMIN and table.get(d) != i)
        if gone:
            self.admin_removed_at = time.time()
            log.warning(
                "credentials file %s: admin token(s) of %s removed: the status tokens minted so far are revoked at "
                "every daemon at its next heartbeat",
                self.path,
                ", ".join(repr(x[:40]) for x in gone[:5]),
            )

    def refresh(self) -> None:
        """Look at the file now (the scheduler's sweep: a removed admin token is seen without waiting for a call)."""
        if self.path is not None:
            self._reload()

    def lookup(self, token: str, *, stale: float = 0.0) -> Identity | None:
        """The token's identity. The file is looked at first (a stat), or, with `stale` > 0, only when it was last
        looked at more than `stale` seconds ago (the path of an address over `--auth-fail-rate`: a flood of bad
        tokens costs a hash and a dictionary lookup each, and a removed token stops working within `stale`)."""
        if self.path is None:
            return None
        if stale <= 0 or time.monotonic() - self._checked > stale:
            self._reload()
        # A dictionary of SHA-256 digests: its lookup's timing depends on the digest, which no caller can steer
        # toward a stored one (a comparison of every stored digest per call made each bad token cost O(tokens)).
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            return self._table.get(digest)


def parse_credentials(text: str, *, strict: bool = True) -> dict[str, Identity]:
    """The identities of a credentials file's lines. `strict` (at start): InvalidArgument for the first line that is
    not one. Otherwise (a file changed while the scheduler runs) such lines are left out, with one warning naming
    them: until round 35 one bad line kept the whole table read before, so a token the operator had removed in
    the same edit (or any edit after it) stayed valid for as long as the scheduler ran."""
    table = {}
    bad: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ROLES or not parts[2].startswith("sha256:") or len(parts[2]) != 71:
            problem = f"line {n}: expected '<host|tenant|admin> <name> sha256:<64 hex>'"
        elif len(parts[1]) > MAX_NAME:  # cut short, it would be another identity's name
            problem = f"line {n}: a name of {len(parts[1])} characters, at most {MAX_NAME}"
        else:
            table[parts[2][7:].lower()] = Identity(parts[0], parts[1])
            continue
        if strict:
            raise InvalidArgument(problem)
        bad.append(problem)
    if bad:
        log.warning(
            "credentials file: %d line(s) left out (their tokens are refused): %s", len(bad), "; ".join(bad[:5])
        )
    return table


def credential_line(role: str, name: str, token: str) -> str:
    return f"{role} {name} sha256:{hashlib.sha256(token.encode()).hexdigest()}\n"


def identity_from_uri(uri: str) -> Identity | None:
    """The identity a certificate's URI names, None for another URI; Unauthenticated for a name over MAX_NAME
    (round 30 cut it to MAX_NAME characters: `gpupool://tenant/<128 t>b` was the tenant `<128 t>`)."""
    if not uri.startswith(URI_PREFIX):
        return None
    role, _, name = uri[len(URI_PREFIX) :].partition("/")
    if role not in ROLES or not name:
        return None
    if len(name) > MAX_NAME:
        raise Unauthenticated(f"client certificate names a {role} {len(name)} characters long, longer than {MAX_NAME}")
    return Identity(role, name)


class Authenticator:
    """Maps a call (metadata, TLS peer) to an Identity."""

    def __init__(
        self,
        credentials: str | None,
        *,
        verified_certs: bool,
        open_access: bool,
        failures: AuthFailRate | None = None,
        revoked: RevokedCerts | None = None,
    ) -> None:
        self.credentials = Credentials(credentials)
        # Revoked client certificates (round 45: `gpupool cert revoke`), refused on every call whatever it carries
        self.revoked = revoked if revoked is not None else RevokedCerts()
        self.failures = failures if failures is not None else AuthFailRate(0.0)
        self.verified_certs = verified_certs  # the TLS layer required and verified client certificates
        self.open_access = open_access and credentials is None
        if self.open_access:
            log.warning("no authentication (--insecure without --credentials): every caller is an operator")

    def identify(self, metadata: Any, context: grpc.ServicerContext) -> Identity:
        if self.verified_certs and len(self.revoked):
            gone = self.revoked.refused_pem(peer_pem(context))
            if gone:  # (an API token beside it changes nothing: the connection is the revoked certificate's)
                raise self.refused(context, Unauthenticated(f"client certificate {gone} is revoked (gpupool cert)"))
        given = [str(v) for k, v in metadata or () if k == "authorization"]
        auth = given[0] if given else ""
        if auth:
            source = grpc_source(context.peer())
            limited = not self.failures.allows(source)
            if len(given) > 1:  # which one is meant? Until round 33 the first won, whatever the others said
                raise self.refused(context, Unauthenticated("more than one authorization header"), limited=limited)
            scheme, _, token = auth.partition(" ")
            bearer = scheme.lower() == "bearer"
            # Over the limit, good tokens still pass (tenants behind one NAT address, or on one login node, share
            # its bucket with whoever floods it), checked against the table as last read (at most 1 s old).
            ident = self.credentials.lookup(token.strip(), stale=1.0 if limited else 0.0) if bearer else None
            if ident is None:
                raise self.refused(context, Unauthenticated("unknown API token"), limited=limited)
            return ident
        if self.verified_certs:
            named: set[Identity] = set()
            for uri in context.auth_context().get("peer_uri", []) or []:
                try:
                    ident = identity_from_uri(bytes(uri).decode(errors="replace"))
                except Unauthenticated as exc:
                    raise self.refused(context, exc) from None
                if ident is not None:
                    named.add(ident)
            if len(named) > 1:  # which one is meant? Until round 35 the first URI won, whatever the others said
                several = ", ".join(sorted(f"{x.role}/{x.name[:40]}" for x in named)[:4])
                raise self.refused(
                    context,
                    Unauthenticated(
                        f"client certificate names {len(named)} identities "
                        f"({several}): one gpupool://<role>/<name> only"
                    ),
                )
            if named:
                ident = named.pop()
                return Identity(ident.role, ident.name, by_cert=True)
            if context.auth_context().get("x509_common_name"):
                no_identity = Unauthenticated("client certificate names no gpupool://<role>/<name> identity")
                raise self.refused(context, no_identity)
        if self.open_access:
            return OPERATOR
        nothing = Unauthenticated(
            "no credentials: present a client certificate or an API token (GPUPOOL_API_TOKEN_FILE)"
        )
        raise self.refused(context, nothing)

    def refused(
        self, context: grpc.ServicerContext, exc: Unauthenticated | PermissionDenied, *, limited: bool | None = None
    ) -> Unauthenticated | PermissionDenied | ResourceExhausted:
        """The error a failed credential gets, counted against its source address (`AuthFailRate`): `exc`, or
        RESOURCE_EXHAUSTED once the address spent its bucket. Every failure counts - an unknown API token, a
        certificate naming no identity, a credential calling a method its role may not (a tenant's Register), and a
        host credential acting as another host (Register/Heartbeat for another host id; until round 32 only
        unknown API tokens were limited, and a host credential could be refused without bound). A call that
        passes is never counted nor refused here."""
        source = grpc_source(context.peer())
        if limited is None:
            limited = not self.failures.allows(source)
        self.failures.take(source)
        if limited:
            return ResourceExhausted(
                f"too many failed authentications from {source} (over {self.failures.rate:g} a second, "
                f"--auth-fail-rate): {exc}; fix the credential, then retry after a while"
            )
        return exc


class Buckets:
    """A token bucket per key: `rate` a second, up to `burst` (default 10 s worth); rate 0: no limit.

    At most MAX_TRACKED keys: past it, full buckets (which hold no state worth keeping) are dropped, and when
    none is full a new key shares the one OVERFLOW bucket (memory stays bounded whatever the keys are)."""

    MAX_TRACKED = 10_000
    OVERFLOW = "*"

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 10.0 * rate)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def _level(self, key: str, now: float) -> tuple[str, float]:
        """(the key the bucket is kept under, its tokens now); the caller holds the lock."""
        if key not in self._buckets and len(self._buckets) >= self.MAX_TRACKED:
            full = [k for k, (t, a) in self._buckets.items() if t + (now - a) * self.rate >= self.burst]
            for k in full:
                del self._buckets[k]
            if len(self._buckets) >= self.MAX_TRACKED:
                key = self.OVERFLOW
        return key, self._tokens(key, now)

    def _tokens(self, key: str, now: float) -> float:
        """The tokens `key`'s bucket holds now (a new key's bucket is full); the caller holds the lock."""
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def take(self, key: str) -> bool:
        """Take a token from `key`'s bucket; False (and nothing taken) when it has none."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            key, tokens = self._level(key, now)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            return ok

    def allows(self, key: str) -> bool:
        """Whether `key`'s bucket holds a token (taking none)."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            key = key if key in self._buckets or len(self._buckets) < self.MAX_TRACKED else self.OVERFLOW
            return self._tokens(key, now) >= 1.0


class TenantRate(Buckets):
    """Calls per second each tenant may make, a bucket per tenant name (`--tenant-rate`; 0: no limit).

    Admins are never limited, nor hosts' Register and Heartbeat (`HostWriteRate`, `HostBeatRate`): a tenant that
    floods the scheduler with cheap calls (ListPool) gets RESOURCE_EXHAUSTED instead of slowing every other caller's
    calls down. A host's other calls (ListPool) have a bucket of the same rate per host (round 41)."""


class HostWriteRate(Buckets):
    """Store writes a second each host identity may cause (`--host-write-rate`; 0: no limit): its Register calls
    (each one a durable write of the host, and a look at every lease) and its heartbeats that change its state
    (draining or not: a write each). Round 32 bounded a host credential acting as another host, not one acting as
    itself: a valid host that re-registered in a loop made one store transaction (an fsync) per call under the
    core's lock, which every Allocate, Renew and heartbeat of the pool waits for. Past its bucket such a call gets
    RESOURCE_EXHAUSTED (the daemon's registrar retries within 5 s); an honest host registers once a start or once
    its scheduler asks (a restarted scheduler), far below the default of one a second in bursts of ten. Keyed by
    the host id the credential acts as (only its own: `Identity.check_host`); operators are not limited."""


class HostBeatRate(Buckets):
    """Heartbeats a second each host identity may send (`--host-heartbeat-rate`; 0: no limit), in bursts of 10 s
    worth. Round 33 limited a host's heartbeats that write the store (`HostWriteRate`), not the others: until round
    40 a host credential heartbeating in a loop was served without bound, each call a hold of the core's lock with
    up to a message's worth of session ids to look up (four threads of 20,000 ids each: 42 heartbeats a second, and
    a tenant's ListPool from 0.7 ms to 45 ms, median). Past its bucket a heartbeat gets RESOURCE_EXHAUSTED before its
    message is parsed (round 41, `_wrap`; round 40: before the lock) (its daemon's registrar retries within 5 s, and
    what refills keeps a flooding host up); a daemon heartbeats every 2 s (`gpupool serve --heartbeat-interval`), far
    below the default of 5 a second in bursts of 50. Keyed by the host credential's name, the one host id it may act
    as (`Identity.check_host`); operators are not limited."""


class AuthFailRate(Buckets):
    """Failed authentications per second from each source address, an IPv4 address or an IPv6 /64
    (`--auth-fail-rate`; 0: no limit): unknown API tokens, and credentials refused for the call
    (`Authenticator.refused`: a host acting as another host, a role calling a method it may not).

    Each unknown token costs the scheduler a hash and a look at the credentials file (a stat; a read of all of
    it within two seconds of an edit). Once an address has spent its bucket on failures, its tokens are checked
    against the table as last read (the file looked at no more than once a second for it), and its bad ones get
    RESOURCE_EXHAUSTED ("slow down") instead of UNAUTHENTICATED until the bucket refills; its good tokens still
    pass (tenants behind one address must not be locked out by whoever floods it). Calls from other addresses,
    and calls with a verified client certificate and no token from any address, are not touched."""


class _Bounded:
    """A servicer context whose `abort` cuts its message (`errors.bounded`): whatever a handler quotes, the status
    reaches the client (a message over gRPC's trailer limit turned into the transport's RESOURCE_EXHAUSTED)."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._context.abort(code, bounded(details))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _wrap(
    behavior: Callable[..., Any],
    parse: Callable[[bytes], Any] | None,
    authn: Authenticator,
    roles: tuple[str, ...],
    rate: TenantRate | None = None,
    *,
    as_host: bool = False,
    beats: HostBeatRate | None = None,
    host_rate: TenantRate | None = None,
) -> Callable[..., Any]:
    """`behavior` behind authentication and the method's `roles`; `as_host`: a method acting as `request.host_id`
    (Register, Heartbeat), which only that host (or an operator) may call (`Identity.check_host`, here before the
    handler, so that a host credential acting as another host counts as a failed authentication).

    The call's request comes as its bytes and is parsed (`parse`) only once the caller is known and within its rate:
    a tenant's `rate`, a host's heartbeats (`beats`, keyed by the host credential's name, the only host id it may
    heartbeat as) and a host's other calls (`host_rate`: ListPool; `--tenant-rate`'s rate, a bucket per host) are
    taken first. Until round 41 gRPC parsed every request before this ran: a host heartbeating
    past `--host-heartbeat-rate` was refused only after its message (up to 1 MiB, ~29,000 session ids) was parsed,
    and an unauthenticated caller's 1 MiB messages were parsed before they were refused."""

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            ident = authn.identify(context.invocation_metadata(), context)
            if ident.role not in roles:
                raise authn.refused(context, PermissionDenied(f"a {ident.role} credential may not call this method"))
        except (Unauthenticated, PermissionDenied, ResourceExhausted) as exc:
            abort(context, exc)
        if rate is not None and ident.role == TENANT and not rate.take(ident.name):
            abort(context, ResourceExhausted(f"tenant {ident.name!r} is over its {rate.rate:g} calls a second "
                                             "to the scheduler (--tenant-rate): slow down and retry"))  # fmt: skip
        if host_rate is not None and ident.role == HOST and not host_rate.take(ident.name):
            abort(context, ResourceExhausted(f"host {ident.name!r} is over its {host_rate.rate:g} calls a second to "
                                             "the scheduler besides Register and Heartbeat (--tenant-rate): slow down "
                                             "and retry"))  # fmt: skip
        if beats is not None and ident.role == HOST and not beats.take(ident.name):
            abort(context, ResourceExhausted(f"host {ident.name!r} is over its {beats.rate:g} heartbeats a second "
                                             "(--host-heartbeat-rate): refused, nothing recorded; heartbeat every "
                                             "few seconds"))  # fmt: skip
        if parse is not None:
            request = parse(request)
        if isinstance(request, Malformed):
            abort(context, request.error())
        if as_host:
            try:
                ident.check_host(request.host_id)
            except PermissionDenied as exc:
                abort(context, authn.refused(context, exc))
        token = _current.set(ident)
        try:
            return behavior(request, _Bounded(context))
        finally:
            _current.reset(token)

    return call


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every Scheduler call before its handler runs (unary handlers only: the Scheduler has no
    streams), and exposes the identity through `current()`."""

    def __init__(self, authn: Authenticator, rate: TenantRate | None = None, beats: HostBeatRate | None = None) -> None:
        self.authn = authn
        self.rate = rate
        self.beats = beats  # a host's heartbeats (`--host-heartbeat-rate`), taken before its message is parsed
        # A host's calls but Register and Heartbeat (ListPool), at a tenant's rate, a bucket per host (round 41: a host
        # credential's ListPool was never limited, each call a hold of the core's lock over the whole pool)
        self.host_rate = TenantRate(rate.rate) if rate is not None else None

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        roles = METHOD_ROLES.get(details.method)
        if roles is None and details.method.startswith(SCHEDULER_PREFIX):
            roles = (ADMIN,)
        if handler is None or roles is None:
            return handler
        if handler.unary_unary is None:
            return _refused(handler)  # a streaming Scheduler method would pass unchecked: fail closed
        behavior = _wrap(
            handler.unary_unary,
            parsed(handler.request_deserializer),
            self.authn,
            roles,
            self.rate,
            as_host=details.method in HOST_METHODS,
            beats=self.beats if details.method == HEARTBEAT else None,
            host_rate=None if details.method in HOST_METHODS else self.host_rate,
        )
        # (no deserializer: the request's bytes reach `behavior`, which parses them once the caller passed)
        return grpc.unary_unary_rpc_method_handler(behavior, response_serializer=handler.response_serializer)


def _refused(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that refuses every call: the interceptor authenticates unary methods only, so a
    streaming Scheduler method added later must not be served without a check (it would be open to everyone)."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, PermissionDenied("streaming Scheduler methods are not authenticated: refused"))

    args = (refuse, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(*args)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(*args)
    return grpc.stream_stream_rpc_method_handler(*args)
