"""Compute shares: sessions saturating one fake GPU get busy time in proportion to their shares, and a lone
session gets the whole device (work-conserving).

Measured as the busy time the daemon charges each session (Status RPC), so noise from other processes on the
machine affects both sessions alike. The daemon runs as its own process so its executor never waits for the
test's GIL.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from support import tls_channel

from gpupool._proto import device_pb2, device_pb2_grpc
from gpupool.tokens import public_session_id

pytestmark = pytest.mark.slow


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


def busy(address: str) -> dict[str, float]:
    with tls_channel(address) as channel:
        reply = device_pb2_grpc.DeviceStub(channel).Status(device_pb2.StatusRequest(), timeout=10)
    return {s.session_id: s.busy_seconds for s in reply.sessions}


def measure(address: str, sessions: list[Saturator], warmup: float, window: float) -> tuple[list[float], float]:
    time.sleep(warmup)
    t0, b0 = time.monotonic(), busy(address)
    time.sleep(window)
    t1, b1 = time.monotonic(), busy(address)
    assert all(s.alive() for s in sessions), [s.errors for s in sessions]
    tags = [public_session_id(s.session.session_id) for s in sessions]  # Status shows public tags only
    return [b1[tag] - b0[tag] for tag in tags], t1 - t0


def test_shares_quarter_and_three_quarters_within_ten_percent(serve_process: Any) -> None:
    d = serve_process("--fake-gpus", "1", "--fake-gpu-memory", "1GiB", "--cpu-threads", "1")
    low = Saturator(d.address, d.token(share=0.25, tenant="low"))
    high = Saturator(d.address, d.token(share=0.75, tenant="high"))
    try:
        (b_low, b_high), elapsed = measure(d.address, [low, high], warmup=1.0, window=6.0)
    finally:
        low.stop()
        high.stop()
    total = b_low + b_high
    assert total > 0.5 * elapsed, f"device not saturated: {total:.2f}s busy in {elapsed:.2f}s"
    for got, share in ((b_low, 0.25), (b_high, 0.75)):
        entitlement = share * total
        assert abs(got - entitlement) <= 0.10 * entitlement, f"share {share}: {got:.3f}s of {total:.3f}s busy"


def test_lone_quarter_share_gets_the_whole_device(serve_process: Any) -> None:
    d = serve_process("--fake-gpus", "1", "--fake-gpu-memory", "1GiB", "--cpu-threads", "1")
    lone = Saturator(d.address, d.token(share=0.25))
    try:
        (b_lone,), elapsed = measure(d.address, [lone], warmup=1.0, window=3.0)
    finally:
        lone.stop()
    assert b_lone > 0.6 * elapsed, f"work-conserving: {b_lone:.2f}s busy in {elapsed:.2f}s with share 0.25"
