"""reserve52: both clients count the bytes of their session's tensors (each new output's, less each dead one's): a
tensor that takes the count past the session's quota makes its op a sync, so the daemon's refusal is raised at the
call that made it (torch.OutOfMemoryError out of `torch.randn(..., device=)`, as CUDA's allocator raises), not at the
script's next sync. Far from the quota no op syncs, and after a refusal, once the refused tensor died, the count is
the daemon's again (no op that fits syncs). The shim runs in this process (the `attach` fixture); the C++ client in a
child (it must own PrivateUse1: test_native_client_transfers.py), on the session's shared `gpupool serve`."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from gpupool.client.native.backend import compiler_missing
from gpupool.client.torch import runtime
from shim_fixtures import ServeProcess
from support import session_usage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
QUOTA = 16 * MiB


def _loop(device: Any, steps: int) -> list[float]:
    """A small training loop that syncs once a step (`loss.item()`), far from a 16 MiB quota. (Its source runs in the
    C++ client's child too, which must not import this module: it imports the shim.)"""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 8).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = model(torch.ones(32, 64, device=device)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_the_shim_syncs_only_past_the_quota_and_raises_the_refusal_at_the_call(
    attach: Any, serve: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = attach(quota_bytes=QUOTA)
    rt = runtime.get(dev.index or 0)
    assert rt is not None
    syncs: list[int] = []
    real = rt.session.sync
    monkeypatch.setattr(rt.session, "sync", lambda *a, **k: syncs.append(1) or real(*a, **k))
    _loop(dev, 5)
    assert len(syncs) == 5  # the five `.item()`s: no op synced on its own
    rt.sync()  # (flushes the frees the client counted, and waits for the daemon to run them)
    assert rt.quota - rt._room == session_usage(serve.address, rt.session).used_bytes  # the count is the daemon's

    held = torch.zeros(10 * MiB // 4, device=dev)  # 10 of the 16 MiB
    syncs.clear()
    with pytest.raises(torch.OutOfMemoryError, match="memory quota exceeded"):
        torch.randn(2 * MiB, device=dev)  # 8 MiB: within the quota by itself, not beside `held`
    assert len(syncs) == 1  # the refusal came from the op's own sync
    fits = torch.ones(MiB // 4, device=dev) * 2  # the refused tensor is dead: its bytes are given back
    assert fits.sum().item() == MiB // 2
    assert len(syncs) == 2  # only that `.item()`
    rt.sync()
    assert rt.quota - rt._room == session_usage(serve.address, rt.session).used_bytes
    del held, fits


def test_the_shims_fast_path_counts_into_the_same_float(attach: Any) -> None:
    """perf53: the C fast path (native_ops.cpp `spend_room`) writes the count into the float only the runtime's dict
    holds, in place (no new float and dict store an op), and the count is the one a new float would give; a float
    someone else holds is replaced, not written."""
    dev = attach(quota_bytes=QUOTA)
    rt = runtime.get(dev.index or 0)
    assert rt is not None
    x = torch.ones(64, 64, device=dev)
    y = x * 2  # (the op's schema learned: the next ones take the fast path)
    same = 0
    for _ in range(10):
        before, room = id(rt._room), rt._room
        del room
        y = x * 2
        same += id(rt._room) == before
    assert same == 10
    held = rt._room
    y = x * 3
    assert held - rt._room == 64 * 64 * 4 and rt._room is not held  # (`held` kept its value: a new float)
    del x, y


CHILD = """
import json, sys
import torch
from gpupool.client.native import backend as nc
from gpupool.client.session import Session
LOOP

nc.load()
nc.claim()
session = Session.attach(sys.argv[1], sys.argv[2], timeout=120.0)
nc.connect(session)
dev = nc.device()
syncs = []
real = session.sync
session.sync = lambda *a, **k: syncs.append(1) or real(*a, **k)
out = {"losses": _loop(dev, 5), "far": len(syncs)}
held = torch.zeros(10 * 1024 * 1024 // 4, device=dev)
syncs.clear()
try:
    torch.randn(2 * 1024 * 1024, device=dev)
    out["refused"] = None
except torch.OutOfMemoryError as exc:
    out["refused"] = str(exc).splitlines()[0]
out["near"] = len(syncs)
fits = torch.ones(1024 * 1024 // 4, device=dev) * 2
out["fits"] = [fits.sum().item(), len(syncs)]
print(json.dumps(out))
""".replace("LOOP", "from typing import Any\n" + inspect.getsource(_loop))


@pytest.mark.skipif(compiler_missing() is not None, reason=f"native client: {compiler_missing()}")
def test_the_cpp_client_syncs_only_past_the_quota_and_raises_the_refusal_at_the_call(serve: ServeProcess) -> None:
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, serve.address, serve.token(quota_bytes=QUOTA)], env=env,
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["far"] == 5, got  # the five `.item()`s: no op synced on its own
    assert got["refused"] is not None and "memory quota exceeded" in got["refused"], got
    assert got["near"] == 1, got  # the refusal came from the op's own sync (`sync_near`)
    assert got["fits"] == [MiB // 2, 2], got  # the refused storage is dead: no sync but the `.item()`
