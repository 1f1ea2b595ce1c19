"""Compute shares: sessions saturating one fake GPU get busy time in proportion to their shares, and a lone
session gets the whole device (work-conserving).

Measured as the busy time the daemon charges each session (Status RPC), so noise from other processes on the
machine affects both sessions alike. The daemon runs as its own process so its executor never waits for the
test's GIL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
from gpupool.client.session import Handle, Session
from shim_fixtures import ServeProcess, start_daemon
from support import daemon_status, stop_process

from gpupool.tokens import public_session_id

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One `gpupool serve` (a 1 GiB fake GPU, one CPU thread) for both tests, each of which closes its sessions (until
    round 44 a daemon each)."""
    daemon = start_daemon(tmp_path_factory.mktemp("fairshare"), "1GiB", 1, "--cpu-threads", "1")
    yield daemon
    stop_process(daemon.process)


class Saturator:
    """Keeps a session's queue on the daemon full of matmuls until stopped (back-pressure paces it)."""

    def __init__(self, address: str, token: str) -> None:
        self.session = Session.attach(address, token)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        s = self.session
        try:
            a = Handle(s.upload(torch.randn(384, 384)))
            out = s.new_handle()
            while not self._stop.is_set():
                for _ in range(64):
                    s.call("aten::mm.default", a, a, outputs=[out])
                s.flush()
        except BaseException as exc:
            self.errors.append(exc)

    def alive(self) -> bool:
        return self._thread.is_alive() and not self.errors

    def stop(self) -> None:
        self._stop.set()
        self.session.close()
        self._thread.join(timeout=30)


def busy(address: str, sessions: list[Saturator]) -> dict[str, float]:
    reply = daemon_status(address, *(s.session for s in sessions))  # (Status shows the sessions it names)
    return {s.session_id: s.busy_seconds for s in reply.sessions}


def measure(address: str, sessions: list[Saturator], window: float) -> tuple[list[float], float]:
    """Busy seconds each session was charged in `window` wall seconds, and the window's length. The window opens
    once every session has been charged several slices (all are running), not after a fixed warm-up: on a loaded
    box a saturator's attach and upload took longer than round 28's 1 s, and one running alone in the window's
    first part would skew the shares."""
    tags = [public_session_id(s.session.session_id) for s in sessions]  # Status shows public tags only
    deadline = time.monotonic() + 120
    while min(busy(address, sessions).get(tag, 0.0) for tag in tags) < 0.05:  # 10 of the daemon's 5 ms slices each
        assert all(s.alive() for s in sessions), [s.errors for s in sessions]
        assert time.monotonic() < deadline, f"not every session ran within 120 s: {busy(address, sessions)}"
        time.sleep(0.05)
    t0, b0 = time.monotonic(), busy(address, sessions)
    time.sleep(window)
    t1, b1 = time.monotonic(), busy(address, sessions)
    assert all(s.alive() for s in sessions), [s.errors for s in sessions]
    return [b1[tag] - b0[tag] for tag in tags], t1 - t0


def test_shares_quarter_and_three_quarters_within_ten_percent(d: ServeProcess) -> None:
    low = Saturator(d.address, d.token(share=0.25, tenant="low"))
    high = Saturator(d.address, d.token(share=0.75, tenant="high"))
    try:
        (b_low, b_high), elapsed = measure(d.address, [low, high], window=6.0)
    finally:
        low.stop()
        high.stop()
    total = b_low + b_high
    assert total > 0.5 * elapsed, f"device not saturated: {total:.2f}s busy in {elapsed:.2f}s"
    for got, share in ((b_low, 0.25), (b_high, 0.75)):
        entitlement = share * total
        assert abs(got - entitlement) <= 0.10 * entitlement, f"share {share}: {got:.3f}s of {total:.3f}s busy"


def test_lone_quarter_share_gets_the_whole_device(d: ServeProcess) -> None:
    lone = Saturator(d.address, d.token(share=0.25))
    try:
        (b_lone,), elapsed = measure(d.address, [lone], window=3.0)
    finally:
        lone.stop()
    assert b_lone > 0.6 * elapsed, f"work-conserving: {b_lone:.2f}s busy in {elapsed:.2f}s with share 0.25"
