"""`gpupool serve`: run the daemon on a GPU host (real CUDA devices, or fake GPUs on request / without CUDA).

Logs "listening on HOST:PORT" once serving (port 0 picks a free port; parents parse that line).
SIGTERM/SIGINT: health NOT_SERVING, finish received batches, close sessions, exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import signal
import socket
import sys
from typing import TYPE_CHECKING

from gpupool import logsink, pki, tls, tokens
from gpupool.config import (
    StopSignals,
    add_flag,
    more_open_files,
    setup_logging,
    size_arg,
    split_address,
    withheld_features,
)
from gpupool.errors import GpupoolError, InvalidArgument
from gpupool.protocol import COLLECTIVE_PORTS, COLLECTIVE_TRANSPORTS, MAX_HOST_SESSIONS, port_range

from .portshare import PORTS_PER_SESSION, PORTS_PER_TENANT

if TYPE_CHECKING:  # both import torch: main() starts the zygote first (see there)
    from .daemon import DaemonConfig

log = logging.getLogger("gpupool.server")


DEFAULT_PORT = 50051  # --listen's


def default_host_id(listen: str, cert: str = "", join_token: str = "") -> str:
    """The host id of a daemon given none (`--host-id`). A daemon holding a credential of the scheduler is the host
    it names, the only id the scheduler lets it register as: the host its certificate `cert` names
    (`gpupool://host/<name>`), else with a `join_token` (whose name only the scheduler knows) the host name, every
    daemon's default until round 43. Otherwise the host name where it listens on the default port (one daemon a host,
    the deploy units'), else the host name and its port, or 6 random hex digits for port 0 (the port is not known
    yet). Two daemons on one host shared the host name until round 43: the scheduler took the second's Register for
    the first's, and smi and the metrics mixed their devices (their fake GPUs' UUIDs derive from it); ops43's ids
    for daemons with a credential were ids the scheduler refused (opsrev43: a host certificate naming the host name,
    a port other than 50051: PERMISSION_DENIED at every retry)."""
    named = _certificate_host(cert)
    if named:
        return named
    name = socket.gethostname()
    if join_token:
        return name
    try:
        port = split_address(listen)[1]
    except ValueError:
        return name  # (a bad --listen fails where the server binds it, with its own message)
    if port == DEFAULT_PORT:
        return name
    return f"{name}-{port}" if port else f"{name}-{secrets.token_hex(3)}"


def check_host_id(host_id: str, cert: str, scheduler: str, join_token: str = "") -> None:
    """InvalidArgument for an explicit `--host-id` the scheduler would refuse at every Register: another host than
    the one its `--tls-cert` names (`gpupool://host/<name>`), the credential it registers with (no join token). Until
    round 44 such a daemon started, was refused PERMISSION_DENIED every few seconds and never joined the pool."""
    named = _certificate_host(cert)
    if host_id and scheduler and not join_token and named and named != host_id:
        raise InvalidArgument(
            f"--host-id {host_id!r} is not the host the --tls-cert names ({named!r}): the scheduler lets this daemon "
            f"register only as {named!r}; drop --host-id (the certificate's host is the default) or use a "
            f"certificate issued for {host_id!r}"
        )


def _certificate_host(cert: str) -> str:
    """The host a certificate file names (`gpupool://host/<name>`), "" for none (no file, another role, unreadable:
    the TLS setup reports a bad file itself)."""
    if not cert:
        return ""
    try:
        with open(cert, "rb") as f:
            identity = pki.identity_of(f.read(1 << 20))
    except (OSError, ValueError):
        return ""
    return identity[1] if identity is not None and identity[0] == "host" else ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpupool serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flag(p, "--listen", default=f"127.0.0.1:{DEFAULT_PORT}", help="gRPC address HOST:PORT (port 0: any free port)")
    add_flag(p, "--fake-gpus", type=int, default=0, help="serve N CPU-backed fake GPUs (0: real GPUs, else 1 fake)")
    add_flag(p, "--fake-gpu-memory", type=size_arg, default=8 * 1024**3, help="memory of each fake GPU, e.g. 8GiB")
    add_flag(
        p,
        "--token-public-keys",
        help="PEM file of the scheduler's token public key(s) (old and new during a rotation); re-read on change",
    )
    add_flag(p, "--fake-gpu-tflops", type=float, default=0.0, help="speed model: fake GPUs' peak TFLOP/s (0: off)")
    add_flag(p, "--fake-gpu-gbps", type=float, default=0.0, help="speed model: fake GPUs' memory GB/s (0: off)")
    add_flag(p, "--fake-link-gbps", type=float, default=0.0, help="speed model: GB/s between daemons (0: off)")
    add_flag(
        p,
        "--host-id",
        default="",
        help="this daemon's host id, as tokens name it (default: the host --tls-cert names, gpupool://host/<name>, "
        "the only id the scheduler lets it register as; else with --join-token-file the host name; else the host name "
        f"where --listen's port is {DEFAULT_PORT}, the host name and -PORT elsewhere, or -<6 random hex digits> for "
        "port 0: two daemons of one host on different ports never share one, nor their fake GPUs' UUIDs; a port-0 "
        "daemon's changes each start). With --scheduler and no --join-token-file, an id other than the host --tls-cert "
        "names is refused at start; the scheduler refuses (ALREADY_EXISTS) a live host's id from another address",
    )
    tls.add_metrics_flags(p, "127.0.0.1:9450")
    add_flag(
        p,
        "--scheduler",
        default="",
        help="scheduler HOST:PORT[,HOST:PORT...] (HA replicas) to register with; Attach is served once it has answered "
        "a heartbeat (it names the revoked leases: UNAVAILABLE after 5 s while it cannot be reached, at once past 16 "
        "waiting calls)",
    )
    add_flag(p, "--advertise", default="", help="address the scheduler gives clients (default: the listen address)")
    add_flag(p, "--heartbeat-interval", type=float, default=2.0, help="seconds between heartbeats to the scheduler")
    add_flag(
        p,
        "--state-dir",
        default="",
        help="folder (this user's, 0700) where the daemon keeps the revocations its scheduler told it "
        "(revocations.json 0600, HMAC'd with revocations.key): restarted while the scheduler is unreachable, it "
        "refuses the revoked tokens and certificates and serves the others; empty: none, and a restarted daemon "
        "serves no Attach until its scheduler answers",
    )
    add_flag(
        p,
        "--revocations-max-age",
        type=float,
        default=300.0,
        help="seconds: the --state-dir revocations are served on (the scheduler unreachable) only when the scheduler "
        "answered at most this long before they were written (a lease ended later is not in them); 0: never",
    )
    add_flag(p, "--max-message-size", type=size_arg, default=16 * 1024**2, help="largest gRPC message accepted")
    add_flag(p, "--drain-seconds", type=float, default=10.0, help="on SIGTERM, wait this long for queued work")
    add_flag(
        p,
        "--cpu-threads",
        type=int,
        default=0,
        help="torch intra-op CPU threads (0: torch's default; 1: steadier fake GPUs)",
    )
    add_isolation_flags(p)
    add_flag(p, "--log-level", default="INFO", help="logging level")
    add_flag(p, "--join-token-file", default="", help="API token proving this host to the scheduler (no client cert)")
    tls.add_tls_flags(
        p,
        client_auth="auto",
        client_auth_choices=("auto", *tls.CLIENT_AUTH),
        ca_help="PEM CA bundle that verifies the scheduler (and this daemon's clients, without --tls-client-ca)",
        client_ca_help="PEM CA bundle that verifies the certificates of this daemon's clients (sessions, side sockets, "
        "smi, metrics scrapers) under --tls-client-auth require, where they come from another CA than --tls-ca's "
        "(which then verifies only the scheduler; an admin or metrics certificate counts only where --tls-ca signed "
        "it, so name both CAs here for the pool's operators); default: --tls-ca",
        client_auth_help="require every client to present a certificate signed by --tls-client-ca (then revoked "
        "certificates are refused, a lease token attaches only with the certificate it was allocated with, and Status "
        "shows an admin or metrics certificate every session, a tenant its own; deploy/'s units and `gpupool up` "
        "set it), or ask none (for pools whose tenants hold API tokens only, and hand-minted tokens' users without "
        "certificates; warned about at start: lease tokens identify clients, whoever holds one, and Status shows a "
        "caller only the sessions it names; a token bound to a certificate attaches as a bearer's where none is named "
        "here, warned once, and is refused, PERMISSION_DENIED, where auto chose none; "
        "under either, an operator's smi, with the scheduler's admin credential, "
        "presents status tokens that show it every session); auto (the default): require where this daemon proves "
        "itself to its --scheduler with its certificate (TLS, a --tls-ca, no --join-token-file: that scheduler "
        "requires client certificates, so the pool's clients hold them) or a --tls-client-ca is given, none otherwise "
        "(none beside --tls-client-ca does not start)",
    )
    add_flag(p, "--health-listen", default="", help="plaintext HOST:PORT serving only grpc.health.v1 (probes)")
    return p


def add_isolation_flags(p: argparse.ArgumentParser) -> None:
    """Session workers and per-session limits (server/worker.py, server/sandbox.py)."""
    add_flag(
        p,
        "--isolation",
        default="process",
        choices=["process", "thread"],
        help="process: each session in its own sandboxed worker process (a crash ends only that session); "
        "thread: sessions share the daemon process (no isolation)",
    )
    add_flag(
        p,
        "--max-sessions",
        type=_sessions,
        default=64,
        help=f"sessions (worker processes) at once on this host, 1 to {MAX_HOST_SESSIONS} (the most one heartbeat to "
        "the scheduler may name)",
    )
    add_flag(p, "--max-streams-per-tenant", type=int, default=16, help="open session streams of one tenant")
    add_flag(p, "--max-handles", type=int, default=1 << 18, help="handles (live and failed) one session may hold")
    add_flag(
        p,
        "--max-graph-memory",
        type=size_arg,
        default=256 * 1024**2,
        help="host memory one session's captured graphs may hold in all, estimated from their ops, tensor "
        "references, other arguments and inputs (~8 KB an op, 4.5 KB more an argument that is not a tensor); a "
        "definition past it is refused with RESOURCE_EXHAUSTED; "
        "0 turns graph capture off (every definition FAILED_PRECONDITION; eager ops unaffected)",
    )
    add_flag(p, "--max-frame-commands", type=int, default=4096, help="commands in one client frame")
    add_flag(
        p,
        "--max-unread-bytes",
        type=size_arg,
        default=1024**3,
        help="replies of all sessions that their clients have not read yet (host memory); past it, the session "
        "holding the most ends with RESOURCE_EXHAUSTED (0: no limit)",
    )
    add_flag(
        p,
        "--max-queued-bytes",
        type=size_arg,
        default=256 * 1024**2,
        help="commands that all sessions have queued beyond 4 MiB each, waiting for their device (host memory); "
        "past it a session's stream waits for room, as at its own 64 MiB queue (0: no limit)",
    )
    add_flag(
        p,
        "--max-op-flops",
        type=float,
        default=0,
        help="multiply-adds (or like steps: pool windows, polynomial degrees) one op may do (0: 1e12 on fake GPUs, "
        "1e15 on real ones)",
    )
    add_flag(
        p,
        "--worker-memory",
        type=size_arg,
        default=0,
        help="host memory limit of a session worker beyond its start (0: quota + 1GiB on fake GPUs, 4GiB on real)",
    )
    add_flag(
        p,
        "--worker-gpu-margin",
        type=size_arg,
        default=None,
        help="on a real GPU, bytes a session worker's CUDA caching allocator may hold beyond the session's quota "
        "(composite ops' temporaries, the allocator's rounding); past it an allocation is that session's out of "
        "memory (default: an eighth of the quota plus 256MiB; a margin reaching the device's size: no cap)",
    )
    add_flag(
        p,
        "--worker-user",
        default="nobody",
        help="when run as root, session workers drop to this unprivileged user (after their sandbox setup); "
        "'keep' leaves them root (not recommended)",
    )
    add_flag(
        p,
        "--worker-uids",
        default="auto",
        help="when run as root, each session's worker runs as a uid (and gid) of its own instead of --worker-user, "
        "so workers cannot signal, retune or see each other and each is bounded in threads: 'auto' (the default) "
        "(unless --worker-user keep) takes them from 2000000000-2000065535 unless an account, group or "
        "/etc/subuid or /etc/subgid range of the "
        "host is in it (then: --worker-user, with a warning); FIRST-LAST names a range (refused if anything of the "
        "host is in it); daemons of a host share a range (a uid in use is locked under /run/gpupool/worker-uids, "
        "which root must be able to write: else the daemon refuses to start); 'off': every "
        "worker runs as --worker-user",
    )
    add_flag(
        p,
        "--worker-spin-us",
        type=float,
        default=0.0,
        help="microseconds the daemon reads a session worker's result without blocking before it sleeps on it "
        "(a result within it costs the daemon no thread wake-up; each slice longer than it costs that much CPU); "
        "-1: the host decides at each worker's start, 20 on 4+ cores under half load, else 0 (default 0: never)",
    )
    add_flag(
        p,
        "--seccomp",
        type=_on_off,
        default=True,
        shown_as=_on_off_text,
        help="seccomp filter in session workers (on/off)",
    )
    add_flag(
        p,
        "--landlock",
        type=_on_off,
        default=True,
        shown_as=_on_off_text,
        help="Landlock in session workers (on/off): they read only Python's, torch's and the GPU driver's files, "
        "write none, and make TCP connections only when their lease grants network (then on --collective-ports only, "
        "ABI 4+); a kernel without Landlock "
        "(or an older ABI) starts them with what it has and one warning",
    )
    add_flag(
        p,
        "--worker-network",
        type=_on_off,
        default=False,
        help="the upper bound of session workers' network: with on, the workers of sessions whose token grants "
        "network (leases of several devices: torch.distributed collectives between daemons) may open TCP "
        "sockets; with off, no worker may (on/off, default off)",
    )
    add_flag(
        p,
        "--collective-ports",
        type=_ports,
        default=f"{COLLECTIVE_PORTS[0]}-{COLLECTIVE_PORTS[1]}",
        metavar="LOW-HIGH",
        help="TCP ports of collectives between daemons: a session worker granted network (--worker-network) "
        "listens for its group (rank 0's store and secure hub, a rank's store relay) on a free port of this range "
        "and connects to no store or hub port outside it; under Landlock ABI 4+ (Linux 6.7) it may bind and "
        "connect to these ports only (and 53, name lookups; with --collectives gloo, which then needs "
        "--gloo-connect-anywhere on, it connects anywhere and binds these or a port the kernel picks). Give every "
        "daemon of a pool the same range, keep the daemon's own "
        "ports out of it (a port-0 listener's too: where the kernel's ephemeral ports overlap the range, reserve "
        "it with sysctl net.ipv4.ip_local_reserved_ports), and open it between the hosts (the default is below "
        "Linux's ephemeral ports)",
    )
    add_flag(
        p,
        "--collectives",
        type=_transport,
        default="secure",
        metavar="secure|gloo",
        help="transport of torch.distributed collectives between daemons: secure (default) encrypts and "
        "authenticates every link (AES-256-GCM, keys from the lease's tokens; server/seclink.py); gloo is "
        "torch's plaintext gloo (NCCL on real GPUs with --landlock off --seccomp off), faster, readable and "
        "alterable by anyone on the hosts' network: an explicit opt-in for trusted networks (docs/security.md). The "
        "daemons of one job run one version of the secure links (v2 since round 40: a collective's agreement travels "
        "in its first frames)",
    )
    add_flag(
        p,
        "--collective-ports-per-tenant",
        type=int,
        default=PORTS_PER_TENANT,
        metavar="N",
        help=f"the most ports of --collective-ports one tenant's sessions granted network hold on this host at once "
        f"(the daemons of a host count together): each such session holds a block of {PORTS_PER_SESSION} ports of "
        "the range of its own, where its collective groups listen and, under Landlock ABI 4+, the only ports its "
        "worker may bind; past the share a new one is refused (RESOURCE_EXHAUSTED). 0: no share but the range's",
    )
    add_flag(
        p,
        "--gloo-connect-anywhere",
        type=_on_off,
        default=False,
        help="with --collectives gloo and --worker-network on, let session workers granted network connect to any "
        "TCP port of any host (gloo's links dial the ports their peers' kernels picked, which no option confines); "
        "without it (default off) such a daemon does not start on a kernel whose Landlock (ABI 4+, Linux 6.7) would "
        "hold them to --collective-ports (on/off)",
    )
    add_flag(
        p,
        "--bulk-listen",
        default="",
        help="HOST:PORT of the bulk side port (port 0 picks one; [::]:PORT: IPv6 and IPv4): large uploads and "
        "downloads travel on one TLS socket per session there instead of the gRPC stream, and so do the sessions' "
        "frames and replies (docs/wire.md); "
        "empty (default): off",
    )


def _transport(value: str) -> str:
    if value in COLLECTIVE_TRANSPORTS:
        return value
    raise argparse.ArgumentTypeError(f"expected {' or '.join(COLLECTIVE_TRANSPORTS)}, not {value!r}")


def _ports(value: str) -> tuple[int, int]:
    try:
        return port_range(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sessions(value: str) -> int:
    n = int(value)
    if not 1 <= n <= MAX_HOST_SESSIONS:
        raise argparse.ArgumentTypeError(f"{n} sessions: 1 to {MAX_HOST_SESSIONS}")
    return n


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "1", "yes"):
        return True
    if value.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, not {value!r}")


def _on_off_text(value: bool) -> str:
    """How --help shows an on/off flag's default: as it is typed (until round 44 "(default: True)")."""
    return "on" if value else "off"


