"""A diagnostic loop, run by hand (pytest does not collect it by itself; name it on the command line): the pair
of runs of test_shim_views' `_foreach_` optimizer test (lists with view elements, then plain lists) in a fresh
session (a fresh worker process) per iteration, in one test process, reporting every run whose losses, re-read
losses or parameters differ from the first iteration's. Round 22 found the flaky bit-for-bit encoder test with it
(BENCHMARKS.md, "Round 22, flaky22"):

    FLAKY_N=200 .venv/bin/python -m pytest -q -s tests/integration/loop_shim_views.py --timeout=0

with two `nice -n 19 sh -c 'while :; do :; done'` beside. FLAKY_MODEL (encoder, tiny-mlp), FLAKY_OPT (adam,
adamw), FLAKY_ORDER (vp: views first), FLAKY_FRESH (1: a fresh session per iteration)."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch
from gpupool.client.torch import encode
from test_shim_views import _foreach_train, _plain_lists

import gpupool.torch as gt

N = int(os.environ.get("FLAKY_N", "20"))
MODEL = os.environ.get("FLAKY_MODEL", "encoder")
OPT = os.environ.get("FLAKY_OPT", "adamw")
FRESH = os.environ.get("FLAKY_FRESH", "1") == "1"
ORDER = os.environ.get("FLAKY_ORDER", "vp")
Run = tuple[list[float], list[float], list[torch.Tensor]]


def _train(d: Any, steps: int = 5) -> Run:
    """test_shim_views' `_foreach_train`, each step's loss read again at the end (a download race would differ)."""
    kept: list[torch.Tensor] = []
    losses, params = _foreach_train(d, MODEL, OPT, steps, kept)
    return losses, [t.item() for t in kept], params


def _differ(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[int]:
    return [j for j, (p, q) in enumerate(zip(a, b, strict=True)) if not torch.equal(p, q)]


def test_loop(attach: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ref: Run | None = None
    bad = 0
    t0 = time.time()
    for i in range(N):
        dev = attach()
        res: dict[str, Run] = {}
        for kind in ORDER:
            if kind == "v":
                res[kind] = _train(dev)
            else:
                with monkeypatch.context() as m:
                    m.setattr(encode, "_c_tensor_list", _plain_lists)
                    res[kind] = _train(dev)
        if ref is None:
            ref = res[ORDER[0]]
        for kind, (losses, reread, params) in res.items():
            msg = []
            if losses != ref[0]:
                msg.append(f"loss {losses}")
            if reread != losses:
                msg.append(f"reread {reread}")
            if _differ(params, ref[2]):
                msg.append(f"params {_differ(params, ref[2])}")
            if msg:
                bad += 1
                print("MISMATCH", i, kind, ORDER.index(kind), "; ".join(msg), flush=True)
        if FRESH:
            gt.detach_all()
    print(f"RESULT n={N} bad={bad} secs={time.time() - t0:.1f} ref={ref[0] if ref else None}", flush=True)
