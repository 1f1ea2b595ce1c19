"""A running daemon: the Daemon, its gRPC server, metrics endpoint and (optional) scheduler registrar,
started and stopped together. Used by `gpupool serve`, `gpupool up` and the tests.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from grpc_health.v1 import health_pb2

from gpupool import tls, tokens
from gpupool.config import split_address

from .bulkside import BulkPort
from .daemon import Daemon, DaemonConfig, check_collective_ports
from .devices import Device
from .service import SERVICE, create_server

log = logging.getLogger(__name__)


def _bulk_port(config: DaemonConfig, daemon: Daemon) -> BulkPort:
    """The side port bound, or the one line of a port that cannot be (`tls.listen_refusal`, as --listen's): one taken
    between `gpupool serve`'s check at its start (`tls.first_unbindable`) and this bind, seconds later (its zygote's
    torch import), said "[Errno 98] Address already in use (while attempting to bind on address ...)" until round 56."""
    try:
        return BulkPort(split_address(config.bulk_listen), config.tls, daemon.session_list)
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
        raise OSError(tls.listen_refusal(config.bulk_listen, "--bulk-listen", "daemon")) from None


class RunningDaemon:
    def __init__(self, config: DaemonConfig, devices: list[Device] | None = None) -> None:
        self.daemon = Daemon(config, devices)
        self.daemon.start()
        self.bulk: BulkPort | None = None
        try:
            if config.bulk_listen:
                self.bulk = _bulk_port(config, self.daemon)
                self.bulk.revoked = self.daemon.revoked_certs
            self.server, self.port, self.health = create_server(self.daemon, config.listen, self.bulk)
            host, _ = split_address(config.listen)
            self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"  # (advertised: an IPv6
            # host in brackets, as clients and the scheduler read HOST:PORT; until round 42 "::1:PORT" resolved nowhere)
            self.metrics_port = self.daemon.metrics.serve(
                config.metrics_listen, None if config.metrics_plaintext else config.tls
            )
            self.health_server = tls.serve_health(config.health_listen, self.health, "daemon")
            if config.isolation == "process":  # a port-0 listener's port: in --collective-ports on some hosts
                check_collective_ports(config, {
                    "--listen": self.port, "--bulk-listen": self.bulk.port if self.bulk else 0,
                    "--metrics-listen": self.metrics_port,
                    "--health-listen": self.health_server[1] if self.health_server else 0})  # fmt: skip
        except Exception:
            for server in (getattr(self, "server", None), (getattr(self, "health_server", None) or (None,))[0]):
                if server is not None:
                    server.stop(0)
            if self.bulk is not None:
                self.bulk.stop()
            self.daemon.stop()
            raise
        self.registrar: Any = None
        if config.scheduler:
            from .registration import Registrar  # only daemons that register need it

            advertise = config.advertise or self.address
            verifier = config.token_key if isinstance(config.token_key, tokens.Verifier) else None
            self.registrar = Registrar(
                config.scheduler,
                config.host_id,
                advertise,
                source=self.daemon,
                interval=config.heartbeat_interval,
                tls_config=config.tls,
                verifier=verifier,
            )
            self.registrar.start()
        self._stopped = False
        log.info("listening on %s", self.address)
        if config.collectives == "gloo":
            log.warning(
                "--collectives gloo: collectives between daemons run over plaintext gloo/NCCL (readable and "
                "alterable on the hosts' network)"
            )
        else:
            log.info("collectives between daemons: secure (AES-256-GCM links, authenticated by the lease's keys)")
        if self.bulk is not None:
            log.info("bulk side port %d", self.bulk.port)
        if self.metrics_port:
            scheme = "http" if config.metrics_plaintext or config.tls.insecure else "https"
            host = split_address(config.metrics_listen)[0]
            log.info("metrics on %s://%s:%d/metrics", scheme, host, self.metrics_port)

    def stop(self, grace: float = 5.0, drain: bool = True) -> None:
        """Health NOT_SERVING, finish what was received (when `drain`), close sessions, stop serving."""
        if self._stopped:
            return
        self._stopped = True
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if drain and not self.daemon.drain():
            log.warning("drain timed out; closing sessions with work still queued")
        if self.registrar is not None:
            try:
                self.registrar.stop()
            except Exception:
                log.exception("stopping the registrar failed")
        if self.bulk is not None:
            self.bulk.stop()
        self.daemon.stop()
        if self.health_server is not None:
            self.health_server[0].stop(0)
        self.server.stop(grace).wait()
        log.info("stopped")

    def __enter__(self) -> RunningDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0, drain=False)