def config_from_args(args: argparse.Namespace) -> DaemonConfig:
    from .daemon import DaemonConfig
    from .speedmodel import SpeedModel

    tls_config = resolve_client_auth(
        dataclasses.replace(tls.config_from_args(args), api_token_file=args.join_token_file), args.scheduler
    )
    check_host_id(args.host_id, tls_config.cert, args.scheduler, tls_config.api_token_file)
    return DaemonConfig(
        listen=args.listen,
        host_id=args.host_id or default_host_id(args.listen, tls_config.cert, tls_config.api_token_file),
        fake_gpus=args.fake_gpus,
        fake_gpu_memory=args.fake_gpu_memory,
        fake_speed=SpeedModel(args.fake_gpu_tflops, args.fake_gpu_gbps, args.fake_link_gbps),
        token_key=tokens.load_verifier(args.token_public_keys),
        health_listen=args.health_listen,
        tls=tls_config,
        metrics_listen=args.metrics_listen,
        metrics_plaintext=args.metrics_plaintext,
        scheduler=args.scheduler,
        advertise=args.advertise,
        heartbeat_interval=args.heartbeat_interval,
        state_dir=args.state_dir,
        revocations_max_age=args.revocations_max_age,
        max_message_bytes=args.max_message_size,
        drain_seconds=args.drain_seconds,
        cpu_threads=args.cpu_threads,
        isolation=args.isolation,
        max_sessions=args.max_sessions,
        max_streams_per_tenant=args.max_streams_per_tenant,
        max_handles=args.max_handles,
        max_graph_memory=args.max_graph_memory,
        max_frame_commands=args.max_frame_commands,
        max_unread_bytes=args.max_unread_bytes,
        max_queued_bytes=args.max_queued_bytes,
        max_op_flops=int(args.max_op_flops),
        worker_memory=args.worker_memory,
        worker_gpu_margin=-1 if args.worker_gpu_margin is None else args.worker_gpu_margin,
        worker_user=args.worker_user,
        worker_uids=args.worker_uids,
        worker_spin_us=args.worker_spin_us,
        seccomp=args.seccomp,
        landlock=args.landlock,
        worker_network=args.worker_network,
        collectives=args.collectives,
        collective_ports=args.collective_ports,
        gloo_connect_anywhere=args.gloo_connect_anywhere,
        collective_ports_per_tenant=args.collective_ports_per_tenant,
        bulk_listen=args.bulk_listen,
    )


