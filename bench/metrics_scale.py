"""Metrics at scale: scrape time, size and series count of /metrics for a daemon and for the scheduler.

Every row runs real programs as subprocesses (so the bench's own client threads do not share the scraped
process's GIL) and scrapes their /metrics like Prometheus does, over HTTPS with a client certificate (since round
40; a new connection, handshake included, each scrape, as the servers close each after its answer):
- daemon, 1 fake GPU, no session, plaintext HTTP (`--metrics-plaintext`: the baseline, what every scrape was
  until round 40);
- daemon, 1 fake GPU, no session (HTTPS);
- daemon, 8 fake GPUs, 32 attached sessions of 32 tenants (4 per device, share 0.25), each having run ops,
  one failing op, an upload and a download, idle while scraped;
- the same with all 32 sessions busy running matmuls while scraped;
- scheduler with one 8-device host (baseline);
- scheduler with a 1,000-device pool: 125 hosts x 8 devices registered through real Register RPCs,
  1,000 leases of 0.5 GPU granted through Allocate.
Ratios compare each row with its program's baseline; "server CPU ms" is the scraped process's CPU time a scrape (its
/proc stat over the row's scrapes: the busy row's includes the sessions' work).

    nice python bench/metrics_scale.py            # ~1-2 min on 2 cores
    python bench/metrics_scale.py --scrapes 20    # quicker
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from gpupool.client.session import Session

from gpupool import pki, tls, tokens, wire
from gpupool._proto import scheduler_pb2, scheduler_pb2_grpc
from gpupool.errors import GpupoolError

GiB = 1024**3
HOST = "bench-host"


@dataclass
class Row:
    name: str
    series: int
    gpupool_series: int
    size_bytes: int
    p50_ms: float
    p99_ms: float
    server_cpu_ms: float  # CPU time of the scraped process a scrape (its /proc stat over all the scrapes)


@contextmanager
def program(args: list[str], workdir: Path, name: str) -> Iterator[tuple[int, int, int]]:
    """Run `gpupool ARGS`; yields (gRPC port, metrics port) read from its log and its pid; stops it afterwards."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpupool.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 120
        ports = None
        while time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text(errors="replace")
            listen = re.search(r"listening on \S*?:(\d+)", text)
            metrics = re.search(r"metrics on https?://\S*?:(\d+)/metrics", text)
            if listen and metrics:
                ports = int(listen.group(1)), int(metrics.group(1)), proc.pid
                break
            time.sleep(0.1)
        if ports is None:
            raise RuntimeError(f"gpupool {args[0]} did not start:\n{log.read_text()}")
        yield ports
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` so far, its ended threads included (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, metrics_port: int, scrapes: int, pid: int, plaintext: bool = False) -> Row:
    """`scrapes` scrapes of /metrics: HTTPS with this process's certificate (GPUPOOL_TLS_*: an operator's, which
    the endpoints answer), or plain HTTP; and the CPU time process `pid` spent meanwhile."""
    context = None
    if not plaintext:
        context = ssl.create_default_context(cafile=os.environ["GPUPOOL_TLS_CA"])
        context.load_cert_chain(os.environ["GPUPOOL_TLS_CERT"], os.environ["GPUPOOL_TLS_KEY"])
    url = f"{'http' if plaintext else 'https'}://127.0.0.1:{metrics_port}/metrics"
    times = []
    body = b""
    cpu = cpu_seconds(pid)
    for _ in range(scrapes):
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30, context=context) as resp:
            body = resp.read()
        times.append(time.perf_counter() - start)
    cpu = cpu_seconds(pid) - cpu
    lines = [ln for ln in body.decode().splitlines() if ln and not ln.startswith("#")]
    times.sort()
    return Row(
        name=name,
        series=len(lines),
        gpupool_series=sum(ln.startswith("gpupool_") for ln in lines),
        size_bytes=len(body),
        p50_ms=statistics.median(times) * 1e3,
        p99_ms=times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3,
        server_cpu_ms=cpu / scrapes * 1e3,
    )


def token(key: tokens.Signer, device: int, share: float, tenant: str) -> str:
    claims = tokens.TokenClaims(uuid.uuid4().hex, HOST, device, 0, share, time.time() + 3600, tenant)
    return tokens.mint(key, claims)


def exercise(session: Session) -> None:
    """Ops, one failure, an upload and a download: every per-tenant counter gets its series."""
    a = session.upload(torch.randn(128, 128))
    (b,) = session.call("aten::mm.default", a, a)
    session.download(b)
    session.call("aten::no_such_op.default", a)
    try:
        session.sync()
    except GpupoolError:
        pass


def daemon_rows(workdir: Path, key_file: Path, scrapes: int) -> list[Row]:
    key = tokens.load_signer(key_file)
    public = key_file.with_suffix(".pub")
    public.write_bytes(tokens.public_pem(key.public))
    common = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--token-public-keys", str(public)]
    rows = []
    plain = ["serve", *common, "--fake-gpus", "1", "--host-id", HOST, "--metrics-plaintext"]
    with program(plain, workdir, "daemon-1-http") as (_, mport, pid):
        rows.append(measure("daemon: 1 GPU, 0 sessions, HTTP", mport, scrapes, pid, plaintext=True))
    with program(["serve", *common, "--fake-gpus", "1", "--host-id", HOST], workdir, "daemon-1") as (_, mport, pid):
        rows.append(measure("daemon: 1 GPU, 0 sessions", mport, scrapes, pid))
    args = ["serve", *common, "--fake-gpus", "8", "--fake-gpu-memory", "1GiB", "--host-id", HOST]
    with program(args, workdir, "daemon-8") as (port, mport, pid):
        sessions = [Session.attach(f"127.0.0.1:{port}", token(key, i % 8, 0.25, f"tenant-{i:02d}")) for i in range(32)]
        try:
            for s in sessions:
                exercise(s)
            rows.append(measure("daemon: 8 GPUs, 32 sessions idle", mport, scrapes, pid))
            stop = threading.Event()

            def busy(s: Session) -> None:
                x = s.upload(torch.randn(256, 256))
                while not stop.is_set():
                    s.call("aten::mm.default", x, x)
                    s.sync()

            threads = [threading.Thread(target=busy, args=(s,), daemon=True) for s in sessions]
            for t in threads:
                t.start()
            time.sleep(1.0)
            rows.append(measure("daemon: 8 GPUs, 32 sessions busy", mport, scrapes, pid))
            stop.set()
            for t in threads:
                t.join(timeout=30)
        finally:
            for s in sessions:
                s.close()
    return rows


def register_hosts(stub: scheduler_pb2_grpc.SchedulerStub, hosts: int, per_host: int) -> None:
    for h in range(hosts):
        devices = [
            wire.device_info(
                i, f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{h}/{i}')}", "NVIDIA H100 80GB HBM3", 80 * GiB, False
            )
            for i in range(per_host)
        ]
        stub.Register(
            scheduler_pb2.RegisterRequest(host_id=f"sim-host-{h:04d}", address=f"10.0.{h // 250}.{h % 250}:50051",
                                          devices=devices),
            timeout=30,
        )  # fmt: skip


def scheduler_rows(workdir: Path, key_file: Path, scrapes: int) -> list[Row]:
    rows = []
    for hosts, leases in ((1, 0), (125, 1000)):
        args = ["scheduler", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                "--token-key-file", str(key_file), "--state", ":memory:",
                # Simulated hosts never heartbeat: keep them up, and the leases alive, for the whole run.
                "--host-timeout", "3600", "--lease-ttl", "3600"]  # fmt: skip
        with program(args, workdir, f"scheduler-{hosts}") as (port, mport, pid):
            with tls.channel(f"127.0.0.1:{port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                register_hosts(stub, hosts, 8)
                for i in range(leases):
                    request = scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, tenant=f"tenant-{i % 50}")
                    stub.Allocate(request, timeout=30)
                name = f"scheduler: {hosts * 8:,} devices, {leases:,} leases"
                rows.append(measure(name, mport, scrapes, pid))
    return rows


def print_table(rows: list[Row]) -> None:
    base: dict[str, Row] = {}
    header = (
        f"{'target':<38} {'series':>7} {'gpupool_*':>9} {'bytes':>9} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'x series':>9} {'x p50':>7} {'server CPU ms':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        program_name = r.name.split(":")[0]
        b = base.setdefault(program_name, r)
        print(
            f"{r.name:<38} {r.series:>7} {r.gpupool_series:>9} {r.size_bytes:>9} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f}"
            f" {r.series / b.series:>9.1f} {r.p50_ms / b.p50_ms:>7.1f} {r.server_cpu_ms:>13.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scrapes", type=int, default=50, help="scrapes per row (default 50)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpupool-metrics-bench-") as tmp:
        workdir = Path(tmp)
        key_file = workdir / "token.key"
        tokens.generate_key_file(key_file)
        os.environ.update(pki.loopback_env(workdir / "pki"))  # the programs and this process speak TLS
        rows = daemon_rows(workdir, key_file, args.scrapes) + scheduler_rows(workdir, key_file, args.scrapes)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
