"""The Scheduler gRPC servicer: protobuf in, one call into the core (leases.py / hosts.py), protobuf out."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from gpupool.scheduler import auth
from gpupool.scheduler.hosts import DeviceSpec
from gpupool.scheduler.leases import Core
from gpupool.scheduler.placement import Request
from gpupool.scheduler.pool import SHARE_UNITS
from gpupool.scheduler.store import Lease

from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc
from gpupool.errors import GpupoolError, Internal, InvalidArgument, abort

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
MAX_LABELS = 64


def _rpc(method: F) -> F:
    """Turn domain exceptions into statuses; anything else is a bug, logged and answered INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: SchedulerServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except GpupoolError as exc:
            abort(context, exc)
        except Exception as exc:  # noqa: BLE001 - the server must answer, never die
            log.exception("%s failed", method.__name__)
            abort(context, Internal(f"{method.__name__}: {type(exc).__name__}: {exc}"))

    return wrapper  # type: ignore[return-value]


def _labels(labels: Any) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels")
    return dict(labels)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, core: Core, default_policy: str = "binpack") -> None:
        self.core = core
        self.default_policy = default_policy

    @_rpc
    def Register(self, request: scheduler_pb2.RegisterRequest, context: grpc.ServicerContext) -> Any:
        auth.current().check_host(request.host_id)
        devices = [DeviceSpec(d.index, d.uuid, d.model, d.memory_bytes, d.fake) for d in request.devices]
        self.core.register(request.host_id, request.address, devices, _labels(request.labels))
        return scheduler_pb2.RegisterReply(
            heartbeat_interval_seconds=self.core.config.heartbeat_interval, scheduler_id=self.core.scheduler_id
        )

    @_rpc
    def Heartbeat(self, request: scheduler_pb2.HeartbeatRequest, context: grpc.ServicerContext) -> Any:
        auth.current().check_host(request.host_id)
        used = {d.info.index: d.used_bytes for d in request.devices}
        revoked, again = self.core.heartbeat(
            request.host_id, [s.lease_id for s in request.sessions], used, request.draining
        )
        return scheduler_pb2.HeartbeatReply(
            revoked_leases=revoked, reregister=again, scheduler_id=self.core.scheduler_id
        )

    @_rpc
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
            labels=_labels(request.labels),
            policy=request.policy or self.default_policy,
        )
        lease = self.core.allocate(
            req,
            tenant=auth.current().tenant_for(request.tenant),
            ttl=request.ttl_seconds,
            wait=request.wait_seconds,
            cancelled=lambda: not context.is_active(),
        )
        return self._lease_pb(lease, with_tokens=True)

    @_rpc
    def Renew(self, request: scheduler_pb2.RenewRequest, context: grpc.ServicerContext) -> Any:
        self._check_owner(request.lease_id)
        return self._lease_pb(self.core.renew(request.lease_id), with_tokens=True)

    @_rpc
    def Release(self, request: scheduler_pb2.ReleaseRequest, context: grpc.ServicerContext) -> Any:
        self._check_owner(request.lease_id)
        self.core.release(request.lease_id)
        return scheduler_pb2.ReleaseReply()

    def _check_owner(self, lease_id: str) -> None:
        """Renew/Release only by the lease's tenant (or an operator); unknown ids fall through to NOT_FOUND."""
        with self.core.lock:
            lease = self.core.leases.get(lease_id)
        if lease is not None:
            auth.current().check_lease(lease_id, lease.tenant)

    @_rpc
    def ListPool(self, request: scheduler_pb2.ListPoolRequest, context: grpc.ServicerContext) -> Any:
        caller = auth.current()
        with self.core.lock:
            hosts = [
                scheduler_pb2.HostState(
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
                for h in sorted(self.core.pool.hosts.values(), key=lambda h: h.host_id)
            ]
            leases = [
                scheduler_pb2.LeaseInfo(  # other tenants' leases: usage only, no id
                    lease_id=x.lease_id if caller.may_see(x.tenant) else "",
                    tenant=x.tenant,
                    state=x.state,
                    devices=self._devices_pb(x, with_tokens=False),
                    expires_at=x.expires_at,
                )
                for x in sorted(self.core.active_leases(), key=lambda x: x.created_at)
            ]
            waiting = len(self.core.waiters)
        return scheduler_pb2.PoolState(hosts=hosts, leases=leases, waiting=waiting)

    def _devices_pb(self, lease: Lease, with_tokens: bool) -> list[scheduler_pb2.LeasedDevice]:
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

    def _lease_pb(self, lease: Lease, with_tokens: bool) -> scheduler_pb2.Lease:
        with self.core.lock:
            return scheduler_pb2.Lease(
                lease_id=lease.lease_id,
                devices=self._devices_pb(lease, with_tokens),
                expires_at=lease.expires_at,
                ttl_seconds=lease.ttl,
                tenant=lease.tenant,
            )
