"""The client side of the scheduler: `gpupool.lease(...)` and the `Lease` it returns.

A `Lease` holds the leased devices (daemon address, device index, quota, share, token), renews itself in
the background, tells subscribers (the op-stream sessions) about fresh tokens, and is released on exit::

    with gpupool.lease(gpus=1, fraction=0.5) as lease:
        x = torch.ones(3, device=lease.device())

`gpupool run` hands a lease to a child process through `to_env()` / `from_env()` (plain JSON).
"""

from __future__ import annotations

import atexit
import getpass
import json
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from gpupool import pki, tls
from gpupool._proto import scheduler_pb2, scheduler_pb2_grpc
from gpupool.config import parse_size
from gpupool.errors import GpupoolError, InvalidArgument, from_failure

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_SCHEDULER = "127.0.0.1:50050"
LEASE_ENV = "GPUPOOL_LEASE"
SCHEDULER_ENV = "GPUPOOL_SCHEDULER"
RPC_TIMEOUT = 10.0
# Renew every ttl/3, but at least this often: a renewal is also how a client learns that its lease was lost.
RENEW_MAX_PERIOD = 10.0


def resolve_scheduler(address: str | None = None) -> str:
    """The explicit address, else $GPUPOOL_SCHEDULER, else 127.0.0.1:50050."""
    return address or os.environ.get(SCHEDULER_ENV) or DEFAULT_SCHEDULER


def default_tenant(cfg: tls.TlsConfig | None = None) -> str:
    """The tenant an Allocate names where its caller named none (`lease`, `gpupool run` without `--tenant`):
    $GPUPOOL_TENANT, else "" for an operator presenting its own certificate (an admin one, `cfg`'s or GPUPOOL_TLS_*'s,
    and no API token): its own lease, which the scheduler binds to that certificate (round 46's `cert` claim: a daemon
    under `--tls-client-auth require` attaches its tokens for that certificate only), else the OS user name. An
    operator's Allocate naming a tenant is that tenant's (sec47), unbound: until sec48 only `gpupool run` (secrev47)
    named no tenant for an operator, and `gpupool.lease()` named $USER, so an operator's own lease taken there was a
    bearer's token. A tenant's certificate names its tenant whatever the request says, so only an operator's changes
    (its lease is shown under its certificate's name, not $USER)."""
    named = os.environ.get("GPUPOOL_TENANT", "")
    if named:
        return named
    if _operator_certificate(cfg or tls.client_config()):
        return ""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _operator_certificate(cfg: tls.TlsConfig) -> bool:
    """Whether `cfg` presents an admin certificate as its credential (TLS, a client certificate, no API token: an API
    token names the caller, whatever certificate is beside it)."""
    if cfg.insecure or not cfg.cert or cfg.api_token_file or (cfg.env_token and tls.api_token(cfg)):
        return False
    try:
        ident = pki.identity_of(Path(cfg.cert).read_bytes())
    except (OSError, ValueError):
        return False  # (the Allocate says what is wrong with it)
    return ident is not None and ident[0] == "admin"


