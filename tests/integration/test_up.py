"""`gpupool up` end to end: one command brings up a scheduler and a daemon with fake GPUs; `gpupool run`,
`gpupool smi` and `gpupool list-gpus` work against it; SIGTERM / Ctrl-C stop both children cleanly.
"""

from __future__ import annotations

import getpass
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gpupool.client.pool import SchedulerClient
from scheduler_fixtures import ROOT, Proc, wait_until

from gpupool import tls
from gpupool._proto import device_pb2_grpc

CHILD = """
import sys
from gpupool import tls
from gpupool._proto import device_pb2_grpc
from gpupool._proto import device_pb2, device_pb2_grpc
from gpupool.client.pool import Lease
lease = Lease.from_env()
d = lease.devices[0]
stub = device_pb2_grpc.DeviceStub(tls.channel(d.address))  # GPUPOOL_TLS_* handed down by `gpupool run`
reply = stub.Attach(device_pb2.AttachRequest(token=d.token), timeout=10)
print("attached", reply.share, reply.quota_bytes, lease.tenant, flush=True)
print("side", reply.bulk_port > 0, "side_frames" in reply.features, flush=True)
sys.exit(7)
"""

RUN_LINE = re.escape("gpupool run -n 1 -p 0.5 -- python train.py")  # the banner's line after its export lines


def gpupool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupool.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def start_up(tmp: Path) -> tuple[Proc, str]:
    proc = Proc(
        ["up", "--fake-gpus", "2", "--fake-gpu-memory", "512MiB", "--scheduler-listen", "127.0.0.1:0",
         "--listen", "127.0.0.1:0", "--state", str(tmp / "state" / "scheduler.db"),
         "--metrics-listen", "127.0.0.1:0", "--scheduler-metrics-listen", "127.0.0.1:0"]
    )  # fmt: skip
    address = proc.wait_for(r"export GPUPOOL_SCHEDULER=(\S+)", timeout=120).group(1)
    return proc, address


def exports(proc: Proc) -> dict[str, str]:
    """The `export GPUPOOL_...=...` lines `gpupool up` printed: the scheduler, its CA and the user's certificate (all
    of them: the banner's line after the last, waited for)."""
    proc.wait_for(RUN_LINE, timeout=60)
    return dict(re.findall(r"^\s+export (GPUPOOL_\w+)=(\S+)$", "\n".join(proc.lines), re.M))


def refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return False
    except OSError:
        return True


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, str, Path]]:
    """One `gpupool up` for the module's tests that only use it (one start, not one a test, until round 52): its
    process, the scheduler's address and its --state folder. Its tests leave no lease held."""
    tmp = tmp_path_factory.mktemp("up")
    proc, address = start_up(tmp)
    yield proc, address, tmp / "state"
    proc.stop()


