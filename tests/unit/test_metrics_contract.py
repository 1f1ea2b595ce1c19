"""The metrics contract (docs/metrics.md) holds the code, the Grafana dashboard and the alert rules to one table.

A real scheduler and a real daemon (subprocesses of `gpupool scheduler` / `gpupool serve`, every port 0) are
started; the daemon registers, a lease is allocated and a session runs ops (one of them failing) so that every
labelled family has samples. Then both /metrics endpoints are scraped and compared with the table: a family the
code exports but the table lacks fails, so does one the table lists but the code does not export, or a family
whose type or label set differs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import support
import torch
from gpupool.client.session import Session
from gpupool.server import graph_build
from prometheus_client.parser import text_string_to_metric_families
from support import Program, tls_channel

from gpupool import tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc, tensor_pb2
from gpupool.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "gpupool.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
ROW_RE = re.compile(r"^\|\s*`(gpupool_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|([^|]*)\|\s*$")
METRIC_RE = re.compile(r"\bgpupool_[a-zA-Z0-9_]+")
# Metrics Prometheus makes itself, allowed in rules and panels next to the contract's.
PROMETHEUS_BUILTIN = {"up"}


@dataclass(frozen=True)
class Row:
    """One metric of the contract."""

    type: str
    labels: frozenset[str]


@dataclass(frozen=True)
class Family:
    """One metric family as exported."""

    type: str
    labels: frozenset[str] | None  # None: exported without samples, labels unknown


# ---------------------------------------------------------------- the table and the expressions


def contract() -> dict[str, tuple[str, Row]]:
    """{metric name: (program section, Family)} from docs/metrics.md's tables."""
    table: dict[str, tuple[str, Row]] = {}
    section = ""
    for line in CONTRACT.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].split()[0].lower()
        m = ROW_RE.match(line)
        if m:
            name, kind, labels, meaning = m.groups()
            assert name not in table, f"{name} listed twice in docs/metrics.md"
            assert meaning.strip(), f"{name} has no meaning in docs/metrics.md"
            table[name] = (section, Row(kind, frozenset(re.findall(r"`([A-Za-z_]+)`", labels))))
    return table


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def rule_exprs() -> list[str]:
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def referenced_metrics(expr: str) -> set[str]:
    """gpupool_* metric names in a PromQL expression, histogram series mapped to their family name."""
    names = set()
    for name in METRIC_RE.findall(expr):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        names.add(name)
    return names


def test_contract_table_parses_and_follows_conventions() -> None:
    table = contract()
    assert len(table) >= 20, "docs/metrics.md's tables were not found"
    sections = {section for section, _ in table.values()}
    assert sections == {"daemon", "scheduler"}
    for name, (_, fam) in table.items():
        assert fam.type in ("counter", "gauge", "histogram"), name
        assert name.endswith("_total") == (fam.type == "counter"), f"{name}: counters and only counters end in _total"
        assert not name.endswith(("_bucket", "_sum", "_count", "_created")), name
    # Device-level series join with dcgm-exporter through the UUID label.
    assert all("UUID" in fam.labels for name, (_, fam) in table.items() if name.startswith("gpupool_device_"))


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_dashboard_and_rules_use_only_contract_metrics(source: str) -> None:
    table = contract()
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    assert exprs
    used: set[str] = set()
    for expr in exprs:
        for name in referenced_metrics(expr):
            assert name in table, f"{source} uses {name}, which docs/metrics.md does not list: {expr}"
            used.add(name)
        for bare in re.findall(r"(?<![\w{\"$])([a-z_][a-z0-9_]*)\s*(?:\{|\[)", expr):
            assert bare.startswith("gpupool_") or bare in PROMETHEUS_BUILTIN, f"{source}: unknown metric {bare}"
    if source == "dashboard":
        unused = set(table) - used
        assert not unused, f"metrics in the contract that no dashboard panel shows: {sorted(unused)}"


# ---------------------------------------------------------------- real programs


@dataclass
class Scrapes:
    daemon: str
    scheduler: str


def scrape(port: int) -> str:
    return support.scrape(port, "metrics")  # (HTTPS, Prometheus' certificate: what the contract's scrapers present)


def run_ops(session: Session) -> None:
    """An upload, two ops, a download and one failing op, checked."""
    a = session.upload(torch.ones(4, 4))
    (b,) = session.call("aten::add.Tensor", a, a)
    (c,) = session.call("aten::mm.default", a, b)
    assert torch.equal(session.download(c), torch.full((4, 4), 8.0))
    # A one-op graph (step capture), defined and run once, so that the graph event counter gets samples.
    one = device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[2])
    meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4, 4], stride=[4, 1])
    session.define_graph(device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[meta], ops=[one], outputs=[2]))
    out = session.new_handle()
    session.run_graph(1, [a], [out])
    assert torch.equal(session.download(out), -torch.ones(4, 4))
    # An unknown op fails with INVALID_ARGUMENT, so the error counter gets a sample.
    session.call("aten::no_such_op.default", a)
    with pytest.raises(InvalidArgument):
        session.sync()