class SchedulerClient:
    """Thin wrapper of the Scheduler stub that raises gpupool exceptions instead of grpc.RpcError.

    `address` may be a comma-separated list of HA replicas: a call that cannot reach one tries the next
    (only the leader listens), and the client stays with the one that answered.
    """

    def __init__(self, address: str | None = None, tls_config: tls.TlsConfig | None = None) -> None:
        self.address = resolve_scheduler(address)
        self.tls_config = tls_config  # TLS with GPUPOOL_TLS_* (and the tenant's API token) unless this says otherwise
        self.addresses = [a.strip() for a in self.address.split(",") if a.strip()] or [self.address]
        self._current = 0
        self._connect()

    def _connect(self) -> None:
        # Reconnect within 5 s of a scheduler coming back (gRPC's default backoff grows to 120 s), so that
        # leases are renewed inside the grace period a restarted scheduler gives them.
        # A channel of its own subchannels: in gRPC's process-wide pool, a new client would inherit the connection
        # backoff of an earlier channel to a scheduler that was down, and fail at once although it is back.
        options = [("grpc.max_reconnect_backoff_ms", 5000), ("grpc.use_local_subchannel_pool", 1)]
        self._channel = tls.channel(self.addresses[self._current], options, cfg=self.tls_config)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    def _call(self, method: str, request: Any, timeout: float = RPC_TIMEOUT) -> Any:
        for attempt in range(len(self.addresses)):
            try:
                return getattr(self._stub, method)(request, timeout=timeout)
            except grpc.RpcError as err:  # noqa: PERF203 - a retry loop over replicas
                exc = from_failure(err)
                if err.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    raise exc from None
                if attempt + 1 < len(self.addresses):  # try the next replica
                    self._channel.close()
                    self._current = (self._current + 1) % len(self.addresses)
                    self._connect()
                    continue
                if "lease" not in exc.message and "state" not in exc.message:
                    why = tls.unreachable(exc.message, self.tls_config)
                    exc.message = f"scheduler {self.address} unreachable: {why}"
                raise exc from None
        raise AssertionError("unreachable")

    def allocate(self, request: scheduler_pb2.AllocateRequest) -> scheduler_pb2.Lease:
        wait = request.wait_seconds if math.isfinite(request.wait_seconds) and request.wait_seconds > 0 else 0.0
        return self._call("Allocate", request, timeout=wait + RPC_TIMEOUT)  # type: ignore[no-any-return]

    def renew(self, lease_id: str) -> scheduler_pb2.Lease:
        return self._call("Renew", scheduler_pb2.RenewRequest(lease_id=lease_id))  # type: ignore[no-any-return]

    def release(self, lease_id: str) -> None:
        self._call("Release", scheduler_pb2.ReleaseRequest(lease_id=lease_id))

    def list_pool(self) -> scheduler_pb2.PoolState:
        """The whole pool, its pages (hosts, then leases) joined."""
        state = scheduler_pb2.PoolState()
        token = ""
        for _ in range(100_000):
            page = self._call("ListPool", scheduler_pb2.ListPoolRequest(page_token=token))
            state.hosts.extend(page.hosts)
            state.leases.extend(page.leases)
            state.waiting = page.waiting
            token = page.next_page_token
            if not token:
                break
        return state

    def drain_host(self, host_id: str, undo: bool = False) -> None:
        self._call("DrainHost", scheduler_pb2.DrainHostRequest(host_id=host_id, undo=undo))

    def remove_host(self, host_id: str, force: bool = False) -> int:
        reply = self._call("RemoveHost", scheduler_pb2.RemoveHostRequest(host_id=host_id, force=force))
        return int(reply.leases_lost)

    def revoke_certificates(
        self,
        revoke: Sequence[str] = (),
        unrevoke: Sequence[str] = (),
        note: str = "",
    ) -> scheduler_pb2.RevokeCertificatesReply:
        """Operators: revoke client certificates by fingerprint (or take back); the whole list after the change."""
        request = scheduler_pb2.RevokeCertificatesRequest(revoke=revoke, unrevoke=unrevoke, note=note)
        return self._call("RevokeCertificates", request)  # type: ignore[no-any-return]

    def set_lease_terms(
        self, lease_id: str, fraction: float | None = None, memory_bytes: int | None = None, share: float = 0.0
    ) -> scheduler_pb2.Lease:
        """Operators: an active lease's new quota and share on each of its devices (a fraction, or a memory size; a
        share, 0: as the size gives it); its next renewal carries them to its sessions. The lease, without tokens."""
        request = scheduler_pb2.SetLeaseTermsRequest(lease_id=lease_id, share=share)
        if fraction is not None:
            request.fraction = fraction
        if memory_bytes is not None:
            request.memory_bytes = memory_bytes
        return self._call("SetLeaseTerms", request)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._channel.close()


@dataclass(frozen=True)
class LeasedDevice:
    host_id: str
    address: str
    device: int
    uuid: str
    quota_bytes: int
    share: float
    # A bearer secret: not in the repr, which logs, tracebacks' locals (pytest's) and a `print(lease.devices)` show.
    token: str = field(repr=False)


