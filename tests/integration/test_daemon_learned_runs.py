"""Learned runs of eager records (server/runs.py) through a real daemon: a training loop's repeated records run
inside learned runs from its second step on, the losses stay those of local training, and the daemon's metrics
show how many eager ops ran that way (gpupool_eager_learned_ops_total; gpupool_eager_native_ops_total for those
the C++ runner ran: docs/metrics.md)."""

from __future__ import annotations

import re
from typing import Any

import torch
from gpupool.server import native_runner
from support import scrape
from torch import nn


def _train(device: torch.device, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 8, generator=gen), torch.randint(0, 2, (4,), generator=gen)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        losses.append(loss)
    return [float(v.item()) for v in losses]


def _counter(text: str, name: str, tenant: str) -> float:
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'tenant="{tenant}"' in line
    ]
    return sum(values)


def test_a_training_loop_runs_in_learned_runs_and_the_metrics_count_them(daemon: Any) -> None:
    import gpupool.torch as gt

    steps = 8
    local = _train(torch.device("cpu"), steps)
    device = gt.attach(daemon.address, daemon.token(tenant="runs"))
    try:
        remote = _train(device, steps)
    finally:
        gt.detach_all()
    assert max(abs(a - b) for a, b in zip(remote, local, strict=True)) < 1e-5, (remote, local)
    text = scrape(daemon.metrics_port)
    assert re.search(r"^# TYPE gpupool_eager_learned_ops_total counter$", text, re.M), text[:2000]
    learned = _counter(text, "gpupool_eager_learned_ops_total", "runs")
    ops = _counter(text, "gpupool_tenant_ops_total", "runs")
    # Step 1 runs record by record and is learned; the later steps' records match what was learned (where a slice
    # or frame cut falls mid-step, a new run is learned from there once): here ~5 of 8 steps ran in runs, and the
    # first step never can.
    per_step = ops / steps
    assert learned >= ops / 2, (learned, ops)
    assert learned <= ops - per_step / 2, (learned, ops)
    # Of those, the C++ runner (server/native_runner.py) ran the records it takes: here nearly all (124 of 130 when
    # written; 57 of 133 before it took runs' first steps, several outputs and Scalar[] step sizes, round 14).
    # Where the runner is off or cannot be built, the counter exists and stays zero.
    assert re.search(r"^# TYPE gpupool_eager_native_ops_total counter$", text, re.M), text[:2000]
    native = _counter(text, "gpupool_eager_native_ops_total", "runs")
    assert native <= learned, (native, learned)
    if native_runner.enabled() and native_runner.missing() is None:
        assert native >= learned * 0.7, (native, learned)
    else:
        assert native == 0, native
