"""A live pool watched by a real Prometheus: `gpupool scheduler` and two `gpupool serve` processes with fake GPUs
(loopback, port 0, ports read from their logs), a client running ops on a fractional lease in the background, and
the Debian `prometheus` binary scraping them every second with deploy/prometheus/rules.yml loaded.

Prometheus missing: the tests skip with the reason, except in CI ($CI=true), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import Program, get_pki, tls_channel

from gpupool import tokens

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
HOSTS = ("e2e-host-a", "e2e-host-b")
TENANT = "e2e-tenant"


@dataclass
class Pool:
    scheduler: str  # gRPC address
    scheduler_metrics: int
    daemons: dict[str, Program] = field(default_factory=dict)  # host id -> process
    daemon_metrics: dict[str, int] = field(default_factory=dict)  # host id -> metrics port
    daemon_ports: dict[str, int] = field(default_factory=dict)  # host id -> gRPC port
    programs: list[Program] = field(default_factory=list)
    hosts: tuple[str, ...] = HOSTS


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        reason = "the prometheus binary is not installed (apt-get install prometheus; scripts/setup.sh does it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must run the Prometheus end-to-end tests")
        pytest.skip(reason)
    return path


def _wait_pool_up(address: str, hosts: int, timeout: float = 60.0) -> None:
    from gpupool._proto import scheduler_pb2, scheduler_pb2_grpc

    with tls_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pool = stub.ListPool(scheduler_pb2.ListPoolRequest(), timeout=5)
            if sum(h.state == "up" for h in pool.hosts) >= hosts:
                return
            time.sleep(0.2)
    raise AssertionError(f"{hosts} hosts never registered with the scheduler at {address}")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A scheduler and two daemons with two 512 MiB fake GPUs each."""
    prometheus_binary()  # skip/fail before starting anything
    tmp = tmp_path_factory.mktemp("pool")
    key_file = tmp / "token.key"
    tokens.generate_key_file(key_file)
    common = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--token-key-file", str(key_file)]
    sched = Program(
        ["scheduler", *common, "--state", str(tmp / "state.db"), "--host-timeout", "3", "--lease-ttl", "30"],
        tmp / "scheduler.log",
    )
    programs = [sched]
    try:
        sched_port, sched_metrics = sched.ports()
        result = Pool(scheduler=f"127.0.0.1:{sched_port}", scheduler_metrics=sched_metrics, programs=programs)
        for host in HOSTS:
            daemon = Program(
                [
                    "serve",
                    *common,
                    "--fake-gpus",
                    "2",
                    "--fake-gpu-memory",
                    "512MiB",
                    "--host-id",
                    host,
                    "--scheduler",
                    result.scheduler,
                    "--heartbeat-interval",
                    "0.5",
                ],
                tmp / f"{host}.log",
            )
            programs.append(daemon)
            result.daemons[host] = daemon
        for host, daemon in result.daemons.items():
            result.daemon_ports[host], result.daemon_metrics[host] = daemon.ports()
        _wait_pool_up(result.scheduler, len(HOSTS))
        yield result
    finally:
        for program in reversed(programs):
            program.stop()


