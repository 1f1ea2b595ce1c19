"""A client process that stops reading (SIGSTOP: Ctrl-Z, a debugger's breakpoint, a laptop's lid) keeps its session
and carries on after SIGCONT (round 27, issue 8): the daemon holds that session's replies within its reply budget
(`--outbox-bytes`) and parks it, runs nothing more of it, and resumes it when the client reads again; another
session on the same daemon works meanwhile; a killed client's session is still reclaimed at once.

The daemon's liveness timers are shortened here so that they all fire during the pause, several times over: gRPC's
keepalive pings (`service.KEEPALIVE_TIME`) and the side socket's TCP keepalive probes (`bulkside.PEER_*`, the first
after 1 s of silence). Until round 27 a send stalled for `IO_TIMEOUT` (30 s) and an unanswered ping (5 s) each
ended the session; a pause longer than every timer shows that none of them ends a paused client, not that a
constant is large. Both carriers: frames on the side socket (the default) and on the gRPC stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import bulkside, service
from support import get_pki

from gpupool import protocol

MiB = 1024**2
PAUSE = 8.0  # seconds: past the old stall limit as shortened here, and every keepalive timer, several times
GETS = 8  # downloads of 8 MiB each in flight when the client stops: 64 MiB of replies, four times the budget

# The paused client: a real process, with the session API a training script's shim uses. It uploads a tensor, then
# on "go" asks for GETS downloads of it at once (their replies are what the daemon must hold), says when the
# first has come, and checks each.
CLIENT = r"""
import sys, torch
from gpupool._proto import device_pb2
from gpupool.client.session import Session, _Want
s = Session.attach(sys.argv[1], sys.argv[2])
x = torch.arange(2 * 1024 * 1024, dtype=torch.float32)
h = s.upload(x)
s.sync()
print("ready", s.session_id, s._carrier is not None, flush=True)
sys.stdin.readline()
want = _Want(tuple(x.shape), x.dtype, s.quota_bytes)  # what each download may be (client/session.py)
asked = [s._request(device_pb2.Command(get=device_pb2.Get(handle=h, bulk=s._side is not None)), want)
         for _ in range(GETS)]
s.flush()
for i, (rid, w) in enumerate(asked):
    s._wait(rid, w)
    assert torch.equal(w.tensor, x), "a download after the pause differs"
    if i == 0:
        print("flowing", flush=True)  # the Gets reached the daemon: their replies come
print("ok", len(asked), flush=True)
s.close()
""".replace("GETS", str(GETS))


@pytest.fixture(params=["side", "stream"])
def carrier(request: Any, monkeypatch: Any) -> str:
    monkeypatch.setattr(service, "KEEPALIVE_TIME", 0.5)
    monkeypatch.setattr(bulkside, "PEER_IDLE", 1.0)
    monkeypatch.setattr(bulkside, "PEER_INTERVAL", 1.0)
    monkeypatch.setattr(bulkside, "PEER_PROBES", 2)
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1" if request.param == "side" else "0")
    return str(request.param)


def _client(daemon: Any) -> tuple[subprocess.Popen[str], str]:
    """A started client process, its upload done: (process, its session id)."""
    env = {**os.environ, **get_pki().env()}
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, daemon.address, daemon.token()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    assert line.startswith("ready "), line + proc.stdout.read()
    _, session_id, side = line.split()
    assert side == str(os.environ["GPUPOOL_SIDE_FRAMES"] == "1"), line
    return proc, session_id


def _ask_and_stop(proc: subprocess.Popen[str]) -> None:
    """Let the client ask for its downloads, then stop it while their replies come (the first has)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line.startswith("flowing"):  # the client failed: its whole output (a traceback) says why
        proc.kill()
        raise AssertionError(line + proc.communicate(timeout=60)[0])
    os.kill(proc.pid, signal.SIGSTOP)


def _session(daemon: Any, session_id: str) -> Any:
    return next((s for s in daemon.running.daemon.session_list() if s.session_id == session_id), None)


def _neighbour_works(s: Session, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    [out] = s.call("aten::mm.default", Handle(s.upload(a)), Handle(s.upload(b)))
    assert torch.equal(s.download(out), a @ b)


def test_a_paused_client_carries_on_after_sigcont(daemon_factory: Any, carrier: str) -> None:
    daemon = daemon_factory(fake_gpu_memory=256 * MiB, bulk_listen="127.0.0.1:0")
    budget = daemon.running.daemon.config.outbox_bytes
    with Session.attach(daemon.address, daemon.token()) as neighbour:
        proc, session_id = _client(daemon)
        try:
            _ask_and_stop(proc)
            paused = _session(daemon, session_id)
            assert paused is not None
            start = time.monotonic()
            held = []
            while time.monotonic() - start < PAUSE:
                _neighbour_works(neighbour, len(held))  # another session on the same daemon: unaffected
                held.append(paused.outbox_bytes)
                assert not paused.closed, paused.close_reason
                time.sleep(0.5)
            # The daemon held the paused session's replies within its budget (plus one slice's chunks) and stopped
            # running its commands: parked, not growing, not ended.
            assert paused.entry.blocked, f"the paused session should be parked by its reply budget: {held}"
            assert 0 < max(held) <= budget + 2 * protocol.CHUNK_BYTES, (held, budget)
            assert held[-1] == held[len(held) // 2], f"the paused session's replies grew: {held}"
            assert _session(daemon, session_id) is paused
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and f"ok {GETS}" in out, out
        _neighbour_works(neighbour, 99)


def test_a_killed_paused_clients_session_is_reclaimed(daemon_factory: Any, carrier: str) -> None:
    daemon = daemon_factory(fake_gpu_memory=256 * MiB, bulk_listen="127.0.0.1:0")
    with Session.attach(daemon.address, daemon.token()) as neighbour:
        proc, session_id = _client(daemon)
        _ask_and_stop(proc)
        time.sleep(2.0)  # parked, its writer blocked on the stopped client
        paused = _session(daemon, session_id)
        assert paused is not None and not paused.closed
        proc.kill()  # SIGKILL ends a stopped process too: its kernel closes its sockets
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while _session(daemon, session_id) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _session(daemon, session_id) is None, "a killed client's session should be reclaimed"
        assert paused.closed and paused.outbox_bytes == 0 or not paused.counted
        _neighbour_works(neighbour, 1)
