"""End to end with a real Prometheus (fixtures in conftest.py): every PromQL expression of the Grafana dashboard
and of the alert rules runs through Prometheus's HTTP API against a live pool. Each must parse, each panel query
must return data, every rule must evaluate healthily, and the alerts fire when their condition is made true:
the pool filled beyond 90%, allocations refused, a daemon killed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")


pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "gpupool.json").read_text())
RULES = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
ALERTS = {r["alert"]: r["expr"] for g in RULES["groups"] for r in g["rules"]}
# Grafana's $__rate_interval is at least four scrape intervals; with 1 s scrapes, 10 s holds several samples.
RATE_INTERVAL = "10s"


def panel_queries() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL with Grafana's template variables left in) of every dashboard target."""
    return [
        (f"{p['title']} / {t['refId']}", t["expr"])
        for p in DASHBOARD["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def substitute(expr: str, host: str, device: int) -> str:
    """What Grafana sends for one selected host and device."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("${host}", host).replace("${device}", str(device))
    out = out.replace("$host", host).replace("$device", str(device))
    assert "$" not in out, f"unsubstituted template variable in {out}"
    return out


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """check() until it returns something truthy; its last value in the failure message."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: still {last!r} after {timeout:.0f} s")


@pytest.fixture(scope="module")
def scraped(pool: Any, prometheus: Any, workload: Any) -> Any:
    """(pool, prometheus, workload: the objects of tests/e2e/conftest.py)

    Every target scraped at least twice since the workload started (so rate() has two samples)."""

    def two_scrapes_each() -> bool:
        session = f"count_over_time(gpupool_session_share{{tenant='{workload.tenant}'}}[1m])"
        result = prometheus.query(session)["data"]["result"]
        ups = prometheus.query("count_over_time(up[1m])")["data"]["result"]
        return (
            bool(result)
            and float(result[0]["value"][1]) >= 2
            and len(ups) == 1 + len(pool.hosts)
            and all(float(u["value"][1]) >= 2 for u in ups)
        )

    eventually(two_scrapes_each, 60, "two scrapes of every target with the workload's session")
    assert not workload.errors, workload.errors
    return workload


def test_every_target_is_up(pool: Any, prometheus: Any, scraped: Any) -> None:
    """Every target up, scraped over HTTPS with the metrics certificate (deploy/prometheus/prometheus.yml's
    tls_config: the endpoints answer nothing else since round 40)."""
    targets = prometheus.api("targets")["data"]["activeTargets"]
    assert len(targets) == 1 + len(pool.hosts)
    assert all(t["health"] == "up" for t in targets), [(t["scrapeUrl"], t["lastError"]) for t in targets]
    assert all(t["scrapeUrl"].startswith("https://") for t in targets), [t["scrapeUrl"] for t in targets]


def test_template_variables_list_the_pool(pool: Any, prometheus: Any, scraped: Any) -> None:
    """The dashboard's host and device variables (label_values queries) find both hosts and their devices."""
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    for name, want in (("host", set(pool.hosts)), ("device", {"0", "1"})):
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", variables[name]["definition"])
        assert m, variables[name]["definition"]
        selector = m.group(1).replace("$host", "|".join(pool.hosts))
        values = prometheus.api(f"label/{m.group(2)}/values", **{"match[]": selector})
        assert values["status"] == "success", values
        assert set(values["data"]) == want


def test_grpc_health_answers_what_kubernetes_probes_ask(pool: Any) -> None:
    """deploy/k8s probes use Kubernetes' native `grpc:` probe: Health/Check with service "" on the gRPC port."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from support import tls_channel

    addresses = [pool.scheduler] + [f"127.0.0.1:{port}" for port in pool.daemon_ports.values()]
    for address in addresses:
        with tls_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, address


@pytest.mark.parametrize(("panel", "expr"), panel_queries(), ids=[q[0] for q in panel_queries()])
def test_dashboard_query_returns_data(prometheus: Any, scraped: Any, panel: str, expr: str) -> None:
    query = substitute(expr, scraped.host, scraped.device)
    first = prometheus.query(query)
    assert first["status"] == "success", f"{panel}: {query}: {first.get('error')}"
    eventually(lambda: prometheus.query(query)["data"]["result"], 20, f"{panel}: no data for {query}")


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_alert_expression_parses(prometheus: Any, scraped: Any, alert: str) -> None:
    reply = prometheus.query(ALERTS[alert])
    assert reply["status"] == "success", f"{alert}: {reply.get('error')}"


def rules_by_name(prometheus: Any) -> dict[str, dict[str, Any]]:
    groups = prometheus.api("rules")["data"]["groups"]
    return {r["name"]: r for g in groups for r in g["rules"]}


def test_rules_loaded_and_evaluate_healthily(prometheus: Any, scraped: Any) -> None:
    def evaluated() -> dict[str, dict[str, Any]] | None:
        rules = rules_by_name(prometheus)
        done = all(r["lastEvaluation"] > "2000" for r in rules.values())  # RFC 3339, zero time before evaluation
        return rules if done else None

    rules = eventually(evaluated, 15, "every rule evaluated at least once")
    assert set(rules) == set(ALERTS)
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    # A healthy pool raises none of the alarms about lost hosts or targets.
    for name in ("GpupoolHostDown", "GpupoolTargetDown", "GpupoolPoolAlmostFull", "GpupoolInternalErrors"):
        assert rules[name]["state"] == "inactive", rules[name]


def test_alerts_fire_when_their_condition_holds(pool: Any, prometheus: Any, scraped: Any) -> None:
    """Fill the pool beyond 90% and refuse allocations, then kill a daemon: the alert expressions return series."""
    from gpupool.client.pool import SchedulerClient

    from gpupool._proto import scheduler_pb2
    from gpupool.errors import ResourceExhausted

    client = SchedulerClient(pool.scheduler)
    held = []

    def series(expr: str) -> Callable[[], list[Any]]:
        return lambda: prometheus.query(expr)["data"]["result"]

    def refused_and_failing() -> list[Any]:
        # Refusals until they exceed the alert's 10% of the last 5 minutes' requests (the workload's were granted).
        for _ in range(10):
            with pytest.raises(ResourceExhausted):
                client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, tenant="filler"))
        return series(ALERTS["GpupoolAllocationsFailing"])()

    try:
        scraped.allocating.clear()  # the workload's small leases would race the fill below
        time.sleep(1.0)
        # The workload holds 0.5 of one device: whole GPUs on the other three and 0.5 more fill all four devices.
        for fraction in (1.0, 1.0, 1.0, 0.5):
            held.append(client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=fraction, tenant="filler")))
        eventually(series(ALERTS["GpupoolPoolAlmostFull"]), 20, "GpupoolPoolAlmostFull expression")
        eventually(refused_and_failing, 30, "GpupoolAllocationsFailing expression")
        eventually(
            lambda: rules_by_name(prometheus)["GpupoolPoolAlmostFull"]["state"] == "pending", 10, "pool alert pending"
        )
        # A daemon dies: its target goes down at once, the scheduler marks the host down after --host-timeout.
        victim = next(h for h in pool.hosts if h != scraped.host)
        pool.daemons[victim].proc.kill()
        for alert in ("GpupoolTargetDown", "GpupoolHostDown"):
            found = eventually(series(ALERTS[alert]), 30, f"{alert} expression")
            assert len(found) == 1, found
    finally:
        for lease in held:
            client.release(lease.lease_id)
        client.close()