def _bound_port(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> int:
    """The port Prometheus, started on 127.0.0.1:0, says it listens on (its log's whole "Listening on" line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r'msg="Listening on" address=127\.0\.0\.1:(\d+)\s', log.read_text())
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise AssertionError(f"prometheus named no port it listens on in {timeout:.0f} s:\n{log.read_text()}")


class Prometheus:
    """A Prometheus server on loopback and the bits of its HTTP API the tests use."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400 for a query that does not parse: return its error body
            return json.loads(exc.read())

    def query(self, expr: str) -> Any:
        return self.api("query", query=expr)


@pytest.fixture(scope="module")
def prometheus(pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus with deploy/prometheus/prometheus.yml and rules.yml, scraping the pool and evaluating every second."""
    binary = prometheus_binary()
    tmp = tmp_path_factory.mktemp("prometheus")
    # deploy/prometheus/prometheus.yml itself, with the live pool's targets and one-second intervals.
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(SCRAPE_CONFIG.parent / f) for f in config["rule_files"]]
    targets = {
        "gpupool-scheduler": [f"127.0.0.1:{pool.scheduler_metrics}"],
        "gpupool-daemon": [f"127.0.0.1:{port}" for port in pool.daemon_metrics.values()],
    }
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    # Mutual TLS as prometheus.yml configures it: the files it names (relative to the config's folder) are the
    # tests' CA and a metrics certificate of it (the role the endpoints answer: gpupool/metrics_http.py)
    scraper = get_pki().issue("metrics", "prometheus")
    given = {"ca_file": Path(get_pki().ca_file), "cert_file": scraper.cert, "key_file": scraper.key}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        assert job["scheme"] == "https", job
        for key, name in job["tls_config"].items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(given[key], tmp / name)
    (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    # Prometheus binds port 0 itself and logs the port it got ("Listening on" address=127.0.0.1:PORT, exporter-toolkit).
    # Until round 51 the test took a free port, closed it and passed the number: another process could win it first.
    log = tmp / "prometheus.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             "--web.listen-address=127.0.0.1:0", "--storage.tsdb.retention.time=1h"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{_bound_port(proc, log)}", proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    if proc.poll() is not None:
        raise AssertionError(f"prometheus exited {proc.returncode}:\n{log.read_text()}")
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Workload:
    """What the background client leased: where its session runs."""

    host: str
    device: int
    lease_id: str
    tenant: str = TENANT
    iterations: int = 0
    errors: list[BaseException] = field(default_factory=list)
    allocating: threading.Event = field(default_factory=threading.Event)  # clear: no more small leases


@pytest.fixture(scope="module")
def workload(pool: Pool, prometheus: Prometheus) -> Iterator[Workload]:
    """A client on a 0.5 lease (gpupool.lease) running ops through client/session.Session until teardown:
    uploads, matmuls, a captured step, downloads, one failing op at the start; and small leases allocated and
    released beside it (and one invalid request), so that every panel has something to show."""
    import torch
    from gpupool.client.pool import SchedulerClient
    from gpupool.client.session import Session

    import gpupool
    from gpupool._proto import device_pb2, scheduler_pb2, tensor_pb2
    from gpupool.errors import GpupoolError, InvalidArgument

    lease = gpupool.lease(gpus=1, fraction=0.5, scheduler=pool.scheduler, tenant=TENANT)
    (dev,) = lease.devices
    session = Session.attach(dev.address, dev.token)
    # A failing op first, so the error counter has samples for the whole run.
    x = session.upload(torch.ones(64, 64))
    session.call("aten::no_such_op.default", x)
    with pytest.raises(InvalidArgument):
        session.sync()
    # A captured step (a one-op graph), replayed in the loop below: the graph events panel has data too.
    neg = device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[2])
    meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[64, 64], stride=[64, 1])
    session.define_graph(device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[meta], ops=[neg], outputs=[2]))
    result = Workload(host=dev.host_id, device=dev.device, lease_id=lease.lease_id)
    result.allocating.set()
    client = SchedulerClient(pool.scheduler)
    with pytest.raises(InvalidArgument):  # one invalid request: the allocation panels show more than one result
        client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=2.0, tenant="batch"))
    client.close()
    stop = threading.Event()

    def run() -> None:
        client = SchedulerClient(pool.scheduler)
        try:
            while not stop.is_set():
                a = session.upload(torch.randn(64, 64))
                (b,) = session.call("aten::mm.default", a, a)
                (c,) = session.call("aten::relu.default", b)
                d = session.new_handle()
                session.run_graph(1, [a], [d])
                session.download(c)
                session.free([a, b, c, d])
                if result.allocating.is_set():
                    small = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.125, tenant="batch"))
                    client.release(small.lease_id)
                result.iterations += 1
                stop.wait(0.2)
        except (GpupoolError, RuntimeError) as exc:
            result.errors.append(exc)
        finally:
            client.close()

    thread = threading.Thread(target=run, name="e2e-workload", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join(timeout=30)
        session.close()
        lease.release()
