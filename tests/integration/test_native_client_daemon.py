"""The C++ client spike (spike/native_client.cpp) in wire mode against a real daemon (`gpupool serve --fake-gpus 1`,
loopback, TLS): the tiny MLP trained through a client/session.py Session gives local CPU eager's losses and weights.

The spike must own PrivateUse1, which this pytest process has given to gpupool, so the training runs in a child
(bench/native_client_daemon.py's worker, TORCH_DEVICE_BACKEND_AUTOLOAD=0) that prints JSON. Slow (the backend's first
build takes ~1 min); skipped without a C++ compiler or ninja.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import shim_fixtures

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "spike"))
from native_client import compiler_missing  # noqa: E402

serve = shim_fixtures.serve
_why = compiler_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why is not None, reason=f"spike backend: {_why}")]
STEPS = 8


def _train(serve: Any, model: str, steps: int) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "bench" / "native_client_daemon.py"), "--worker", "--address", serve.address,
           "--token", serve.token(), "--steps", str(steps), "--model", model]  # fmt: skip
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def trained(serve: Any) -> dict[str, Any]:
    return _train(serve, "tiny-mlp", STEPS)


def test_losses_and_weights_match_local_cpu(trained: dict[str, Any]) -> None:
    local, spike = trained["local"], trained["spike"]
    assert len(spike) == len(local) == STEPS
    assert max(abs(a - b) for a, b in zip(local, spike, strict=True)) <= 1e-5
    assert len(set(spike)) == STEPS  # it trains: every step's loss differs (a stale value would repeat)
    assert trained["max_param_diff"] <= 1e-5  # the weights read back from the daemon (.cpu(): Session.download)


def test_frames_not_ops_go_to_python(trained: dict[str, Any]) -> None:
    s, w = trained["stats"], trained["wire"]
    assert s["op_records"] > 20 * STEPS
    assert STEPS <= w["frames"] < s["op_records"] / 8  # one hand-off per frame (32 commands or a sync), not per op
    assert w["view_handles"] > 0  # views (t() of the weights, the gradients) named through as_strided handles
    assert s["meta_runs"] == s["cache_entries"]  # each layout inferred once
    assert w["pending"] == 0 and s["double_frees"] == 0


def test_an_op_outside_the_set_is_a_clear_error(trained: dict[str, Any]) -> None:
    assert "aten::sin is outside the op set" in trained["outside_error"]


@pytest.fixture(scope="module")
def encoder(serve: Any) -> dict[str, Any]:
    return _train(serve, "encoder", 4)


def test_the_encoder_trains_like_local_cpu(encoder: dict[str, Any]) -> None:
    """launch_bound.py's encoder (eval mode: dropout's random numbers would be the daemon's): views of every kind, bmm,
    softmax, layer norm, embedding's backward, copies on the device."""
    local, spike = encoder["local"], encoder["spike"]
    assert max(abs(a - b) for a, b in zip(local, spike, strict=True)) <= 1e-5
    assert len(set(spike)) == len(spike)
    for name, diff in encoder["param_diffs"].items():
        # in_proj_bias's key part has a zero true gradient (softmax ignores a shift shared by all keys): Adam turns
        # its float noise, summed in another order on the daemon, into steps of up to lr (1e-3)
        assert diff <= (1e-3 if name.endswith("in_proj_bias") else 1e-5), name
    assert encoder["wire"]["view_handles"] > 0


def test_a_daemon_failure_comes_back_at_the_sync(trained: dict[str, Any]) -> None:
    # the meta kernels cannot see a target out of range; the daemon's kernel does, and .item() raises its error
    assert trained["daemon_error"] == "InvalidArgument: aten::nll_loss_forward: Target 99 is out of bounds."
    assert trained["after_error"] > 0  # the session goes on
