"""TLS and credentials for every gRPC link, in one place: the flags, server ports, client channels.

Servers (`gpupool serve`, `gpupool scheduler`) listen with TLS by default: `--tls-cert/--tls-key` (their
certificate, reloaded from disk on the next handshake after it changes: rotate by replacing the files) and
`--tls-ca` (the CA that verifies clients' certificates, where client certificates are required; a daemon's
`--tls-client-ca` names another for its clients, its `--tls-ca` then verifying only its scheduler). Plaintext only
with `--insecure`, which logs a warning.

Clients (the library, `gpupool run/smi`, sessions, a daemon talking to its scheduler) take the same variables:
GPUPOOL_TLS_CA verifies the server; GPUPOOL_TLS_CERT/GPUPOOL_TLS_KEY, when set, are its client certificate;
GPUPOOL_API_TOKEN_FILE (or GPUPOOL_API_TOKEN) is a bearer credential sent as `authorization` metadata;
GPUPOOL_INSECURE=1 connects in plaintext; GPUPOOL_TLS_VERIFY_HOST_ID=1 makes sessions check that a daemon's
certificate carries its host id as a DNS name (instead of the address dialled: what Kubernetes deployments use).
`client_env()` is what `gpupool up` prints and `gpupool run` passes on.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import socket
import ssl
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from gpupool import pki
from gpupool.config import UnsafeFile, add_flag, env_name, open_trusted, split_address
from gpupool.errors import ErrorInterceptor, InvalidArgument

log = logging.getLogger(__name__)
plaintext_channel = grpc.insecure_channel  # the only plaintext channel: servers started with --insecure

TOKEN_METADATA = "authorization"
CLIENT_AUTH = ("require", "none")
_TRUE = ("1", "true", "yes", "on")
# The client certificates' roles that operate a pool (a daemon's Status shows them every session, its metrics port
# serves them): believed only from the pool's CA where a daemon's clients have a CA of their own (`TlsConfig.believed`).
OPERATOR_ROLES = ("admin", "metrics")
CLIENT_CA_UNUSED = (
    "--tls-client-ca names the CA of client certificates that --tls-client-auth none never asks for (no client's "
    "certificate would be verified): drop one, or --tls-client-auth require/auto"
)


@dataclass(frozen=True)
class TlsConfig:
    """One program's TLS settings. For a server: its certificate; for a client: its (optional) client certificate.
    `ca` verifies the peer. `client_auth` (servers): "require" a client certificate signed by `clients_ca`, or "none".
    `client_ca` (a daemon's `--tls-client-ca`): the CA of its clients' certificates where it is not `ca`, which then
    verifies only the servers this program dials (a daemon's scheduler).
    `env_token`: without `api_token_file`, $GPUPOOL_API_TOKEN is the bearer token (`client_config`, a tenant's
    settings from its environment); a configuration made by a program for itself (a daemon's to its scheduler,
    `gpupool up`'s) names its token file or has none, whatever token the environment it was started in holds."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    insecure: bool = False
    client_auth: str = "none"
    api_token_file: str = ""
    env_token: bool = False
    client_ca: str = ""
    # Why `client_auth` is what it is where `--tls-client-auth auto` chose it (server/cli.py `resolve_client_auth`:
    # "auto: ..."); "" where it was named (a flag, `gpupool up`, a program's own configuration). A daemon takes a
    # certificate-bound lease token as a bearer's only where `none` was named (round 49: `Daemon.check_bound`).
    client_auth_auto: str = ""

    @property
    def clients_ca(self) -> str:
        """The CA bundle that verifies a server's clients: `client_ca`, else `ca` (round 48: until then `ca` alone, so
        a daemon that accepted client certificates of another CA trusted that CA for its scheduler too)."""
        return self.client_ca or self.ca

    def believed(self, cert: x509.Certificate) -> set[tuple[str, str]]:
        """The gpupool identities (role, name) a server of this configuration believes of a client certificate its
        handshake verified: every one it names, but none of one naming an operator (`OPERATOR_ROLES`: admin,
        metrics) that `ca` did not sign where `client_ca` is another CA (a daemon's --tls-client-ca). The clients'
        CA is trusted for who its clients are, tenants; the pool's (--tls-ca, `gpupool up`'s and `gpupool cert`'s)
        for who operates it: its admin certificates reach such a daemon where --tls-client-ca names both CAs. Round 48
        (sec48) believed an admin certificate of the clients' CA as written: every session's usage in Status, the
        metrics port (secrev48)."""
        named = set(pki.identities(cert))
        if self.client_ca and any(role in OPERATOR_ROLES for role, _ in named):
            try:
                pool_ca = _read(self.ca, CA) if self.ca else b""
            except InvalidArgument:
                pool_ca = b""
            if not pki.issued_by_bundle(cert, pool_ca):
                return set()
        return named

    @property
    def verifies_clients(self) -> bool:
        """Whether a server of this configuration asks for, checks and so sees its clients' certificates (TLS with
        `--tls-client-auth require`): only then do names and revocations of client certificates apply."""
        return not self.insecure and self.client_auth == "require"

    def check_client_auth(self) -> None:
        """Refuse a `client_auth` that is not a server's setting: `--tls-client-auth auto` is `serve`'s flag, which
        server/cli.py `resolve_client_auth` makes `require` or `none` (and says why, `client_auth_auto`) before the
        daemon is built. Until round 50 (secrev50) a configuration built in code with "auto" left as it was asked no
        client for a certificate and took certificate-bound lease tokens as a bearer's (`Daemon.check_bound` read it
        as a named `none`); now the daemon and every TLS server refuse it at their start (INVALID_ARGUMENT)."""
        if self.client_auth not in CLIENT_AUTH:
            raise InvalidArgument(
                f"--tls-client-auth {self.client_auth!r} is not a server's setting: a server requires client "
                "certificates or not (require, none); serve's auto is resolved to one of them before its daemon "
                "starts (server/cli.py resolve_client_auth)"
            )

    def check_server(self) -> None:
        self.check_client_auth()
        if self.insecure:
            return
        if not (self.cert and self.key):
            raise InvalidArgument(
                "TLS needs --tls-cert and --tls-key (or GPUPOOL_TLS_CERT/GPUPOOL_TLS_KEY); `gpupool up` makes them; "
                "--insecure serves plaintext"
            )
        if self.client_ca and self.client_auth == "none":
            raise InvalidArgument(CLIENT_CA_UNUSED)
        if self.client_auth == "require" and not self.clients_ca:
            raise InvalidArgument("--tls-client-auth require needs --tls-ca (the CA that signs client certificates)")
        for path in (self.cert, self.key, self.ca, self.client_ca):
            if path and not Path(path).is_file():
                raise InvalidArgument(f"TLS file {path} does not exist")


def add_tls_flags(
    parser: argparse.ArgumentParser,
    *,
    client_auth: str | None = None,
    client_auth_help: str = "require clients to present a certificate signed by --tls-ca, or not (then tokens identify "
    "them)",
    client_auth_choices: tuple[str, ...] = CLIENT_AUTH,
    ca_help: str = "PEM CA bundle that verifies peers",
    client_ca_help: str = "",
) -> None:
    """--tls-cert, --tls-key, --tls-ca, --insecure (and --tls-client-auth where `client_auth` gives its default,
    --tls-client-ca where `client_ca_help` is its help)."""
    add_flag(parser, "--tls-cert", default="", help="PEM certificate of this program (reloaded when the file changes)")
    add_flag(parser, "--tls-key", default="", help="PEM private key of --tls-cert")
    add_flag(parser, "--tls-ca", default="", help=ca_help)
    if client_ca_help:
        add_flag(parser, "--tls-client-ca", default="", help=client_ca_help)
    add_flag(parser, "--insecure", action="store_true", help="plaintext gRPC without TLS (unsafe: testing only)")
    if client_auth is not None:
        add_flag(
            parser,
            "--tls-client-auth",
            default=client_auth,
            choices=client_auth_choices,
            help=client_auth_help,
        )


def add_metrics_flags(parser: argparse.ArgumentParser, default: str) -> None:
    """--metrics-listen (default `default`) and --metrics-plaintext: the daemon's and the scheduler's /metrics
    endpoint (gpupool/metrics_http.py), HTTPS with --tls-cert to scrapers' client certificates of --tls-ca."""
    add_flag(
        parser,
        "--metrics-listen",
        default=default,
        help="Prometheus metrics HOST:PORT ('0': off): HTTPS with --tls-cert, to client certificates signed by "
        "--tls-ca (and in a daemon's --tls-client-ca bundle where given) naming a metrics or admin identity "
        "(docs/metrics.md)",
    )
    add_flag(
        parser,
        "--metrics-plaintext",
        action="store_true",
        help="serve metrics in plaintext HTTP to anyone who reaches the port (every tenant's names and usage; "
        "--insecure does too)",
    )


METRICS_NEED_CA = (
    "metrics over TLS need --tls-ca (the CA of the scrapers' client certificates); --metrics-plaintext serves them "
    "in plaintext, --metrics-listen 0 turns them off"
)


def metrics_flags_problem(listen: str, plaintext: bool, insecure: bool, ca: str) -> str:
    """Why --metrics-listen LISTEN cannot be served with these flags (`METRICS_NEED_CA`), or "": what
    gpupool/metrics_http.py's `metrics_tls` refuses, told from the flags alone, so that a program says it before its
    slow start (round 47: `gpupool serve` as the README wrote it said it 40 s later, after its torch imports)."""
    return METRICS_NEED_CA if listen not in ("", "0") and not plaintext and not insecure and not ca else ""


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    """The client side: --tls-ca, --tls-cert, --tls-key, --api-token-file, --insecure (all also GPUPOOL_*)."""
    add_flag(parser, "--tls-ca", default="", help="PEM CA bundle that verifies the scheduler and daemons")
    add_flag(parser, "--tls-cert", default="", help="PEM client certificate (mutual TLS), with --tls-key")
    add_flag(parser, "--tls-key", default="", help="PEM private key of --tls-cert")
    add_flag(parser, "--api-token-file", default="", help="file with this tenant's API token")
    add_flag(parser, "--insecure", action="store_true", help="plaintext gRPC (only against --insecure servers)")


def export_client_args(args: argparse.Namespace) -> None:
    """Put the client flags into os.environ, where the library (and child processes) read them."""
    cfg = TlsConfig(args.tls_cert, args.tls_key, args.tls_ca, bool(args.insecure), api_token_file=args.api_token_file)
    os.environ.update(client_env(cfg))


def config_from_args(args: argparse.Namespace) -> TlsConfig:
    return TlsConfig(
        cert=args.tls_cert,
        key=args.tls_key,
        ca=args.tls_ca,
        insecure=bool(args.insecure),
        client_auth=getattr(args, "tls_client_auth", "none"),
        client_ca=getattr(args, "tls_client_ca", ""),
    )


def client_config(**overrides: Any) -> TlsConfig:
    """A client's settings from GPUPOOL_TLS_CA/_CERT/_KEY, GPUPOOL_INSECURE, GPUPOOL_API_TOKEN_FILE (overridable)."""
    env = os.environ
    base: dict[str, Any] = {
        "cert": env.get("GPUPOOL_TLS_CERT", ""),
        "key": env.get("GPUPOOL_TLS_KEY", ""),
        "ca": env.get("GPUPOOL_TLS_CA", ""),
        "insecure": env.get("GPUPOOL_INSECURE", "").strip().lower() in _TRUE,
        "api_token_file": env.get("GPUPOOL_API_TOKEN_FILE", ""),
        "env_token": True,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TlsConfig(**base)


def client_env(cfg: TlsConfig) -> dict[str, str]:
    """The environment variables that hand `cfg` to a child process (empty values omitted)."""
    out = {
        "GPUPOOL_TLS_CA": cfg.ca,
        "GPUPOOL_TLS_CERT": cfg.cert,
        "GPUPOOL_TLS_KEY": cfg.key,
        "GPUPOOL_API_TOKEN_FILE": cfg.api_token_file,
    }
    if cfg.insecure:
        out[env_name("--insecure")] = "1"
    return {k: str(v) for k, v in out.items() if v}


KEY, CA, TOKEN = "TLS private key", "TLS CA bundle", "API token file"
SECRETS = (KEY, TOKEN)  # refused also when other users may read them


def _read(path: str, what: str = "") -> bytes:
    """The bytes of a TLS or token file; `what` (KEY, CA, TOKEN) checks it as opened first (`_open`). InvalidArgument
    with one line when it cannot be read or is refused."""
    if what:
        fd = _open(path, what)
        with os.fdopen(fd, "rb") as f:
            return f.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from exc


def _open(path: str, what: str) -> int:
    """A descriptor of the private key (KEY) or CA bundle (CA) at `path`, refused (InvalidArgument, one line) when a
    user other than its owner may write it, or, a key, read it (config.open_trusted: checked on the file as opened).
    Until round 32 gRPC and the side sockets read them whatever their mode: whoever could write the CA bundle made
    this program trust a CA of their own (a daemon accepting any client certificate they minted, a client any
    server), whoever could read a key could pose as its holder. An API token file (TOKEN: `GPUPOOL_API_TOKEN_FILE`,
    a daemon's `--join-token-file`) is a secret as a key is: until round 33 it was read whatever its mode, and a token
    other users may read is one they may present (refused as a key is, not warned about: see docs/security.md)."""
    try:
        return open_trusted(path, what, secret=what in SECRETS)
    except UnsafeFile as exc:
        raise InvalidArgument(str(exc)) from exc
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from exc


@contextlib.contextmanager
def _opened(path: str, what: str) -> Iterator[str]:
    """`path` checked as `_open` does, named as opened (`/proc/self/fd/N`) for a library that reads files by name
    (`ssl`): no rename between the check and the read changes what is read."""
    fd = _open(path, what)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


# ---- servers ----


class _Reloader:
    """The certificate config fetcher: gRPC calls it before every handshake; it answers a new configuration when
    the certificate, key or CA file changed on disk (new connections use it; open ones keep theirs)."""

    def __init__(self, cfg: TlsConfig) -> None:
        self.cfg = cfg
        self._stamp = self._stat()
        self._refused: tuple[tuple[int, int, int], ...] | None = None  # files that failed to load (said once)

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in (self.cfg.cert, self.cfg.key, self.cfg.clients_ca):
            try:
                st = os.stat(p) if p else None
            except OSError:
                st = None
            out.append((st.st_ino, st.st_mtime_ns, st.st_size) if st else (0, 0, 0))
        return tuple(out)

    def load(self) -> grpc.ServerCertificateConfiguration:
        pair = [(_read(self.cfg.key, KEY), _read(self.cfg.cert))]
        ca = _read(self.cfg.clients_ca, CA) if self.cfg.clients_ca else None
        return grpc.ssl_server_certificate_configuration(pair, root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._stat()
        if stamp in (self._stamp, self._refused):
            return None
        try:
            config = self.load()
        except Exception as exc:  # noqa: BLE001 - a half-written file, a key others may read: keep the old ones
            log.warning("TLS files changed but cannot be loaded (keeping the old ones): %s", exc)
            self._refused = stamp  # tried again when they change again, not at every handshake
            return None
        self._stamp = stamp
        log.info("TLS certificate reloaded from %s", self.cfg.cert)
        return config


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials:
    cfg.check_server()
    reloader = _Reloader(cfg)
    return grpc.dynamic_ssl_server_credentials(
        reloader.load(),
        reloader,  # type: ignore[arg-type]  # None means "keep the current one" (grpc's documented contract)
        require_client_authentication=cfg.client_auth == "require",
    )


# A connection that has not finished its TLS handshake (and HTTP/2 preface) this long after its accept is closed
# (gRPC's default: 120 s). Each one holds a descriptor: until round 37 1,100 connections that sent nothing, from
# anyone, took every descriptor of a scheduler or daemon under the usual soft limit of 1,024 (systemd's) for two
# minutes at a time, and every new connection was refused (`config.more_open_files` raises that limit too).
HANDSHAKE_SECONDS = 10.0
HANDSHAKE_OPTION = ("grpc.server_handshake_timeout_ms", round(HANDSHAKE_SECONDS * 1000))


def _unbindable(address: str) -> bool:
    """Whether no address `address` resolves to can be bound (each in use, or not this machine's), tried as gRPC binds
    (SO_REUSEADDR, no SO_REUSEPORT) on sockets closed at once: a port already bound (0 asks for none) is told before
    gRPC tries it, whose core printed "E... add_port.cc:83] Failed to add port to server: ... Address already in
    use" to descriptor 2 ahead of the caller's one-line reason (round 53; no GRPC_VERBOSITY silences one line of one
    call). What this cannot tell (a name that does not resolve, a port taken between the two) is gRPC's to find."""
    try:
        host, port = split_address(address)
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE) if port else []
    except (ValueError, OSError):
        return False
    for family, kind, proto, _, where in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(where)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    continue
            return False
    return bool(found)


def listen_refusal(address: str, flag: str, other: str, more: str = "") -> str:
    """The one line of a program whose `flag` address cannot be bound (`first_unbindable` before its start, `add_port`
    and the metrics and health servers at their binds; `gpupool up` too, `more` its second pool's flags): `other`, who
    most likely holds the port ("daemon", "scheduler", "program"). A metrics flag's says that 0 turns metrics off
    (until round 55 a busy --metrics-listen of the scheduler got gpupool/metrics_http.py's own wording, `up` one
    more, and a busy --health-listen "cannot listen on ADDRESS" alone)."""
    off = "; 0: no metrics" if "metrics" in flag else "; 0: no health port" if "health" in flag else ""
    return (
        f"cannot listen on {address} ({flag}): the port is in use (another {other}, a second pool on this host?) or "
        f"the host is not this machine's; pass another {flag} HOST:PORT (port 0: a free one{off}){more}"
    )


def first_unbindable(listens: dict[str, str]) -> str:
    """The first flag of `listens` (flag: its HOST:PORT; "", "0" and port 0 skipped) whose address cannot be bound
    (`_unbindable`), "" when none: told at a program's start, before its slow part (round 54: a daemon on a busy
    --listen said so after its zygote had imported torch, 6-13 s; `gpupool up` after its scheduler had started)."""
    return next((flag for flag, address in listens.items() if address not in ("", "0") and _unbindable(address)), "")


def add_port(server: grpc.Server, address: str, cfg: TlsConfig, program: str) -> int:
    """Bind `address` with TLS (or plaintext with cfg.insecure, warning); the bound port, 0 on failure (grpcio
    raises "Failed to bind to address ...; set GRPC_VERBOSITY=debug ...": the callers name the fix instead; a port
    in use is found first, without gRPC's line: `_unbindable`)."""
    if _unbindable(address):
        return 0
    try:
        if cfg.insecure:
            log.warning("%s serves PLAINTEXT gRPC on %s (--insecure): tokens and data cross the network readable",
                        program, address)  # fmt: skip
            return server.add_insecure_port(address)
        return server.add_secure_port(address, server_credentials(cfg))
    except RuntimeError as exc:
        if "Failed to bind" not in str(exc):
            raise
        return 0


class CheckOnly:
    """The methods of a grpc.health.v1 servicer (`add_health`): `servicer`'s Check, and Watch UNIMPLEMENTED. Probes
    ask Check. A Watch is a call that stays open: on the plaintext health port it held one of the server's two
    threads for as long as its caller liked, so two of them, from anyone who reaches that unauthenticated port,
    starved every probe (their Checks waited past their deadlines, the kubelet restarted a healthy program) until
    round 33; on the scheduler's and the daemon's TLS ports (gRPC's non-blocking Watch, no thread held) each one
    still counted among their calls in progress (128, 248), and that many from anyone who completed a TLS handshake
    refused every call there (RESOURCE_EXHAUSTED) until round 37. Nothing of gpupool watches."""

    def __init__(self, servicer: Any) -> None:
        self.servicer = servicer

    def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - grpc's method name
        return self.servicer.Check(request, context)

    def Watch(self, request: Any, context: Any) -> Any:  # noqa: N802 - grpc's method name
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not served (probes use Check)")


def add_health(server: grpc.Server, servicer: Any) -> None:
    """`servicer`'s Check (and Watch UNIMPLEMENTED: `CheckOnly`) on `server`."""
    from grpc_health.v1 import health_pb2_grpc

    class HealthCheckOnly(CheckOnly, health_pb2_grpc.HealthServicer):  # type: ignore[misc]
        """CheckOnly, the other methods (List) UNIMPLEMENTED."""

    health_pb2_grpc.add_HealthServicer_to_server(HealthCheckOnly(servicer), server)


# The plaintext health port: its threads, and how many of them calls of one source (and all) may hold waiting for
# their request message (callguard.RequestGuard: until round 37 two calls that sent their headers and never their
# message, from anyone who reaches the port, held both of its threads and starved the probes, as Watch had).
HEALTH_WORKERS = 8
HEALTH_PER_SOURCE = 2
HEALTH_TOTAL = 4
HEALTH_REQUEST_SECONDS = 5.0


def serve_health(address: str, servicer: Any, other: str = "program") -> tuple[grpc.Server, int] | None:
    """A plaintext gRPC server with only `servicer`'s Check (grpc.health.v1, the program's own status) on `address`,
    for probes that cannot speak TLS (Kubernetes' grpc probes). None when `address` is empty or "0". A port taken
    since the program's check at its start: `listen_refusal` naming `other` as that check does ("daemon",
    "scheduler"; until round 56 "program" here)."""
    if address in ("", "0"):
        return None
    from concurrent import futures

    from gpupool.callguard import RequestGuard

    # ErrorInterceptor: a request that does not parse is answered INVALID_ARGUMENT (gRPC's own answer: INTERNAL)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=HEALTH_WORKERS, thread_name_prefix="health"),
        interceptors=[RequestGuard(HEALTH_REQUEST_SECONDS, HEALTH_PER_SOURCE, HEALTH_TOTAL), ErrorInterceptor()],
        options=[("grpc.so_reuseport", 0)],  # a second program on the port fails to start, not shares it
    )
    add_health(server, servicer)
    port = 0 if _unbindable(address) else server.add_insecure_port(address)
    if port == 0:
        raise OSError(listen_refusal(address, "--health-listen", other))
    server.start()
    log.info("health checks (plaintext, grpc.health.v1 only) on %s", address.rsplit(":", 1)[0] + f":{port}")
    return server, port


# ---- clients ----


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):  # fmt: skip
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self._md = (TOKEN_METADATA, f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        md = list(details.metadata or ()) + [self._md]
        return details._replace(metadata=md) if hasattr(details, "_replace") else _Details(details, md)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = tuple(metadata)
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def api_token(cfg: TlsConfig) -> str:
    """The bearer token: the file's first line, else $GPUPOOL_API_TOKEN (`cfg.env_token`); empty when neither. The file
    is checked as a private key is (`_open`): InvalidArgument when other users may read or write it."""
    if cfg.api_token_file:
        return _read(cfg.api_token_file, TOKEN).decode(errors="replace").strip()
    return os.environ.get("GPUPOOL_API_TOKEN", "").strip() if cfg.env_token else ""


def channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials:
    root = _read(cfg.ca, CA) if cfg.ca else None
    if bool(cfg.cert) != bool(cfg.key):
        raise InvalidArgument("a client certificate needs both GPUPOOL_TLS_CERT and GPUPOOL_TLS_KEY")
    key = _read(cfg.key, KEY) if cfg.key else None
    chain = _read(cfg.cert) if cfg.cert else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)


def unreachable(message: str, cfg: TlsConfig | None = None) -> str:
    """Why a client did not reach a server, from gRPC's `message`, and what to do, in a line. Until round 52 it was
    gRPC's words and, only without a CA, a TLS hint: "Connection refused ... (TLS: set GPUPOOL_TLS_CA ...)" where no
    pool ran, a bare "Socket closed" where the scheduler refused a client without a certificate or with another
    pool's, "CERTIFICATE_VERIFY_FAILED" with another pool's CA."""
    cfg = cfg or client_config()
    up = "as `gpupool up` prints"
    connecting = "failed to connect to all addresses" in message  # (no connection made: not a call cut short)
    if connecting and "Connection refused" in message:
        return (
            "nothing listens there: no pool runs there (`gpupool up` starts one), or it is elsewhere "
            f"(GPUPOOL_SCHEDULER, {up})"
        )
    if cfg.insecure or not connecting:
        return message + hint(cfg)
    if "CERTIFICATE_VERIFY_FAILED" in message:
        if not cfg.ca:
            return (
                "its certificate is of a CA this client does not know: set GPUPOOL_TLS_CA to the pool's CA, and "
                f"GPUPOOL_TLS_CERT/_KEY, {up}"
            )
        return f"its certificate is not of the CA in {cfg.ca} (GPUPOOL_TLS_CA: another pool's?): set this pool's, {up}"
    if "Socket closed" in message or "Connection reset" in message:  # (the server ended the TLS handshake)
        if not cfg.cert:
            return (
                "it closed the TLS connection: it admits clients with a certificate of its CA only: set "
                f"GPUPOOL_TLS_CERT and GPUPOOL_TLS_KEY, {up}"
            )
        return (
            f"it closed the TLS connection: it did not take the client certificate {cfg.cert} (GPUPOOL_TLS_CERT: "
            f"another pool's?): set this pool's, {up}"
        )
    return message + hint(cfg)


def hint(cfg: TlsConfig | None = None) -> str:
    """What to check when a TLS connection fails: said after "unreachable" errors of clients."""
    cfg = cfg or client_config()
    if cfg.insecure:
        return " (connecting in plaintext: GPUPOOL_INSECURE is set)"
    if not cfg.ca:
        return " (TLS: set GPUPOOL_TLS_CA to the pool's CA, and GPUPOOL_TLS_CERT/_KEY, as `gpupool up` prints)"
    return ""


def verify_host_id() -> bool:
    return os.environ.get("GPUPOOL_TLS_VERIFY_HOST_ID", "").strip().lower() in _TRUE


def channel(
    address: str,
    options: Sequence[tuple[str, Any]] = (),
    cfg: TlsConfig | None = None,
    *,
    token: bool = True,
    server_name: str = "",
) -> grpc.Channel:
    """A channel to a gpupool server: TLS (GPUPOOL_TLS_* unless `cfg`), plaintext only when configured insecure,
    with the API token (when there is one and `token`) on every call. `server_name`: the name the server's
    certificate must carry (default: the host of `address`)."""
    cfg = cfg or client_config()
    opts = list(options)
    if cfg.insecure:
        ch = plaintext_channel(address, options=opts)
    else:
        if server_name:
            # Verify the certificate against this name rather than the dialled address (a daemon's host id).
            opts.append(("grpc.ssl_target_name_override", server_name))
        ch = grpc.secure_channel(address, channel_credentials(cfg), options=opts)
    secret = api_token(cfg) if token else ""
    return grpc.intercept_channel(ch, _TokenInterceptor(secret)) if secret else ch


# ---- raw sockets (the daemon's bulk side channel: the same certificates and client-certificate rule) ----


class SocketServerTls:
    """An `ssl.SSLContext` for a raw server socket with `cfg`'s certificate, key and client-certificate rule
    (the gRPC port's), rebuilt when the files change (new connections use it, as on the gRPC port). `side`: the
    daemon's side socket (read-ahead, `SideSocket`); else a plain blocking TLS server socket (the metrics port,
    gpupool/metrics_http.py)."""

    def __init__(self, cfg: TlsConfig, *, side: bool = True) -> None:
        cfg.check_server()
        self.cfg = cfg
        self.side = side
        self._lock = threading.Lock()
        self._reloader = _Reloader(cfg)
        self._ctx = self._build()

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_RENEGOTIATION  # (TLS 1.2) a write never waits for a read: see `read_ahead`
        if self.side:
            read_ahead(ctx)
            ctx.sslsocket_class = SideSocket  # (buffered once bound: `SideSocket.buffer`)
        with _opened(self.cfg.key, KEY) as key:
            ctx.load_cert_chain(self.cfg.cert, key)
        if self.cfg.client_auth == "require":
            ctx.verify_mode = ssl.CERT_REQUIRED
            with _opened(
                self.cfg.clients_ca, CA
            ) as ca:  # as a file: `cadata` as str must be ASCII, a PEM bundle need not
                ctx.load_verify_locations(cafile=ca)
        return ctx

    def context(self) -> ssl.SSLContext:
        with self._lock:
            if self._reloader() is not None:  # the files changed and load: rebuild
                try:
                    self._ctx = self._build()
                except (OSError, ssl.SSLError, InvalidArgument) as exc:
                    log.warning("TLS files changed but cannot be loaded (keeping the old ones): %s", exc)
            return self._ctx


# OpenSSL's SSL_CTX_ctrl commands (ssl.h: the same numbers since OpenSSL 0.9.8)
_CTRL_GET_READ_AHEAD = 40
_CTRL_SET_READ_AHEAD = 41
_read_ahead_lib: list[Any] = []  # [the OpenSSL functions `read_ahead` calls, or None: not at hand], once looked up


def read_ahead(ctx: ssl.SSLContext) -> bool:
    """Turn OpenSSL's read-ahead on for the connections `ctx` makes from now on; True where it is on. Without it,
    OpenSSL reads a TLS record off the socket in two system calls (its 5-byte header, then its body): a 512 KiB frame
    on the side socket is 32 records, 64 reads, whose kernel entries cost the daemon's reader about as much as
    decrypting them (round 37, slots37: perf of the front under bench/input_bytes.py --modes captured; a system call
    costs far more under the GPU host's gVisor). With it, one read takes what the kernel holds, up to OpenSSL's
    record buffer: about one read a record. Both ends of the side socket: the daemon's (`SocketServerTls`, round 37)
    and the client's (`socket_client_context`, round 38: a download's records).

    Sound for a non-blocking socket read through gpupool/duplex.py's rule (SSL_read first, a wait for the socket
    only after OpenSSL said it wants to read): OpenSSL says so only once the kernel had nothing more (its read met
    EAGAIN) and what it holds is no whole record, so a wait never sleeps on bytes OpenSSL already holds (`ready`'s
    one-byte read and `head`'s `wait` follow the same rule). A write that wants to read (a TLS 1.2 renegotiation,
    waiting for the socket to be readable) is ruled out by OP_NO_RENEGOTIATION (TLS 1.3 has none).

    Python's ssl module has no call for it, so it is OpenSSL's own (SSL_CTX_ctrl), from the library the ssl module
    runs, on the SSL_CTX that `ctx` holds: CPython keeps that pointer first behind the object's header
    (Modules/_ssl.c PySSLContext), and it is taken only once OpenSSL's SSL_CTX_get_options of it gives `ctx.options`.
    Anything else (another Python, an OpenSSL whose functions are not at hand, a mismatch) leaves `ctx` as it is:
    False, and the reads as before."""
    if sys.implementation.name != "cpython" or type(ctx).__basicsize__ < object.__basicsize__ + ctypes.sizeof(
        ctypes.c_void_p
    ):
        return False
    if not _read_ahead_lib:
        lib: Any = None
        try:
            lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # its OpenSSL (a dependency, or linked in)
            lib.SSL_CTX_get_options.restype = ctypes.c_uint64
            lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
            lib.SSL_CTX_ctrl.restype = ctypes.c_long
            lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        except (AttributeError, OSError):
            lib = None
        _read_ahead_lib.append(lib)
    lib = _read_ahead_lib[0]
    if lib is None:
        return False
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or ptr % ctypes.alignment(ctypes.c_void_p) or lib.SSL_CTX_get_options(ptr) != ctx.options:
        log.debug("OpenSSL read-ahead left off: the SSL context is not where CPython keeps it")
        return False
    lib.SSL_CTX_ctrl(ptr, _CTRL_SET_READ_AHEAD, 1, None)
    return bool(lib.SSL_CTX_ctrl(ptr, _CTRL_GET_READ_AHEAD, 0, None) == 1)


def socket_client_context(cfg: TlsConfig | None = None) -> ssl.SSLContext | None:
    """The client side of `SocketServerTls` from GPUPOOL_TLS_* (as `channel`); None when configured insecure."""
    cfg = cfg or client_config()
    if cfg.insecure:
        return None
    if bool(cfg.cert) != bool(cfg.key):
        raise InvalidArgument("a client certificate needs both GPUPOOL_TLS_CERT and GPUPOOL_TLS_KEY")
    if cfg.ca:
        with _opened(cfg.ca, CA) as ca:  # as a file (`cadata` as str must be ASCII; a PEM bundle's text need not be)
            ctx = ssl.create_default_context(cafile=ca)
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # (TLS 1.2) a write never waits for a read: see `read_ahead`
    read_ahead(ctx)  # a side socket's download: a read a record, not two (its header, then its body)
    ctx.sslsocket_class = SideSocket  # (buffered once bound: `SideSocket.buffer`)
    if cfg.cert:
        with _opened(cfg.key, KEY) as key:
            ctx.load_cert_chain(cfg.cert, key)
    return ctx


# ---- the side socket's records in few system calls (round 39: OpenSSL's buffering BIO on both directions) ----

SIDE_BUFFER = 256 * 1024  # bytes of records a side socket's system call moves at most, each way (`SideSocket`)
BUFFERED_MIN = 64 * 1024  # a side socket's writes of at least this many bytes go through its write buffer
# OpenSSL's BIO numbers (bio.h: the same since OpenSSL 1.1)
_BIO_CTRL_PENDING = 10
_BIO_CTRL_FLUSH = 11
_BIO_C_SET_BUFF_SIZE = 117
_BIO_FLAGS_SHOULD_RETRY = 0x08
_BIO_TYPE_SOCKET = 5 | 0x0400 | 0x0100
_bio_lib: list[Any] = []  # [the OpenSSL functions `SideSocket.buffer` calls, or None: not at hand], once looked up


def _openssl_bio() -> Any:
    """The OpenSSL functions `SideSocket` calls, from the library the ssl module runs (as `read_ahead`), or None."""
    if not _bio_lib:
        lib: Any = None
        vp, i = ctypes.c_void_p, ctypes.c_int
        try:
            lib = ctypes.CDLL(ssl._ssl.__file__, use_errno=True)  # type: ignore[attr-defined]
            for name, res, args in (
                ("SSL_get_SSL_CTX", vp, [vp]),
                ("SSL_CTX_get_options", ctypes.c_uint64, [vp]),
                ("SSL_get_rbio", vp, [vp]),
                ("SSL_get_wbio", vp, [vp]),
                ("SSL_set0_rbio", None, [vp, vp]),
                ("SSL_set0_wbio", None, [vp, vp]),
                ("SSL_set_read_ahead", None, [vp, i]),
                ("SSL_get_read_ahead", i, [vp]),
                ("SSL_has_pending", i, [vp]),
                ("BIO_f_buffer", vp, []),
                ("BIO_new", vp, [vp]),
                ("BIO_free", i, [vp]),
                ("BIO_free_all", None, [vp]),
                ("BIO_up_ref", i, [vp]),
                ("BIO_push", vp, [vp, vp]),
                ("BIO_method_type", i, [vp]),
                ("BIO_test_flags", i, [vp, i]),
                ("BIO_ctrl", ctypes.c_long, [vp, i, ctypes.c_long, vp]),
                ("BIO_get_data", vp, [vp]),
            ):
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
        except (AttributeError, OSError):
            lib = None
        _bio_lib.append(lib)
    return _bio_lib[0]


def _buffered_count(lib: Any, rbuf: int, size: int) -> Any:
    """The count of bytes a read buffer BIO (BIO_f_buffer, its read buffer `size` bytes, nothing read yet) holds,
    as a ctypes int read in place, or None where its context is not laid out as OpenSSL's (1.1.0 to 3.x,
    crypto/bio/bf_buff.c: `ibuf_size`, `obuf_size`, `ibuf`, `ibuf_len`, ...). BIO_pending of that BIO is `ibuf_len`
    (the socket BIO under it holds nothing of its own), but asked through ctypes it cost ~3.7k instructions, the most
    of `SideSocket.held` (round 42, front42: a read of the field ~0.1k). The layout is taken only where the fields
    are found as `buffer` made them: the read buffer's size, the write buffer's default size (4096), a buffer
    pointer, and nothing held, with BIO_pending agreeing."""
    ctx = lib.BIO_get_data(rbuf)
    if not ctx:
        return None
    word = ctypes.sizeof(ctypes.c_void_p)
    sizes = (ctypes.c_int * 2).from_address(ctx)
    held = (ctypes.c_int * 2).from_address(ctx + 8 + word)  # ibuf_len, ibuf_off
    if tuple(sizes) != (size, 4096) or not ctypes.c_void_p.from_address(ctx + 8).value or tuple(held) != (0, 0):
        return None
    if lib.BIO_ctrl(rbuf, _BIO_CTRL_PENDING, 0, None) != 0:
        return None
    return ctypes.c_int.from_address(ctx + 8 + word)


class SideSocket(ssl.SSLSocket):
    """The side socket's TLS connection (both ends: the contexts of `SocketServerTls` and `socket_client_context`
    make theirs of this class), which, once `buffer` is called on the connected, non-blocking socket, moves the
    records of its bulk writes and all its reads in system calls of up to SIDE_BUFFER bytes instead of one a record.

    Without it OpenSSL writes each 16 KiB record with its own `write` (a side socket's 1 MiB upload or download: 64
    of them), and, read-ahead on (`read_ahead`), reads about one a record (round 38, side38, counted them; a system
    call costs microseconds more under the GPU host's gVisor). `buffer` puts OpenSSL's buffering BIO (BIO_f_buffer)
    in front of the socket's BIO: reads take up to SIDE_BUFFER bytes from the kernel at a time and hand OpenSSL its
    records from there; a write of BUFFERED_MIN bytes or more (or `send_more`'s, a chunk's frame, header and bytes)
    has its records copied into the write buffer, which goes to the kernel in one `write` when full and at the end
    (BIO_flush). A smaller write (a frame, a reply: a synced step's) goes straight to the socket's BIO as before: the
    write buffer is OpenSSL's write BIO only while a bulk write is under way and until it is empty again, never
    when a record of another write could pass what it holds. The cost: one copy of the bytes each way (measured on
    the 2-core box, bench/side_syscalls.py and BENCHMARKS.md round 39: reads 8-25 % less CPU a MiB, writes 0.87-1.21; a
    memory BIO with `ssl.SSLObject`, two copies and Python between the records and the socket, cost more than it
    saved there).

    The write side keeps OpenSSL's non-blocking contract, so gpupool/duplex.py's writers are unchanged: `send`
    returns how many bytes went only once their records left the buffer for the kernel; where the kernel took part
    of them it raises SSLWantWriteError with the records whole in the buffer, and the next `send` (the same slice
    again, OpenSSL's retry rule) writes what is left and returns the count (`_owed`). Nothing is ever written in
    plaintext (the BIOs sit under OpenSSL's records); TLS, its version and the certificate checks are the
    handshake's, done before `buffer`, as before; OpenSSL's read-ahead goes off (round 40: the read buffer does its
    work, and over it read-ahead cost a read that met EAGAIN each time the records ran out). The read buffer keeps
    duplex's rule sound: OpenSSL wants to read only once it is short of a record and the buffer BIO, empty, met
    EAGAIN reading the socket, so a wait for the socket never sleeps on bytes already read; `held` says, without a
    system call, whether any byte of the peer's is held here at all. Where OpenSSL's functions or CPython's object
    layout are not what `buffer` expects, the socket stays as it is (False) and works as any SSLSocket."""

    _wbuf = 0  # the write buffer BIO (0: not buffered)
    _buffering = False  # it is OpenSSL's write BIO now (a bulk write under way, or its records not all out)
    _owed = 0  # bytes a `send` took whose records still wait in the write buffer (it raised SSLWantWriteError)
    _dropped = False  # it was buffered and its TLS object is gone (`_drop`)
    _ahead = False  # OpenSSL may hold records read ahead before `buffer`, not yet opened (`held`)
    _in_buffer: Any = None  # the read buffer's count of bytes it holds, read in place (`_buffered_count`), or None

    def buffer(self, size: int = SIDE_BUFFER) -> bool:
        """Buffer the connection (see the class); True where it is. For a connected socket after its handshake and
        before any use from two threads (the caller holds the socket alone: bound, not yet shared)."""
        lib = _openssl_bio()
        sslobj: Any = getattr(self, "_sslobj", None)  # (CPython's _ssl._SSLSocket: not in the stubs)
        if lib is None or sslobj is None or sys.implementation.name != "cpython" or self._wbuf:
            return False
        # CPython's _ssl._SSLSocket: the header, then `Socket` (a weak reference), `ssl` (OpenSSL's SSL), `ctx` (the
        # context object, which `context` returns): the layout is taken only where `ctx` is found in its place
        base, word = id(sslobj) + object.__basicsize__, ctypes.sizeof(ctypes.c_void_p)
        if type(sslobj).__basicsize__ < object.__basicsize__ + 3 * word:
            return False
        if ctypes.c_void_p.from_address(base + 2 * word).value != id(sslobj.context):
            log.debug("side socket left unbuffered: the TLS object is not laid out as CPython's")
            return False
        ssl_ptr = ctypes.c_void_p.from_address(base + word).value
        ctx_ptr = ctypes.c_void_p.from_address(id(self.context) + object.__basicsize__).value
        if not ssl_ptr or not ctx_ptr or lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr:
            return False
        if lib.SSL_CTX_get_options(ctx_ptr) != self.context.options:
            return False
        sock_bio = lib.SSL_get_rbio(ssl_ptr)
        if not sock_bio or lib.SSL_get_wbio(ssl_ptr) != sock_bio or lib.BIO_method_type(sock_bio) != _BIO_TYPE_SOCKET:
            return False  # (not the one socket BIO both ways that SSL_set_fd made)
        bios: list[int] = []
        for write in (0, 1):
            bio = lib.BIO_new(lib.BIO_f_buffer())
            side = ctypes.c_int(write)  # BIO_set_read/write_buffer_size: which of its buffers
            if (
                not bio
                or lib.BIO_ctrl(bio, _BIO_C_SET_BUFF_SIZE, size, ctypes.cast(ctypes.byref(side), ctypes.c_void_p)) != 1
            ):
                for b in [*bios, bio]:
                    if b:
                        lib.BIO_free(b)
                return False
            bios.append(bio)
        rbuf, wbuf = bios
        # References: each buffer holds one to the socket BIO it is pushed on. The read buffer becomes OpenSSL's
        # read BIO (SSL_set0_rbio takes its reference and drops SSL_set_fd's read one); the write buffer's own
        # reference is this socket's (`_switch` lends OpenSSL another while it is the write BIO), dropped when the
        # socket closes or is collected (`_release`): each chain is freed with its last holder, in any order.
        for bio in bios:
            lib.BIO_up_ref(sock_bio)
            lib.BIO_push(bio, sock_bio)
        lib.SSL_set0_rbio(ssl_ptr, rbuf)
        # OpenSSL's read-ahead off for this connection: the read buffer does its work (one system call takes what the
        # kernel holds), and over it read-ahead only cost a read more each time the records ran out: OpenSSL asked
        # for more than the last record, the buffer handed what it held and read the socket again, which met EAGAIN
        # (round 40, front40: one such read a side frame). Without it OpenSSL asks the read buffer for a record's
        # header, then its body, and the socket is read only when the buffer is empty and OpenSSL wants bytes.
        lib.SSL_set_read_ahead(ssl_ptr, 0)
        self._ssl, self._sock_bio, self._wbuf = ssl_ptr, sock_bio, wbuf
        # records OpenSSL read ahead before (the hello's reads, read-ahead on) and has not opened yet: neither
        # SSL_pending nor the read buffer counts them (`held`)
        self._ahead = bool(lib.SSL_has_pending(ssl_ptr))
        self._release = weakref.finalize(self, lib.BIO_free_all, wbuf)
        self._release.atexit = False
        # BIO_flush and BIO_pending: its own function object without argument conversions, the arguments made once
        # (0.5 us a call)
        self._ctrl = lib["BIO_ctrl"]
        self._ctrl.restype = ctypes.c_long
        self._flush_args = (ctypes.c_void_p(wbuf), ctypes.c_int(_BIO_CTRL_FLUSH), ctypes.c_long(0), None)
        self._pending_args = (ctypes.c_void_p(rbuf), ctypes.c_int(_BIO_CTRL_PENDING), ctypes.c_long(0), None)
        self._in_buffer = _buffered_count(lib, rbuf, size)
        return True

    def held(self) -> int:
        """Bytes of the peer's that this end already holds and the application has not read (decrypted in OpenSSL's
        record, or records in the read buffer), without a system call; -1 where that is not known (not buffered, or
        its TLS object gone): ask the socket. 0 says that a read would have to wait for the kernel (so a reader that
        found it empty may wait for the socket: nothing held here is left behind). Under the caller's lock (one
        OpenSSL call at a time, gpupool/duplex.py)."""
        if not self._wbuf:
            return -1
        count = self._in_buffer
        n = self._sslobj.pending() + (  # type: ignore[attr-defined]
            count.value if count is not None else self._ctrl(*self._pending_args)
        )
        if n or not self._ahead:
            return n
        # Records OpenSSL read ahead before `buffer` (a client that sent its first frames right behind its hello,
        # not waiting for BULK_OK: read with the hello, read-ahead on), whole in its record buffer and not opened:
        # SSL_pending counts only an opened record's bytes, so until round 41 (frontrev41) they read as 0 and the
        # reader slept on the socket with the frames here. Asked until OpenSSL's record buffer is empty once: from
        # then on, read-ahead off, OpenSSL reads a record's exact length and opens it when whole.
        if _bio_lib[0].SSL_has_pending(self._ssl):
            return 1
        self._ahead = False
        return 0

    def _switch(self, buffering: bool) -> None:
        """Make the write buffer (True) or the socket's BIO (False) OpenSSL's write BIO; the latter only with the
        buffer empty and no record of OpenSSL's own retry pending (a successful write and flush)."""
        lib = _bio_lib[0]
        bio = self._wbuf if buffering else self._sock_bio
        lib.BIO_up_ref(bio)  # (SSL_set0_wbio takes it, and drops its reference to the one it held)
        lib.SSL_set0_wbio(self._ssl, bio)
        self._buffering = buffering

    def _flushed(self) -> bool:
        """Write what waits in the write buffer; True when all of it went, False when the kernel's buffer is full."""
        if self._ctrl(*self._flush_args) > 0:
            return True
        if _bio_lib[0].BIO_test_flags(self._wbuf, _BIO_FLAGS_SHOULD_RETRY):
            return False
        code = ctypes.get_errno()
        raise OSError(code or 32, f"side socket: write failed: {os.strerror(code or 32)}")

    def send(self, data: Any, flags: int = 0) -> int:
        if not self._wbuf or flags:
            if self._dropped:
                raise OSError(errno.EPIPE, "side socket: its TLS connection is shut down")
            return super().send(data, flags)
        if self._owed:  # the retry of a send whose records wait in the buffer: they go first
            if len(data) < self._owed:
                raise ssl.SSLError(f"side socket: a retried write of {len(data)} bytes, {self._owed} were taken")
            if not self._flushed():
                raise ssl.SSLWantWriteError("the side socket's write buffer is not yet out")
            owed, self._owed = self._owed, 0
            self._switch(False)
            return owed
        if not self._buffering:
            if len(data) < BUFFERED_MIN:
                return int(self._sslobj.write(data))  # type: ignore[attr-defined]  # (SSLSocket.send's own call)
            self._switch(True)
        n: int = self._sslobj.write(data)  # type: ignore[attr-defined]  # (a want: the retry comes back here)
        if self._flushed():
            self._switch(False)
            return n
        self._owed = n
        raise ssl.SSLWantWriteError("the side socket's write buffer is not yet out")

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        """`SSLSocket.recv_into` without its two Python layers (`recv_into`, `read`) when it reads into a sized
        view: OpenSSL's read straight away, a ragged EOF read as the end as `read` reads it (round 40: the side
        reader's calls a frame)."""
        sslobj: Any = self._sslobj  # type: ignore[attr-defined]
        if sslobj is None or flags or not nbytes:
            return super().recv_into(buffer, nbytes, flags)
        try:
            return int(sslobj.read(nbytes, buffer))
        except ssl.SSLError as exc:
            if exc.args[0] == ssl.SSL_ERROR_EOF and self.suppress_ragged_eofs:  # type: ignore[attr-defined]
                return 0
            raise

    def send_more(self, data: Any) -> int:
        """`send` through the write buffer whatever its size, its records left there for the next call or `flush`
        (a chunk's frame, header and bytes in the same system calls)."""
        if self._owed or not self._wbuf:
            return self.send(data)
        if not self._buffering:
            self._switch(True)
        return int(self._sslobj.write(data))  # type: ignore[attr-defined]

    def flush(self) -> bool:
        """Write what `send_more` left in the write buffer; True when all of it went, False: wait until the socket is
        writable and call again."""
        if not self._wbuf:
            if self._dropped:
                raise OSError(errno.EPIPE, "side socket: its TLS connection is shut down")
            return True
        if not self._buffering:
            return True
        if not self._flushed():
            return False
        if not self._owed:  # (else the retry of the send that owes them switches back)
            self._switch(False)
        return True

    def _drop(self) -> None:
        """The TLS object goes (a close, or `SSLSocket.shutdown`, which drops it first): its BIOs and the pointers
        to them are no longer used, and a write fails (never in plaintext, as `SSLSocket.send` would write without
        its TLS object)."""
        if self._wbuf:
            self._wbuf, self._dropped = 0, True
            self._release()  # (OpenSSL's references go with its SSL, when the TLS object goes)

    def shutdown(self, how: int) -> None:
        self._drop()
        super().shutdown(how)

    def unwrap(self) -> Any:
        self._drop()
        return super().unwrap()

    def _real_close(self) -> None:
        self._drop()
        super()._real_close()  # type: ignore[misc]
