"""The daemon side of Register/Heartbeat: keep this host known to the scheduler.

A `Registrar` thread registers the host, then heartbeats every `interval` seconds with the sessions'
usage, hands the leases the scheduler revokes to `source.revoke_leases`, and registers again when the
scheduler asks (it marked the host down) or has restarted (a new scheduler id). While the scheduler is
unreachable it keeps trying and logs - the daemon keeps serving the sessions it has, and tells the daemon
(`hold_expiry`) not to end sessions whose tokens expire meanwhile: nobody can renew a lease then. Once the
scheduler is back, it revokes (in heartbeat replies) whatever is no longer active.

`scheduler_address` may be a comma-separated list (HA replicas): the registrar talks to one and moves on to
the next when it cannot reach it (a standby does not listen until it leads).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import grpc

from gpupool import tls, tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

RPC_TIMEOUT = 5.0
# How long sessions outlive their tokens after the scheduler was last unreachable: time for the clients to
# renew with the scheduler back and hand the fresh tokens over.
OUTAGE_HOLD = 60.0


class RegistrationSource(Protocol):
    """What the daemon tells the scheduler (server/daemon.py implements it)."""

    host_id: str

    def devices(self) -> list[device_pb2.DeviceInfo]: ...

    def usage(self) -> tuple[list[device_pb2.SessionUsage], list[device_pb2.DeviceUsage]]: ...

    def draining(self) -> bool: ...

    def revoke_leases(self, lease_ids: list[str]) -> None: ...

    # Optional (`getattr`): `hold_expiry(until)` and `scheduler_unreachable()`, while the scheduler is unreachable;
    # `revocations_heard()`, after each heartbeat the scheduler answered as the host's (its reply named every
    # revocation it holds for the host); `revoked_certificates_version()` and `revoke_certificates(list, version)`,
    # the scheduler's revoked client certificates (round 45).


class Registrar:
    def __init__(
        self,
        scheduler_address: str,
        host_id: str,
        advertise_address: str,
        source: RegistrationSource,
        interval: float = 2.0,
        tls_config: tls.TlsConfig | None = None,
        verifier: tokens.Verifier | None = None,
    ) -> None:
        self.addresses = [a.strip() for a in scheduler_address.split(",") if a.strip()] or [scheduler_address]
        self.scheduler_address = self.addresses[0]
        self.host_id = host_id
        self.advertise_address = advertise_address
        self.source = source
        self.interval = interval
        self.registered = threading.Event()  # set while the scheduler knows this host
        self.scheduler_id = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registrar", daemon=True)
        self.tls_config = tls_config  # this host's certificate (mutual TLS names the host), or its join token
        self.verifier = verifier  # told the revoked leases, so their tokens cannot attach again
        self._failures = 0
        self._connect()

    def _connect(self) -> None:
        # Reconnect within 5 s of the scheduler coming back (gRPC's default backoff grows to 120 s): a restarted
        # scheduler marks this host down after its host timeout without a heartbeat.
        options = [("grpc.max_reconnect_backoff_ms", 5000)]
        self._channel = tls.channel(self.scheduler_address, options, cfg=self.tls_config)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    def _next_scheduler(self) -> None:
        """Talk to the next address of the list (after a failure to reach this one)."""
        if len(self.addresses) < 2:
            return
        i = (self.addresses.index(self.scheduler_address) + 1) % len(self.addresses)
        self.scheduler_address = self.addresses[i]
        self._channel.close()
        self._connect()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=RPC_TIMEOUT + 1)
        self._channel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.registered.is_set():
                    self._heartbeat()
                else:
                    self._register()
                    # At once, not an interval later: the first heartbeat's reply names the ended leases whose tokens
                    # to refuse (a restarted daemon's list is empty), and the daemon serves no Attach before it
                    # (`Daemon.revocations_heard`).
                    self._heartbeat()
                    if not self.registered.is_set():  # asked to register again at once: not in a loop
                        self._stop.wait(self.interval)
                if self._failures:
                    log.info("scheduler %s reachable again", self.scheduler_address)
                self._failures = 0
            except grpc.RpcError as err:
                self._failed(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):  # type: ignore[attr-defined]
                    self._hold()
                    unreachable = getattr(self.source, "scheduler_unreachable", None)
                    if unreachable is not None:
                        unreachable()  # (a daemon with a recent revocations file serves on it: server/revocations.py)
                    self._next_scheduler()
            except Exception as exc:  # noqa: BLE001 - a bad source reading must not end registration
                log.exception("registration step failed")
                self._failed(f"{type(exc).__name__}: {exc}")
            if not self.registered.is_set() and self._failures == 0:
                continue  # the scheduler asked us to register again: do it now
            # Back off after failures, but never past a few seconds: a restarted scheduler marks a host down
            # (and its leases lost) after its host timeout (10 s by default) without a heartbeat.
            backoff = max(self.interval, min(self.interval * 2**self._failures, 5.0))
            self._stop.wait(backoff if self._failures else self.interval)

    def _hold(self) -> None:
        hold = getattr(self.source, "hold_expiry", None)
        if hold is not None:
            hold(time.time() + OUTAGE_HOLD)

    def _failed(self, why: str) -> None:
        self._failures += 1
        if self._failures == 1 or self._failures % 10 == 0:
            log.warning(
                "scheduler %s: %s (attempt %d; the daemon keeps serving)", self.scheduler_address, why, self._failures
            )

    def _register(self) -> None:
        reply = self._stub.Register(
            scheduler_pb2.RegisterRequest(
                host_id=self.host_id, address=self.advertise_address, devices=self.source.devices()
            ),
            timeout=RPC_TIMEOUT,
        )
        self.scheduler_id = reply.scheduler_id
        self.registered.set()
        log.info(
            "registered with scheduler %s as %s (%s)", self.scheduler_address, self.host_id, self.advertise_address
        )

    def _heartbeat(self) -> None:
        sessions, devices = self.source.usage()
        reply = self._stub.Heartbeat(
            scheduler_pb2.HeartbeatRequest(
                host_id=self.host_id,
                sessions=sessions,
                devices=devices,
                draining=self.source.draining(),
                address=self.advertise_address,
                revoked_certificates_version=getattr(self.source, "revoked_certificates_version", str)(),
            ),
            timeout=RPC_TIMEOUT,
        )
        if reply.revoked_leases:
            log.info("scheduler revoked lease(s) %s", ", ".join(reply.revoked_leases))
            if self.verifier is not None:
                # Each until its last token expires (the scheduler's `revoked_until`, in its order), by time alone.
                self.verifier.revoke(list(reply.revoked_leases), until=list(reply.revoked_until))
            self.source.revoke_leases(list(reply.revoked_leases))
        if reply.reregister or (reply.scheduler_id and reply.scheduler_id != self.scheduler_id):
            log.info("scheduler %s asks to register again", self.scheduler_address)
            self.registered.clear()
            return
        if self.verifier is not None and reply.status_tokens_not_before:
            self.verifier.status_not_before(reply.status_tokens_not_before)
        take = getattr(self.source, "revoke_certificates", None)
        if take is not None and reply.revoked_certificates_version:  # (empty: an older scheduler, no list)
            if reply.revoked_certificates_version != getattr(self.source, "revoked_certificates_version", str)():
                take(list(reply.revoked_certificates), reply.revoked_certificates_version)
        heard = getattr(self.source, "revocations_heard", None)
        if heard is not None:
            heard()  # (a reply of the scheduler that knows this host: it named every revocation it holds for it)