def test_up_serves_run_smi_and_list_gpus(up: tuple[Proc, str, Path]) -> None:
    proc, address, state = up
    for secret in ("token.key", f"pki/tenant-{getpass.getuser()}.key", "pki/admin-admin.key", "scheduler.db"):
        assert (state / secret).stat().st_mode & 0o077 == 0, f"{secret} is readable by others"
    assert b"PRIVATE" not in (state / "token.pub").read_bytes()
    # The banner's lines after the export one the fixture waited for: waited for too (a banner that reaches the pipe
    # in two reads is not all in the log yet when that line is).
    proc.wait_for(RUN_LINE, timeout=60)
    # and, in a checkout, one to try (ops43: a new user ran the line above in a fresh clone: no train.py there)
    example = proc.wait_for(r"to try one: python (\S+) --device gpupool --data sample", timeout=60)
    assert Path(example.group(1)) == ROOT / "examples" / "sentiment" / "train.py", proc.log()
    env = {**exports(proc), "GPUPOOL_TENANT": "carol"}  # the tenant comes from the certificate, not from this
    assert env["GPUPOOL_SCHEDULER"] == address and env["GPUPOOL_TLS_CERT"].startswith(str(state))
    client_tls = tls.client_config(ca=env["GPUPOOL_TLS_CA"], cert=env["GPUPOOL_TLS_CERT"], key=env["GPUPOOL_TLS_KEY"])
    listed = gpupool("list-gpus", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == 2 and all("512.0MiB" in line and "up" in line for line in lines)
    assert "free (measured)" not in listed.stdout  # (quota55: a tenant's lines have no measure)
    ran = gpupool("run", "-n", "1", "-p", "0.5", "--", sys.executable, "-c", CHILD, env=env)
    assert ran.returncode == 7, ran.stderr
    assert f"attached 0.5 {256 * 1024**2} {getpass.getuser()}" in ran.stdout
    assert "side True True" in ran.stdout  # the daemon's side port is on: frames travel there (docs/wire.md)
    pool = SchedulerClient(address, client_tls)
    wait_until(lambda: not pool.list_pool().leases, timeout=30, what="run to release its lease")
    too_big = gpupool("run", "-n", "3", "--", "true", env=env)
    assert too_big.returncode == 1 and "no room for 3 GPU(s)" in too_big.stderr
    smi = gpupool("smi", env={**env, "COLUMNS": "200"})
    assert smi.returncode == 0, smi.stderr
    assert "fake" in smi.stdout and "512.0MiB" in smi.stdout and "leases (0 active, 0 waiting)" in smi.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_stops_both_children(tmp_path: Path, sig: signal.Signals) -> None:
    proc, address = start_up(tmp_path)
    daemon = proc.wait_for(r"daemon\s+(\S+)").group(1)
    try:
        proc.popen.send_signal(sig)
        assert proc.popen.wait(30) == 0
        proc.wait_for("gpupool up: stopped")
        wait_until(lambda: refused(address) and refused(daemon), timeout=10, what="both ports to close")
    finally:
        proc.stop()


@pytest.mark.parametrize(("flag", "env"), [(["--host-id", "rack/7"], {}), ([], {"LOGNAME": "a/b", "USER": "a/b"})])
def test_up_refuses_a_name_no_certificate_can_hold_in_one_line(
    tmp_path: Path, flag: list[str], env: dict[str, str]
) -> None:
    """A host id or user name with a '/' cannot be an identity's name (gpupool://host/<id>): `gpupool up` says so in
    one line and starts nothing (round 35: a ValueError's traceback)."""
    state = tmp_path / "state" / "scheduler.db"
    # (free ports: with the defaults, a pool of another test or program on 127.0.0.1:50050 made this `up` refuse the
    # busy port first, round 55)
    ports = ["--scheduler-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--metrics-listen", "0",
             "--scheduler-metrics-listen", "0"]  # fmt: skip
    done = gpupool("up", "--fake-gpus", "1", "--state", str(state), *ports, *flag, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no '/'" in done.stderr and ("a/b" in done.stderr or "rack/7" in done.stderr), done.stderr
    assert not state.exists()


def test_up_daemon_shows_the_admin_every_session_and_a_tenant_its_own(up: tuple[Proc, str, Path]) -> None:
    """`gpupool up` runs its daemon with client certificates required (round 42: under the default `none` its
    Status, `gpupool smi`'s tenants table, showed every tenant's sessions to anyone who reached the port): the
    operator's smi (its admin certificate) lists every session, the user's (its tenant certificate) its own, a caller
    without a certificate is refused at the handshake. Only the operator's has the devices' "free (measured)" column
    (smi54: ListPool's measure is an admin's only), and (quota55) the measure in `smi --watch`'s one-line summary and
    in `list-gpus`' lines (neither had it on 0c688a96)."""
    from support import daemon_status, get_pki

    from gpupool._proto import device_pb2, scheduler_pb2

    proc, address, state_dir = up
    daemon = proc.wait_for(r"daemon\s+(\S+)").group(1)
    env = {**exports(proc), "COLUMNS": "250"}
    state = state_dir / "pki"
    admin = {
        **env,
        "GPUPOOL_TLS_CERT": str(state / "admin-admin.crt"),
        "GPUPOOL_TLS_KEY": str(state / "admin-admin.key"),
    }
    user_tls = tls.client_config(ca=env["GPUPOOL_TLS_CA"], cert=env["GPUPOOL_TLS_CERT"], key=env["GPUPOOL_TLS_KEY"])
    sessions, leases = [], []
    for cfg in (user_tls, get_pki().client_config("tenant", "mallory")):  # the user, and another tenant
        pool = SchedulerClient(address, cfg)
        lease = pool.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25))
        pool.close()
        leases.append((cfg, lease.lease_id))
        # attached with the certificate the lease was allocated with (round 46: its token is bound to it)
        ch = tls.channel(daemon, cfg=cfg, token=False)
        reply = device_pb2_grpc.DeviceStub(ch).Attach(
            device_pb2.AttachRequest(token=lease.devices[0].token), timeout=30
        )
        sessions.append((ch, reply.session_id))
    try:
        user = getpass.getuser()

        # (smi54) whether the devices table has the operator's "free (measured)" column; (quota55) whether --watch's
        # summary line has each device's measure (a fake GPU's: always measured)
        measured: list[tuple[bool, bool]] = []

        def tenants(environment: dict[str, str]) -> list[str]:
            smi = gpupool("smi", "--watch", "--count", "1", env=environment)  # (piped: a summary line, then the view)
            assert smi.returncode == 0, smi.stderr
            summary, devices = smi.stdout.split("\n", 1)
            devices, table = devices.split("tenants (sessions on the daemons)")
            measured.append(("free (measured)" in devices, bool(re.search(r"; free \(measured\): \S+/0 \d", summary))))
            table = table.split("leases (")[0]
            return sorted(t for t in (user, "mallory") if re.search(rf"[│┃]\s*{t}\s*[│┃]", table))

        assert tenants(admin) == sorted([user, "mallory"])
        assert tenants(env) == [user]
        assert measured == [(True, True), (False, False)]  # the operator's view only
        listed = gpupool("list-gpus", env=admin)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.strip().splitlines()
        assert len(lines) == 2 and all(re.search(r"free \(measured\) \d+\.\d+MiB, up", x) for x in lines), lines
        carol = get_pki().issue("tenant", "carol")  # a tenant with no session: an empty table, and why
        smi = gpupool("smi", env={**env, "GPUPOOL_TLS_CERT": str(carol.cert), "GPUPOOL_TLS_KEY": str(carol.key)})
        assert smi.returncode == 0 and "none shown to you" in smi.stdout, smi.stdout + smi.stderr
        with tls.channel(daemon, cfg=tls.client_config(ca=env["GPUPOOL_TLS_CA"], cert="", key=""), token=False) as ch:
            with pytest.raises(grpc.RpcError) as info:  # no certificate: no answer at all
                daemon_status(device_pb2_grpc.DeviceStub(ch))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for ch, session_id in sessions:
            device_pb2_grpc.DeviceStub(ch).Detach(device_pb2.DetachRequest(session_id=session_id), timeout=10)
            ch.close()
        for cfg, lease_id in leases:  # (the module's pool: no lease left to the next test)
            pool = SchedulerClient(address, cfg)
            pool.release(lease_id)
            pool.close()