def _devices(pb: scheduler_pb2.Lease) -> list[LeasedDevice]:
    return [LeasedDevice(d.host_id, d.address, d.device, d.uuid, d.quota_bytes, d.share, d.token) for d in pb.devices]


class Lease:
    """Leased devices and their tokens; a context manager that releases on exit."""

    def __init__(
        self,
        lease_id: str,
        devices: list[LeasedDevice],
        expires_at: float,
        tenant: str,
        scheduler: str | None,
        ttl: float = 60.0,
    ) -> None:
        self.lease_id = lease_id
        self.devices = devices
        self.expires_at = expires_at
        self.tenant = tenant
        self.scheduler = scheduler
        self.ttl = ttl
        self.error: GpupoolError | None = None  # the last renewal failure, if any
        self.lost = threading.Event()  # set when the scheduler says the lease is gone (self.error says why)
        self._lost_callbacks: list[Callable[[Lease], None]] = []
        self._client: SchedulerClient | None = None
        self._subscribers: list[Callable[[Lease], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False

    @classmethod
    def _from_pb(cls, pb: scheduler_pb2.Lease, scheduler: str) -> Lease:
        return cls(pb.lease_id, _devices(pb), pb.expires_at, pb.tenant, scheduler, pb.ttl_seconds)

    def __repr__(self) -> str:
        where = ", ".join(f"{d.host_id}/{d.device}:{d.share:g}" for d in self.devices)
        return f"Lease({self.lease_id[:8]}, [{where}], tenant={self.tenant!r})"

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def device(self, index: int = 0) -> torch.device:
        native = sys.modules.get("gpupool.client.native")  # loaded wherever the C++ client is (not imported here:
        if native is not None and native.active():  # the layers of .importlinter); it attaches $GPUPOOL_LEASE's only
            native.refuse("attaching a lease by hand (Lease.device)")
        from .torch import attach_lease  # type: ignore[attr-defined]  # lazily: torch only when asked

        return attach_lease(self, index)  # type: ignore[no-any-return]

    def subscribe(self, callback: Callable[[Lease], None]) -> None:
        """Call `callback(lease)` after every renewal (self.devices then holds the fresh tokens)."""
        with self._lock:
            self._subscribers.append(callback)

    def on_lost(self, callback: Callable[[Lease], None]) -> None:
        """Call `callback(lease)` once, as soon as the scheduler says the lease is gone (lost, expired, unknown)."""
        with self._lock:
            self._lost_callbacks.append(callback)
            fire = self.lost.is_set()
        if fire:
            callback(self)

    def _scheduler(self) -> SchedulerClient:
        if self._client is None:
            self._client = SchedulerClient(self.scheduler)
        return self._client

    def renew(self) -> None:
        """Extend the lease now; raises what the scheduler says (FailedPrecondition, Unavailable, ...)."""
        pb = self._scheduler().renew(self.lease_id)
        with self._lock:
            self.devices, self.expires_at, self.ttl = _devices(pb), pb.expires_at, pb.ttl_seconds or self.ttl
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - one broken subscriber must not stop renewals
                log.exception("lease subscriber failed")

    def refresh_if_stale(self) -> None:
        """Renew now when past half the lease's TTL: a child of `gpupool run` holds the tokens of the moment it
        started ($GPUPOOL_LEASE), while its parent's renewals moved the lease on; attaching with those old
        tokens would fail once they expire. A scheduler that cannot be reached is only logged here: the tokens
        may still be good, and attaching says clearly when they are not."""
        if time.time() < self.expires_at - self.ttl / 2:
            return
        try:
            self.renew()
        except GpupoolError as exc:
            log.warning("renewing the inherited lease %s before attaching: %s", self.lease_id, exc)

    def start_renewing(self) -> None:
        """Renew in a background thread every ttl/3 (at most 10 s) until released or lost (see `on_lost`)."""
        if self._thread is None and not self._released:
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.lease_id[:8]}", daemon=True)
            self._thread.start()

    def stop_renewing(self) -> None:
        """Stop the renewal thread without giving the devices back: a child of `gpupool run` at its exit (the
        release is the parent's). It does not wait for a renewal in flight (the thread is a daemon thread)."""
        self._stop.set()

    def _renew_loop(self) -> None:
        # The first renewal comes sooner when the lease is already old (a child of `gpupool run` that took its
        # time to import torch): at the latest half-way through what is left of it.
        left = self.expires_at - time.time()
        delay = min(max(0.2, self.ttl / 3), RENEW_MAX_PERIOD, max(0.0, left / 2))
        failures = 0
        while not self._stop.wait(delay):
            try:
                self.renew()
                if failures:
                    log.info("renewed lease %s again", self.lease_id)
                self.error, failures = None, 0
                delay = min(max(0.2, self.ttl / 3), RENEW_MAX_PERIOD)
            except GpupoolError as exc:
                self.error = exc
                if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    # The scheduler answered: the lease is gone. Retrying cannot bring it back: say so now.
                    log.error("lease %s is gone: %s", self.lease_id, exc)
                    self._declare_lost()
                    return
                # The scheduler is down or cannot save its state: keep trying, even past the lease's expiry -
                # a scheduler back from an outage keeps such leases for a grace period, and the daemons keep
                # their sessions while they cannot reach it either.
                failures += 1
                left = self.expires_at - time.time()
                if failures == 1 or failures % 10 == 0:
                    log.warning("renewing lease %s failed (%.0f s left): %s", self.lease_id, left, exc)
                delay = min(max(0.5, left / 4, self.ttl / 10), 5.0)

    def _declare_lost(self) -> None:
        with self._lock:
            self.lost.set()
            callbacks = list(self._lost_callbacks)
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - one broken callback must not hide the others
                log.exception("lease-lost callback failed")

    def release(self) -> None:
        """Stop renewing and give the devices back (idempotent; a lease already ended is fine)."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=RPC_TIMEOUT + 1)
        try:
            self._scheduler().release(self.lease_id)
        except GpupoolError as exc:
            log.warning("releasing lease %s: %s", self.lease_id, exc)
        finally:
            if self._client is not None:
                self._client.close()

    def to_env(self) -> dict[str, str]:
        """Environment that lets a child process use this lease (`Lease.from_env`)."""
        body = {
            "lease_id": self.lease_id,
            "devices": [asdict(d) for d in self.devices],
            "expires_at": self.expires_at,
            "tenant": self.tenant,
            "scheduler": self.scheduler,
            "ttl": self.ttl,
        }
        env = {LEASE_ENV: json.dumps(body)}
        if self.scheduler:
            env[SCHEDULER_ENV] = self.scheduler
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Lease | None:
        """The lease a parent passed down, or None; it renews only after `start_renewing()`."""
        raw = environ.get(LEASE_ENV)
        if not raw:
            return None
        try:
            body = json.loads(raw)
            devices = [
                LeasedDevice(
                    str(d["host_id"]),
                    str(d["address"]),
                    int(d["device"]),
                    str(d["uuid"]),
                    int(d["quota_bytes"]),
                    float(d["share"]),
                    str(d["token"]),
                )
                for d in body["devices"]
            ]
            return cls(
                str(body["lease_id"]),
                devices,
                float(body["expires_at"]),
                str(body.get("tenant", "")),
                body.get("scheduler") or environ.get(SCHEDULER_ENV),
                float(body.get("ttl", 60.0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"${LEASE_ENV} is not a lease: {exc}") from exc


_live: weakref.WeakSet[Lease] = weakref.WeakSet()


def rank_device(index: int, devices: int) -> int:
    """The lease device `gpupool:<index>` is in this process: a torchrun rank (LOCAL_RANK r) sees its own device first,
    as gpupool:0, like CUDA_VISIBLE_DEVICES (docs/distributed.md): lease device (r + index) mod n, on a lease of
    several devices. Another local rank's own device is refused with one error: a lease device takes one process's
    session, so the rank that came second failed at attach with the daemon's "lease ... already has a session on this
    device" -- what a script in torch's own numbering (`f"{acc}:{local_rank}"`, `torch.accelerator.set_device_index(
    local_rank)`) got in every rank but 0. Devices past LOCAL_WORLD_SIZE (a rank's spares) stay nameable; without
    LOCAL_WORLD_SIZE (a launcher other than torchrun that sets LOCAL_RANK alone, or a variable left in the environment
    of one process) nothing is refused: which devices are other ranks' is unknown, and a single process naming two
    devices of its lease is no error (until round 34's review every device but LOCAL_RANK's was refused then)."""
    local = os.environ.get("LOCAL_RANK")
    if devices <= 1 or local is None:
        return index % max(1, devices)
    r = int(local)
    at = (r + index) % devices
    ranks = os.environ.get("LOCAL_WORLD_SIZE")
    if at != r and ranks and at < int(ranks):
        cuda = sys.modules.get(f"{__package__}.cuda")  # loaded (at `import torch`) wherever the mapping can be on
        # Under --cuda the script's CUDA names and torch.accelerator's calls are the lease's numbers (client/cuda/
        # devices.py): only a 'gpupool:N' the script wrote itself is gpupool's numbering, and gets here.
        way_out = (
            "Under --cuda name it as CUDA's (f'cuda:{local_rank}', torch.cuda.set_device(local_rank), "
            "torch.accelerator.set_device_index(local_rank)): CUDA's numbers are the lease's, so local_rank is the "
            "rank's own device"
            if cuda is not None and cuda.enabled()
            else "Name it 'gpupool:0' (or 'gpupool' without set_device), not f'{acc}:{local_rank}' or "
            "torch.accelerator.set_device_index(local_rank); a script written for CUDA (f'cuda:{local_rank}', "
            "torch.cuda.set_device(local_rank), torch.accelerator's calls) runs as it is under `gpupool run --cuda`"
        )
        raise InvalidArgument(
            f"gpupool:{index} is lease device {at} here, local rank {at}'s own device, which this torchrun rank "
            f"(LOCAL_RANK={r}) cannot use (a device takes one process's session): each rank sees its own device, "
            f"lease device LOCAL_RANK, as gpupool:0, as CUDA_VISIBLE_DEVICES would show it. {way_out} "
            "(docs/distributed.md)"
        )
    return at


@atexit.register
def _release_at_exit() -> None:
    """Leases a script forgot to release go back at interpreter exit, not one TTL later."""
    for x in list(_live):
        x.release()


def lease(
    gpus: int = 1,
    fraction: float | None = None,
    memory: int | str | None = None,
    *,
    scheduler: str | None = None,
    wait: float = 0.0,
    tenant: str | None = None,
    labels: Mapping[str, str] | None = None,
    policy: str = "",
    ttl: float | None = None,
) -> Lease:
    """Allocate `gpus` devices, each `fraction` of a GPU or `memory` of one (a whole GPU if neither); renews.

    `policy` is "binpack" or "spread"; empty (the default) leaves the choice to the scheduler's `--policy`.
    `tenant`: None (the default) is `default_tenant()` ($GPUPOOL_TENANT, else an operator's own lease where an admin
    certificate is the credential, else the OS user); "" is the caller's own lease; a name is that tenant's (operators
    only: a tenant's credential names its tenant whatever this says).
    """
    if fraction is not None and memory is not None:
        raise InvalidArgument("give fraction or memory, not both")
    if gpus <= 0:
        raise InvalidArgument(f"gpus must be positive, got {gpus}")
    request = scheduler_pb2.AllocateRequest(
        gpus=gpus,
        labels=dict(labels or {}),
        wait_seconds=wait,
        policy=policy,
        tenant=default_tenant() if tenant is None else tenant,
        ttl_seconds=ttl or 0.0,
    )
    if memory is not None:
        try:
            request.memory_bytes = parse_size(memory)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
    else:
        request.fraction = 1.0 if fraction is None else fraction
    client = SchedulerClient(scheduler)
    try:
        pb = client.allocate(request)
    except BaseException:
        client.close()
        raise
    result = Lease._from_pb(pb, client.address)
    result._client = client
    result.start_renewing()
    _live.add(result)
    log.info("leased %r from %s", result, client.address)
    return result
