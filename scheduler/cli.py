"""`gpupool scheduler`: flags -> Config -> a running scheduler (gRPC + health + metrics + housekeeping).

`SchedulerServer` is also what tests and benchmarks start in-process (port 0).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sqlite3
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2

from gpupool import tls, tokens
from gpupool._proto import scheduler_pb2_grpc
from gpupool.callguard import RequestGuard
from gpupool.config import StopSignals, add_flag, more_open_files, setup_logging, split_address
from gpupool.errors import ErrorInterceptor, GpupoolError
from gpupool.metrics_http import serve_metrics, stop_metrics
from gpupool.protocol import Policy
from gpupool.tls import TlsConfig

from .auth import Authenticator, AuthFailRate, AuthInterceptor, HostBeatRate, HostWriteRate, TenantRate
from .leases import Core, CoreConfig
from .metrics import SchedulerMetrics
from .placement import POLICIES
from .service import SchedulerServicer
from .store import StateOwned, Store, open_store

log = logging.getLogger("gpupool.scheduler")

SERVICE_NAME = "gpupool.v1.Scheduler"
# Each waiting Allocate holds a worker thread until it is served or times out, so allow many more
# workers than cores (the work per call is tiny), and keep some free of waiters so that heartbeats,
# renewals and releases are always served.
MAX_WORKERS = 64
MAX_WAITERS = 48
# gRPC reads each open stream's first bytes (its flow-control window) before any worker takes the call: round 30
# let one connection open any number of streams, and 10,000 unauthenticated 400 KB calls from one client took the
# scheduler from 53 MB to 786 MB. Now a connection holds at most MAX_STREAMS streams, calls in progress or queued
# for a worker are at most MAX_CALLS (past it: RESOURCE_EXHAUSTED at once), and a request at most
# MAX_REQUEST_BYTES (the largest, a Register of 1,024 devices with 256-character ids, is about 540 KB).
MAX_STREAMS = 100
MAX_CALLS = 2 * MAX_WORKERS
MAX_REQUEST_BYTES = 1 << 20


def default_state_path() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "gpupool" / "scheduler.db")


@dataclass(frozen=True)
class SchedulerConfig:
    listen: str = "127.0.0.1:50050"
    state: str = ":memory:"
    token_key_file: str | None = None
    metrics_listen: str = "127.0.0.1:9451"  # HTTPS to scrapers' client certificates (gpupool/metrics_http.py)
    metrics_plaintext: bool = False  # serve them in plaintext HTTP instead (so does `tls.insecure`)
    lease_ttl: float = 60.0
    host_timeout: float = 10.0
    heartbeat_interval: float = 2.0
    policy: Policy = Policy.BINPACK
    sweep_interval: float = 0.5
    tls: TlsConfig = TlsConfig(client_auth="require")
    credentials: str | None = None
    health_listen: str = ""
    standby: bool = False
    outage_grace: float = 30.0
    max_lease_ttl: float = 24 * 3600.0
    tenant_max_share: float = 0.0
    tenant_max_waiting: int = 8
    tenant_max_leases: int = 1000
    tenant_max_revoked: int = 20_000
    max_revoked: int = 200_000  # all tenants together (--max-revoked)
    tenant_rate: float = 100.0
    auth_fail_rate: float = 1.0
    host_write_rate: float = 1.0
    host_heartbeat_rate: float = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpupool scheduler", description="Run the gpupool scheduler.")
    add_flag(p, "--listen", default="127.0.0.1:50050", help="gRPC HOST:PORT (port 0: any free port)")
    add_flag(
        p,
        "--state",
        default=default_state_path(),
        help="where hosts and leases are kept: a SQLite (WAL) file, or postgresql://... for HA replicas; "
        "':memory:' keeps nothing",
        shown_as=_redact,  # $GPUPOOL_STATE may hold a password
    )
    add_flag(p, "--token-key-file", help="Ed25519 private key (PEM) that signs lease tokens; re-read when it changes")
    add_flag(
        p,
        "--credentials",
        help="API tokens of tenants, hosts (join tokens) and admins: lines '<role> <name> sha256:<hex>'",
    )
    tls.add_tls_flags(p, client_auth="require")
    add_flag(p, "--health-listen", default="", help="plaintext HOST:PORT serving only grpc.health.v1 (probes)")
    tls.add_metrics_flags(p, "127.0.0.1:9451")
    add_flag(p, "--lease-ttl", type=float, default=60.0, help="seconds a lease lives unless renewed")
    add_flag(p, "--host-timeout", type=float, default=10.0, help="seconds of silence before a host is marked down")
    add_flag(p, "--heartbeat-interval", type=float, default=2.0, help="seconds between daemon heartbeats")
    add_flag(p, "--policy", default=Policy.BINPACK.value, choices=POLICIES, help="default placement policy")
    add_flag(
        p,
        "--outage-grace",
        type=float,
        default=30.0,
        help="after a restart or a pause of the scheduler, seconds its leases are kept for their tenants to renew",
    )
    add_flag(p, "--max-lease-ttl", type=float, default=24 * 3600.0, help="longest TTL a client may ask for (seconds)")
    add_flag(
        p,
        "--tenant-max-share",
        type=float,
        default=0.0,
        help="GPUs' worth of shares one tenant may hold and wait for at once, e.g. 2.5; 0: no limit",
    )
    add_flag(p, "--tenant-max-waiting", type=int, default=8, help="waiting Allocate requests per tenant; 0: no limit")
    add_flag(
        p,
        "--tenant-max-leases",
        type=int,
        default=1000,
        help="active leases (and waiting requests) per tenant, whatever their size; 0: no limit",
    )
    add_flag(
        p,
        "--tenant-max-revoked",
        type=int,
        default=20_000,
        help="ended leases per tenant whose tokens may still live (their expiry + 600 s): each daemon of such a "
        "lease remembers it until then; beyond, Allocate is RESOURCE_EXHAUSTED; 0: no limit",
    )
    add_flag(
        p,
        "--max-revoked",
        type=int,
        default=200_000,
        help="the same, all tenants together (what each daemon may have to remember); past nine tenths of it a "
        "tenant holding its share of those nine tenths (over the tenants holding any) or more is refused; "
        "beyond, every tenant's Allocate is RESOURCE_EXHAUSTED until the oldest of them expires (a revocation is "
        "never forgotten early); 0: no limit",
    )
    add_flag(
        p,
        "--tenant-rate",
        type=float,
        default=100.0,
        help="calls a second each tenant may make, and each host besides Register and Heartbeat (ListPool) (bursts "
        "of 10 s worth; admins are never limited; a host's Register and Heartbeat: --host-write-rate, "
        "--host-heartbeat-rate); 0: no limit",
    )
    add_flag(
        p,
        "--auth-fail-rate",
        type=float,
        default=1.0,
        help="failed authentications (unknown API tokens; credentials acting as another host or calling a method "
        "their role may not) a second one source address (an IPv6 /64) may make, in bursts of "
        "10 s worth; beyond, its bad tokens get RESOURCE_EXHAUSTED and the credentials file is read for it at most "
        "once a second until it slows (its good tokens still pass); 0: no limit",
    )
    add_flag(
        p,
        "--host-write-rate",
        type=float,
        default=1.0,
        help="store writes a second each host may cause (its Register calls, its heartbeats that change its "
        "draining state), in bursts of 10 s worth; beyond, RESOURCE_EXHAUSTED (a daemon retries within 5 s; "
        "operators are not limited); 0: no limit",
    )
    add_flag(
        p,
        "--host-heartbeat-rate",
        type=float,
        default=5.0,
        help="heartbeats a second each host may send, in bursts of 10 s worth (a daemon sends one every 2 s: "
        "`gpupool serve --heartbeat-interval`); beyond, RESOURCE_EXHAUSTED before the call's message is parsed "
        "(operators are not limited); 0: no limit",
    )
    add_flag(
        p,
        "--standby",
        action="store_true",
        help="if another scheduler owns the state, wait and take over when it stops (default: refuse to start)",
    )
    return p


class SchedulerServer:
    """A scheduler with its gRPC server, health service, metrics endpoint and housekeeping thread.

    With `config.standby` it listens at once but answers UNAVAILABLE (health NOT_SERVING) until it owns the
    state - the SQLite file's lock, or PostgreSQL's advisory lock - then loads it and serves. A leader that
    loses ownership (its PostgreSQL connection) sets `failed` and must exit.
    """

    def __init__(self, config: SchedulerConfig, key: tokens.Signer | bytes, store: Store | None = None) -> None:
        self.config = config
        self.key = key
        self.metrics = SchedulerMetrics()
        self.store: Store | None = None
        self.core: Core | None = None
        self.failed = threading.Event()
        self.servicer = SchedulerServicer(None, config.policy, HostWriteRate(config.host_write_rate))
        verified = config.tls.verifies_clients
        authn = Authenticator(
            config.credentials,
            verified_certs=verified,
            open_access=config.tls.insecure,
            failures=AuthFailRate(config.auth_fail_rate),
        )
        self.credentials = authn.credentials
        self.servicer.credentials = authn.credentials
        self.servicer.authn = authn
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="sched"),
            # RequestGuard first: it serves the handlers the others make (calls whose request never comes)
            interceptors=[
                RequestGuard(),
                AuthInterceptor(authn, TenantRate(config.tenant_rate), HostBeatRate(config.host_heartbeat_rate)),
                ErrorInterceptor(),
            ],
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.max_concurrent_streams", MAX_STREAMS),
                tls.HANDSHAKE_OPTION,
                # A second scheduler on the same port must fail to start, not share it: gRPC's SO_REUSEPORT let a
                # second `gpupool up` bind 127.0.0.1:50050 beside the first, the kernel splitting the connections
                # between two pools (journey42; the daemon's has had it: server/service.py)
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=MAX_CALLS,
        )
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        tls.add_health(self.server, self.health)  # Check; Watch UNIMPLEMENTED (tls.CheckOnly)
        if store is not None or not config.standby:
            self._lead(store if store is not None else open_store(config.state))
        self.port = tls.add_port(self.server, config.listen, config.tls, "the scheduler")
        if self.port == 0:
            raise GpupoolError(tls.listen_refusal(config.listen, "--listen", "scheduler"))
        self.host = split_address(config.listen)[0]
        self.metrics_port = 0
        self._metrics_http: WSGIServer | None = None
        self._health_server: tuple[grpc.Server, int] | None = None
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="sweeper", daemon=True)

    def _lead(self, store: Store) -> None:
        core_config = CoreConfig(
            lease_ttl=self.config.lease_ttl,
            host_timeout=self.config.host_timeout,
            heartbeat_interval=self.config.heartbeat_interval,
            max_waiters=MAX_WAITERS,
            outage_grace=self.config.outage_grace,
            max_lease_ttl=self.config.max_lease_ttl,
            tenant_max_share=self.config.tenant_max_share,
            tenant_max_waiting=self.config.tenant_max_waiting,
            tenant_max_leases=self.config.tenant_max_leases,
            tenant_max_revoked=self.config.tenant_max_revoked,
            max_revoked=self.config.max_revoked,
        )
        self.store = store
        revoked = self.servicer.authn.revoked if self.servicer.authn is not None else None
        self.core = Core(store, self.key, core_config, self.metrics, revoked)  # (certificates: the authenticator's)
        self.metrics.watch(self.core)
        self.servicer.core = self.core

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> SchedulerServer:
        # (metrics first: one that cannot start, a TLS file refused, leaves no gRPC server behind)
        if self.config.metrics_listen not in ("", "0"):
            host, port = split_address(self.config.metrics_listen)
            plain = self.config.metrics_plaintext
            revoked = self.servicer.authn.revoked if self.servicer.authn is not None else None
            tls_config = None if plain else self.config.tls
            http = serve_metrics(host, port, self.metrics.registry, tls_config, "the scheduler", revoked)
            self._metrics_http = http
            self.metrics_port = http.server_port
        self.server.start()
        self._health_server = tls.serve_health(self.config.health_listen, self.health, "scheduler")
        if self.core is not None:
            self._serve()
        else:
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            threading.Thread(target=self._wait_to_lead, name="standby", daemon=True).start()
        return self

    def _serve(self) -> None:
        assert self.core is not None
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.core.alive()  # from now on a long gap between sweeps counts as a pause of the scheduler
        self._sweeper.start()

    def _wait_to_lead(self) -> None:
        try:
            store = open_store(self.config.state, standby=True)
        except Exception:  # noqa: BLE001 - reported, and the process exits
            log.exception("standby: cannot open the state")
            self.failed.set()
            return
        if self._stop.is_set():
            store.close()
            return
        self._lead(store)
        log.info("leading now: state loaded from %s", _redact(self.config.state))
        self._serve()

    def _sweep_loop(self) -> None:
        assert self.core is not None and self.store is not None
        check = getattr(self.store, "check", None)
        while not self._stop.wait(self.config.sweep_interval):
            try:
                if check is not None:
                    check()
                self.credentials.refresh()  # (an admin token removed: status tokens revoked)
                self.core.sweep()
            except StateOwned as exc:
                log.critical("stepping down: %s", exc)
                self.servicer.core = None  # answer nothing more from a state we no longer own
                self.failed.set()
                return
            except Exception:  # noqa: BLE001 - housekeeping must keep going
                log.exception("sweep failed")

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self._health_server is not None:
            self._health_server[0].stop(0)
        if self._metrics_http is not None:
            stop_metrics(self._metrics_http)
        if self._sweeper.is_alive():
            self._sweeper.join(timeout=2)
        if self.store is not None:
            self.store.close()


def _redact(state: str) -> str:
    """A state location fit for logs: no password of a connection string, in its `user:password@` or as a URI
    parameter (libpq's `password=`, and `sslpassword=` of the client key)."""
    shown = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", state)
    return re.sub(r"([?&][^=&]*password=)[^&]*", r"\1***", shown, flags=re.IGNORECASE)


def config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(
        listen=args.listen,
        state=args.state,
        token_key_file=args.token_key_file,
        metrics_listen=args.metrics_listen,
        metrics_plaintext=args.metrics_plaintext,
        lease_ttl=args.lease_ttl,
        host_timeout=args.host_timeout,
        heartbeat_interval=args.heartbeat_interval,
        policy=Policy(args.policy),
        tls=tls.config_from_args(args),
        credentials=args.credentials,
        health_listen=args.health_listen,
        standby=args.standby,
        outage_grace=args.outage_grace,
        max_lease_ttl=args.max_lease_ttl,
        tenant_max_share=args.tenant_max_share,
        tenant_max_waiting=args.tenant_max_waiting,
        tenant_max_leases=args.tenant_max_leases,
        tenant_max_revoked=args.tenant_max_revoked,
        max_revoked=args.max_revoked,
        tenant_rate=args.tenant_rate,
        auth_fail_rate=args.auth_fail_rate,
        host_write_rate=args.host_write_rate,
        host_heartbeat_rate=args.host_heartbeat_rate,
    )


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("lease_ttl", "host_timeout", "heartbeat_interval", "outage_grace", "max_lease_ttl"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.max_lease_ttl > tokens.MAX_TTL:  # its leases' tokens would be refused by every daemon as too long-lived
        parser.error(f"--max-lease-ttl must be at most {tokens.MAX_TTL:g} s, the longest life of a lease token")
    counts = (args.tenant_max_waiting, args.tenant_max_leases, args.tenant_max_revoked, args.max_revoked)
    if not (0 <= args.tenant_max_share < math.inf) or min(counts) < 0:
        parser.error(
            "--tenant-max-share, --tenant-max-waiting, --tenant-max-leases, --tenant-max-revoked and --max-revoked "
            "must be finite and not negative"
        )
    for flag in ("tenant_rate", "auth_fail_rate", "host_write_rate", "host_heartbeat_rate"):
        if not 0 <= getattr(args, flag) < math.inf:
            parser.error(f"--{flag.replace('_', '-')} must be finite and not negative")
    config = config_from_args(args)
    setup_logging("scheduler", background=True)  # its log lines never wait on stderr (gpupool/logsink.py)
    more_open_files()
    # A port in use, told before the state is opened (until round 55 a busy --metrics-listen was found after the
    # state had been opened and --listen bound, in gpupool/metrics_http.py's own words)
    listens = {"--listen": config.listen, "--metrics-listen": config.metrics_listen,
               "--health-listen": config.health_listen}  # fmt: skip
    busy = tls.first_unbindable(listens)
    if busy:
        log.error("cannot start: %s", tls.listen_refusal(listens[busy], busy, "scheduler"))
        return 1
    try:
        key = tokens.load_signer(config.token_key_file)
        server = SchedulerServer(config, key).start()
    except (GpupoolError, OSError, RuntimeError, sqlite3.Error) as exc:
        log.error("cannot start: %s", exc)
        return 1
    standby = " - standing by until it leads" if server.core is None else ""
    log.info(
        "listening on %s (state %s, lease ttl %gs)%s", server.address, _redact(config.state), config.lease_ttl, standby
    )
    if server.metrics_port:
        scheme = "http" if config.metrics_plaintext or config.tls.insecure else "https"
        host = split_address(config.metrics_listen)[0]
        log.info("metrics on %s://%s:%d/metrics", scheme, host, server.metrics_port)
    signals = StopSignals()  # (no Python in the handler: an Event's set there could wait on its own lock for good)
    while signals.wait(0.5) is None:
        if server.failed.is_set():
            server.stop(grace=0)
            return 3
    log.info("stopping")
    server.stop()
    return 0