def resolve_client_auth(cfg: tls.TlsConfig, scheduler: str) -> tls.TlsConfig:
    """`--tls-client-auth auto` (serve's default since round 47) made `require` or `none`: `require` where the daemon
    proves itself to its scheduler with its certificate (TLS, a `--scheduler`, a `--tls-ca`, no `--join-token-file`).
    Its scheduler sees client certificates then (a scheduler under `none` asks for none, and the daemon would have no
    credential), and a scheduler requires them from everyone or no one, so every tenant and operator of that pool
    holds one (`gpupool run`, the clients and smi present it: `gpupool up` and deploy/'s units require them). `none`
    elsewhere: an API-token pool's daemon joins with a token and its tenants may have no certificate, and a daemon
    without a scheduler serves hand-minted tokens whose users may have none (README). Until round 47 the default was
    `none` everywhere, so a certificate pool's daemon started without the flag refused no revoked certificate and
    held no lease token to its certificate. Clients' certificates are verified by --tls-client-ca where it is given
    (round 48: a pool whose client certificates come from another CA; until then only by naming both CAs in
    --tls-ca, which made the daemon trust the clients' CA for its scheduler too), else by --tls-ca; a --tls-client-ca
    makes `auto` `require` wherever the daemon joins (secrev48: with a join token, or no scheduler, round 48 made it
    `none`, so the flag verified nobody), and `none` beside it does not start (`tls.CLIENT_CA_UNUSED`).
    The choice's reason goes with it (`TlsConfig.client_auth_auto`, round 49): the daemon refuses a certificate-bound
    lease token where `auto` chose `none` (no client can show the certificate; `Daemon.check_bound`), and takes it as
    a bearer's only where the operator named `--tls-client-auth none` (warts48 took it so everywhere, warned once)."""
    if cfg.client_auth != "auto":
        return cfg
    if cfg.insecure:
        why = "--insecure: no TLS, no client certificate"
    elif cfg.client_ca:
        why = "--tls-client-ca names the CA of this daemon's clients' certificates"
    elif not scheduler:
        why = "this daemon has no --scheduler (hand-minted tokens' users may hold no certificate)"
    elif cfg.api_token_file:
        why = "this daemon joins its scheduler with --join-token-file (an API-token pool's tenants hold no certificate)"
    elif not cfg.ca:
        why = "this daemon has no --tls-ca to verify a client certificate with"
    else:
        why = (
            "this daemon proves itself to its --scheduler with its certificate, so the pool's clients hold certificates"
        )
    by_cert = not cfg.insecure and (
        bool(cfg.client_ca) or (bool(cfg.ca) and bool(scheduler) and not cfg.api_token_file)
    )
    return dataclasses.replace(cfg, client_auth="require" if by_cert else "none", client_auth_auto=f"auto: {why}")


