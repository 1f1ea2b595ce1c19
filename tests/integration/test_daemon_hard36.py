"""Round 36 hardening (hard36), through real daemons: the C++ runner's binding zeroes a new storage outside its
result as the Python path does (server/native_runner.cpp `bind_new`, `zero_several`), so the reduced losses no longer
need to stay in Python (round 34's `guards.BUFFERED_RESULTS`, gone); `bind_new` tests a result's extent, not its
element count."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import native_runner
from test_daemon_red34 import CANARY, MiB, _plant
from test_daemon_rev35 import _whole

from gpupool import compact

T, V = compact.tensor, compact.encode_value


def _rec(op_id: int, name: str | None, outputs: list[int], args: list[bytes]) -> bytes:
    return b"".join([compact.head(op_id, name, outputs), compact.U8.pack(len(args)), *args, compact.U8.pack(0)])


def _native_ops(metrics_port: int, tenant: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gpupool_eager_native_ops_total{") and f'tenant="{tenant}"' in line
    )


@pytest.mark.parametrize("loss", ["aten::mse_loss.default", "aten::smooth_l1_loss.default"])
def test_a_reduced_loss_in_a_learned_run_holds_no_freed_bytes(daemon_factory: Any, loss: str) -> None:
    """`mse_loss` and `smooth_l1_loss` (mean) return a 0-d loss over a buffer of the elementwise loss's size, its
    other bytes never written. Round 34 kept their steps out of the C++ runner (`guards.BUFFERED_RESULTS`), whose
    binding zeroed nothing; now they run there (the daemon's native op count grows) and the runner zeroes the
    buffer outside the result: a view over the whole storage holds none of another session's freed values, and
    the loss is torch's. (An op the runner took that no scan had found would have leaked the same way.)"""
    if not native_runner.enabled() or native_runner.missing() is not None:
        pytest.skip("no C++ runner here")
    d = daemon_factory(isolation="thread")
    n = 30_000
    with (
        Session.attach(d.address, d.token(tenant="victim", quota_bytes=64 * MiB)) as victim,
        Session.attach(d.address, d.token(tenant="reader", quota_bytes=64 * MiB)) as s,
    ):
        x, y = torch.rand(n), torch.rand(n)
        a, b = Handle(s.upload(x)), Handle(s.upload(y))
        want = getattr(torch.nn.functional, loss.split("::")[1].split(".")[0])(x, y)
        leaked = []
        for step in range(8):  # the first steps teach the run; the later ones run in the runner
            _plant(victim, n)
            out, neg = s.new_handle(), s.new_handle()
            s.eager_op(_rec(0, loss if step == 0 else None, [out], [T(a), T(b)]))
            s.eager_op(_rec(1, "aten::neg" if step == 0 else None, [neg], [T(out)]))
            got = _whole(s, Handle(out), n)
            leaked.append(int((got == CANARY).sum()))
            assert torch.equal(got[1:], torch.zeros(n - 1)), (step, leaked)
            assert torch.equal(s.download(Handle(neg)), -want)
            s.free([out, neg])
        assert not any(leaked), leaked
        assert _native_ops(d.metrics_port, "reader") >= 4, "the runner ran none of the steps"