def measured_below(text: str, capacity: int) -> bool:
    """Does the scheduler's exposition `text` show a device measured with less than `capacity` free?"""
    families = text_string_to_metric_families(text)
    return any(x.value < capacity for f in families if f.name == "gpupool_pool_memory_free_bytes" for x in f.samples)


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrapes]:
    tmp = tmp_path_factory.mktemp("contract")
    key_file = tmp / "token.key"
    tokens.generate_key_file(key_file)
    common = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--token-key-file", str(key_file)]
    programs: list[Program] = []
    try:
        sched = Program(["scheduler", *common, "--state", str(tmp / "state.db")], tmp / "scheduler.log")
        programs.append(sched)
        sched_port, sched_metrics = sched.ports()
        daemon = Program(
            [
                "serve",
                *common,
                "--fake-gpus",
                "2",
                "--fake-gpu-memory",
                "256MiB",
                "--host-id",
                "contract-host",
                "--scheduler",
                f"127.0.0.1:{sched_port}",
                "--heartbeat-interval",
                "0.5",
            ],
            tmp / "daemon.log",
        )
        programs.append(daemon)
        daemon_port, daemon_metrics = daemon.ports()
        with tls_channel(f"127.0.0.1:{sched_port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            request = scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, tenant="contract", wait_seconds=20)
            lease = stub.Allocate(request, timeout=30)
            (leased,) = lease.devices
            # The session stays attached while scraping: the daemon exports session gauges of live sessions only.
            session = Session.attach(f"127.0.0.1:{daemon_port}", leased.token)
            try:
                run_ops(session)
                # Let a heartbeat carry the session's usage to the scheduler before scraping: its device's measured
                # free memory (smi54: `gpupool_pool_memory_free_bytes`, absent until a heartbeat brings it) below
                # the 256 MiB the device has.
                deadline = time.monotonic() + 60
                while not measured_below(scrape(sched_metrics), 256 * 2**20):
                    assert time.monotonic() < deadline, "no heartbeat brought the session's usage in 60 s"
                    time.sleep(0.2)
                yield Scrapes(daemon=scrape(daemon_metrics), scheduler=scrape(sched_metrics))
            finally:
                session.close()
            stub.Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id), timeout=10)
    finally:
        for program in reversed(programs):
            program.stop()


def exported(text: str) -> dict[str, Family]:
    """{family name as in the contract: Family} of the gpupool_* families in an exposition."""
    families: dict[str, Family] = {}
    parsed = [fam for fam in text_string_to_metric_families(text) if fam.name.startswith("gpupool_")]
    with_created = {f.name for f in parsed if f.type in ("counter", "histogram", "summary")}
    for fam in parsed:
        if fam.name.endswith("_created") and fam.name.removesuffix("_created") in with_created:
            continue  # prometheus_client's creation timestamp of a counter/histogram, shown as its own gauge
        name = fam.name + "_total" if fam.type == "counter" and not fam.name.endswith("_total") else fam.name
        labels = frozenset(k for s in fam.samples for k in s.labels if k != "le") if fam.samples else None
        families[name] = Family(fam.type, labels)
    return families


@pytest.mark.parametrize("program", ["daemon", "scheduler"])
def test_exported_metrics_match_the_contract(scrapes: Scrapes, program: str) -> None:
    table = {name: fam for name, (section, fam) in contract().items() if section == program}
    got = exported(getattr(scrapes, program))
    extra, missing = sorted(set(got) - set(table)), sorted(set(table) - set(got))
    assert not extra, f"{program} exports metrics that docs/metrics.md lacks: {extra}"
    assert not missing, f"docs/metrics.md lists metrics that {program} does not export: {missing}"
    for name, fam in table.items():
        assert got[name].type == fam.type, f"{name}: contract says {fam.type}, code exports {got[name].type}"
        labels = got[name].labels
        assert labels is not None, f"{name}: exported without any sample, its labels are unchecked"
        assert labels == fam.labels, f"{name}: labels {sorted(labels)}, contract {sorted(fam.labels)}"


def test_scrape_reflects_the_session(scrapes: Scrapes) -> None:
    """The numbers mean what the contract says: the tenant's ops, error and transfers were counted."""
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(scrapes.daemon)
        for s in fam.samples
    }

    def value(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())

    assert value("gpupool_device_info", host="contract-host") == 2
    assert value("gpupool_tenant_ops_total", tenant="contract") >= 2
    assert value("gpupool_tenant_errors_total", tenant="contract", code="INVALID_ARGUMENT") == 1
    assert value("gpupool_transfer_bytes_total", direction="upload") >= 64
    assert value("gpupool_transfer_bytes_total", direction="download") >= 64
    assert value("gpupool_session_share", tenant="contract") == pytest.approx(0.5)
    assert value("gpupool_session_memory_limit_bytes", tenant="contract") == pytest.approx(128 * 1024**2, rel=0.01)
    # the one-op graph run_ops defined (1 input of 2 dimensions, 1 output; its op 1 argument and 1 output), as
    # the daemon estimated it, and the default bound
    held = graph_build.INPUT_BYTES + graph_build.REF_BYTES + 2 * graph_build.DIM_BYTES
    graph = graph_build.host_bytes(1, 2, held)
    assert value("gpupool_session_graph_memory_bytes", tenant="contract") == graph
    assert value("gpupool_session_graph_memory_limit_bytes", tenant="contract") == 256 * 1024**2
    sched = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(scrapes.scheduler)
        for s in fam.samples
    }
    assert sched[("gpupool_pool_hosts", (("state", "up"),))] == 1
    assert sched[("gpupool_pool_devices", (("state", "up"),))] == 2
    assert sched[("gpupool_allocations_total", (("result", "granted"),))] == 1
    assert sched[("gpupool_leases", (("state", "active"),))] == 1
    assert sum(v for (n, _), v in sched.items() if n == "gpupool_pool_share_allocated") == pytest.approx(0.5)