def client_auth_warning(cfg: tls.TlsConfig) -> str:
    """What a TLS daemon that asks no client for a certificate (`--tls-client-auth none`, or `auto` without a
    certificate's scheduler link: `resolve_client_auth`) cannot do, said once at its start (round 46); "" for one that
    requires them, or `--insecure` (said elsewhere). A pool whose tenants hold only API tokens (its scheduler under
    `none`) has no certificate to present, and a daemon serving hand-minted tokens may have no --tls-ca. The units in
    deploy/ and `gpupool up` require."""
    if cfg.insecure or cfg.verifies_clients:
        return ""
    if cfg.client_auth_auto:
        named, bound = (
            f"--tls-client-auth auto chose none ({cfg.client_auth_auto.removeprefix('auto: ')})",
            "refuses a lease token bound to the certificate it was allocated with (PERMISSION_DENIED: no client can "
            "show that certificate here; --tls-client-auth none would take such tokens as bearer tokens)",
        )
    else:
        named, bound = (
            "--tls-client-auth none",
            "cannot hold a lease token to the certificate it was allocated with (any holder of a token attaches it)",
        )
    return (
        f"{named}: this daemon asks no client for a certificate, so it cannot refuse a revoked one (gpupool cert "
        f"revoke), {bound}, and shows a tenant's certificate none of its sessions; where every client holds a "
        "certificate of the pool's CA (the scheduler's default, --tls-client-auth require, means they do), start it "
        "with --tls-client-auth require (docs/security.md, 'Known limits')"
    )


