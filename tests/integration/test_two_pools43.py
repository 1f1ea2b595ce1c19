"""Two pools, or two daemons, on one host (ops43): each daemon has its own host id and its fake GPUs their own UUIDs.

Until round 43 every daemon given no `--host-id` was the host name, and `gpupool up` passed the host name too: two
daemons registering with one scheduler were one host to it (the second's Register replaced the first's), and two
pools showed smi and Prometheus the same host and GPUs (a fake GPU's UUID derives from its host id and index). Now
`gpupool serve` without `--host-id` takes the host name only on its default port (the deploy units'), the host name
and its port elsewhere; `gpupool up` the host name for its default state folder, else the host name and a digest of
its state folder, the same at every start of that pool. Real schedulers and daemons on loopback.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.server.cli import default_host_id
from scheduler_fixtures import LISTEN_RE, ROOT, Proc, key_file, start_scheduler, wait_until

pytestmark = pytest.mark.slow
REGISTERED = re.compile(r"registered with scheduler \S+ as (\S+) \(")


def test_a_daemon_given_no_host_id_is_the_host_name_on_the_default_port_only() -> None:
    name = socket.gethostname()
    assert default_host_id("0.0.0.0:50051") == default_host_id("127.0.0.1:50051") == name  # the deploy units'
    assert default_host_id("127.0.0.1:7001") == f"{name}-7001"  # fixed: the same at every start
    first, second = default_host_id("127.0.0.1:0"), default_host_id("[::1]:0")
    assert first != second and first.startswith(f"{name}-") and len(first) == len(name) + 7


def test_two_daemons_without_a_host_id_are_two_hosts_to_one_scheduler(tmp_path: Path) -> None:
    """Two `gpupool serve --fake-gpus 2` on this host, neither given --host-id, registering with one scheduler:
    two hosts, four distinct UUIDs (round 42: one host, whichever registered last, two UUIDs)."""
    sched, address = start_scheduler(tmp_path)
    daemons: list[Proc] = []
    args = ["--metrics-listen", "0", "--fake-gpus", "2", "--fake-gpu-memory", "256MiB", "--token-key-file",
            str(key_file(tmp_path)), "--scheduler", address, "--heartbeat-interval", "0.5",
            "--isolation", "thread"]  # fmt: skip
    try:
        daemons.append(Proc(["serve", "--listen", "127.0.0.1:0", *args]))
        for _ in range(5):  # the second on a port named in advance (its host id names it): it binds the port itself
            port = _free_port()
            daemons.append(Proc(["serve", "--listen", f"127.0.0.1:{port}", *args]))
            if "in use" not in daemons[-1].wait_for(rf"{LISTEN_RE.pattern}|the port is in use", timeout=150).group(0):
                break
            daemons.pop().stop()  # another process took the free port before the daemon bound it: another one
        else:
            raise AssertionError("no free port for the second daemon after 5 attempts")
        ids = [d.wait_for(REGISTERED, timeout=150).group(1) for d in daemons]
        assert len(set(ids)) == 2 and ids[1] == f"{socket.gethostname()}-{port}", ids
        client = SchedulerClient(address)
        try:
            wait_until(lambda: len(client.list_pool().hosts) == 2, what="both hosts in the pool")
            hosts = client.list_pool().hosts
        finally:
            client.close()
        assert sorted(h.host_id for h in hosts) == sorted(ids)
        uuids = [d.info.uuid for h in hosts for d in h.devices]
        assert len(uuids) == 4 == len(set(uuids)), uuids
    finally:
        for d in daemons:
            d.stop()
        sched.stop()


def _free_port() -> int:
    """A port that was free a moment ago: only for a program that must be told its port before it starts (its callers
    retry when another process took it meanwhile), never for one that can bind port 0 and say which it got."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up(state: Path) -> Proc:
    return Proc(
        ["up", "--fake-gpus", "1", "--fake-gpu-memory", "256MiB", "--scheduler-listen", "127.0.0.1:0", "--listen",
         "127.0.0.1:0", "--state", str(state / "scheduler.db"), "--metrics-listen", "0",
         "--scheduler-metrics-listen", "0"]
    )  # fmt: skip


def _gpus(proc: Proc) -> tuple[str, list[str]]:
    """The pool's host id (its daemon's log) and its GPUs' UUIDs (`gpupool list-gpus` with the pool's admin
    certificate)."""
    host = proc.wait_for(REGISTERED, timeout=150).group(1)
    scheduler = proc.wait_for(r"export GPUPOOL_SCHEDULER=(\S+)", timeout=150).group(1)
    ca, admin = proc.wait_for(r"TLS\s+CA (\S+); admin certificate (\S+)").groups()
    done = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "list-gpus", "--scheduler", scheduler, "--tls-ca", ca,
         "--tls-cert", admin, "--tls-key", admin.removesuffix(".crt") + ".key"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return host, re.findall(r"\(UUID: (\S+)\)", done.stdout)


def test_two_pools_on_one_host_have_their_own_host_ids_and_gpus_kept_across_restarts(tmp_path: Path) -> None:
    """Two `gpupool up`, each with its own --state (and ports): two host ids, two sets of fake GPU UUIDs (round 42:
    the host name and the same UUIDs in both); a pool started again from its state has the same ones."""
    states = [tmp_path / "a", tmp_path / "b"]
    pools = [_up(state) for state in states]
    try:
        (host_a, gpus_a), (host_b, gpus_b) = (_gpus(p) for p in pools)
        assert host_a != host_b and host_a.startswith(socket.gethostname() + "-"), (host_a, host_b)
        assert len(gpus_a) == len(gpus_b) == 1 and not set(gpus_a) & set(gpus_b), (gpus_a, gpus_b)
        pools[0].stop(30)
        pools[0] = _up(states[0])
        assert _gpus(pools[0]) == (host_a, gpus_a)  # the same pool: the same host and GPUs
    finally:
        for p in pools:
            p.stop(30)


def test_a_pool_on_the_default_state_folder_keeps_the_host_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default state folder's pool is the host name, as before (its certificates and state keep their name)."""
    from gpupool import up

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert up.default_host_id(up.default_state_dir() / "scheduler.db") == socket.gethostname()
    assert up.default_host_id(tmp_path / "other" / "scheduler.db") != socket.gethostname()
    assert up.default_host_id(tmp_path / "other" / "scheduler.db") == up.default_host_id(
        tmp_path / "other" / ".." / "other" / "scheduler.db"
    )