def wait_for_stop(signals: StopSignals) -> None:
    """Until SIGINT or SIGTERM, then its line: logged here, in the main thread's own code, never in a signal handler
    (`StopSignals`: a handler that logged deadlocked on the log sink's lock)."""
    signum = signals.wait()
    log.info("got %s: draining", signal.Signals(signum or signal.SIGTERM).name)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from .sandbox import not_dumpable  # (imports no torch)

    not_dumpable()  # before any credential is read: a same-uid worker cannot read this process's memory (round 41)
    setup_logging("gpupool-serve", args.log_level, background=True)
    more_open_files()  # every connection holds a descriptor before any credential (round 37)
    try:
        withheld_features()  # $GPUPOOL_WITHHOLD_FEATURES (docs/wire.md, "Features"): a bad name is one line
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    # A flag mix that cannot start, told now rather than after the zygote's and this process's torch imports
    # (tens of seconds on a loaded machine; round 47: the README's hand-minted-token daemon said it 40 s later).
    clients_ca = args.tls_client_ca or args.tls_ca
    problem = tls.metrics_flags_problem(args.metrics_listen, args.metrics_plaintext, args.insecure, clients_ca)
    if not problem and args.tls_client_ca and args.tls_client_auth == "none" and not args.insecure:
        problem = tls.CLIENT_CA_UNUSED
    if problem:
        log.error("cannot start: %s", problem)
        return 2
    # A port in use, told before the zygote's start too (round 54: 6-13 s later, after the zygote's torch import)
    listens = {"--listen": args.listen, "--bulk-listen": args.bulk_listen, "--metrics-listen": args.metrics_listen,
               "--health-listen": args.health_listen}  # fmt: skip
    busy = tls.first_unbindable(listens)
    if busy:
        log.error("cannot start: %s", tls.listen_refusal(listens[busy], busy, "daemon"))
        return 1
    if args.isolation == "process":
        from .zygote import shared_zygote  # (imports no torch)

        # First thing: the zygote imports torch (and warms up) while this process imports it for the config and
        # the daemon below, two processes at once instead of one after the other. Nothing above may import torch
        # (tests/unit/test_protocol.py `test_gpupool_serve_starts_its_zygote_before_it_imports_torch`); a config
        # error below ends the zygote with this process.
        shared_zygote()
    try:
        config = config_from_args(args)
    except GpupoolError as exc:
        log.error("%s", exc)
        return 2
    warning = client_auth_warning(config.tls)
    if warning:
        log.warning("%s", warning)
    elif config.tls.verifies_clients and args.tls_client_auth == "auto":
        log.info(
            "--tls-client-auth auto: require (this daemon proves itself to its scheduler with its certificate, so "
            "the pool's clients hold certificates; --tls-client-auth none serves clients without one)"
        )
    from .app import RunningDaemon

    try:
        running = RunningDaemon(config)
    except (OSError, RuntimeError, GpupoolError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    wait_for_stop(StopSignals())
    running.stop()
    # Stopped: servers down, sessions closed, workers told; the zygote ends when our end of its socket closes. Leave
    # without the interpreter's teardown, which spent 1.5-2 s collecting torch's objects before the process ended
    # (supervisors and `gpupool up` wait for that exit). Logs and output are flushed first.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if logsink.PUMP is not None:  # what reached descriptor 2 (the zygote's forwarded lines, C output) written out:
        logsink.PUMP.drain()  # os._exit runs no atexit handler
    os._exit(0)
