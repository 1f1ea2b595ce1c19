"""The C++ client (client/native/native_client.cpp, gpupool.client.native: the round-12 spike) in wire mode against a
real daemon (`gpupool serve --fake-gpus 1`, loopback, TLS): the tiny MLP, the encoder, the stock MLP and the
sentiment CNN trained through a client/session.py Session give local CPU eager's losses and weights; every class of
op the C++ encoder does not send goes to the Python fallback and gives local's result; daemon errors surface at the
next sync as the shim's exceptions.

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

ROOT = Path(__file__).resolve().parents[2]
from gpupool.client.native.backend import compiler_missing  # noqa: E402

_why = compiler_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why is not None, reason=f"spike backend: {_why}")]
STEPS = 8


def _run(
    serve: Any, model: str, steps: int, *flags: str, env: dict[str, str] | None = None, **claims: Any
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "bench" / "native_client_daemon.py"), "--worker", "--address", serve.address,
           "--token", serve.token(**claims), "--steps", str(steps), "--model", model, *flags]  # fmt: skip
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)


def _train(
    serve: Any, model: str, steps: int, *flags: str, env: dict[str, str] | None = None, **claims: Any
) -> dict[str, Any]:
    proc = _run(serve, model, steps, *flags, env=env, **claims)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def trained(serve: Any) -> dict[str, Any]:
    return _train(serve, "tiny-mlp", STEPS, "--op-set")  # the C++ encoder sends the tiny MLP's and encoder's ops


def test_losses_and_weights_match_local_cpu(trained: dict[str, Any]) -> None:
    local, spike = trained["local"], trained["spike"]
    assert len(spike) == len(local) == STEPS
    assert max(abs(a - b) for a, b in zip(local, spike, strict=True)) <= 1e-5
    assert len(set(spike)) == STEPS  # it trains: every step's loss differs (a stale value would repeat)
    assert trained["max_param_diff"] <= 1e-5  # the weights read back from the daemon (.cpu(): Session.download)


def test_an_item_hands_its_ops_and_sync_over_as_one_frame(trained: dict[str, Any]) -> None:
    """`.item()` after ops the C++ client still holds: its frame of them and the Sync go to the session as one frame
    (client/native/backend.py `sync_scalar`, `Session.sync(commands=)`), one hand-off and one write a synced step, with
    the value the CPU gives of the same weights. On 285a6ed two frames (`send_commands`, then the Sync's)."""
    assert trained["item_frames"] == 1
    assert abs(trained["item_value"] - trained["item_local"]) <= 1e-4


def test_frames_not_ops_go_to_python(trained: dict[str, Any]) -> None:
    s, w = trained["stats"], trained["wire"]
    assert s["op_records"] > 20 * STEPS
    assert STEPS <= w["frames"] < s["op_records"] / 8  # one hand-off per frame (32 commands or a sync), not per op
    # views (t() of the weights, the gradients) travel as view arguments (compact VIEW / VIEWS), no record of their own
    assert w["view_args"] > 0 and w["view_handles"] == 0
    assert s["meta_runs"] == s["cache_entries"]  # each layout inferred once
    assert w["pending"] == 0 and s["double_frees"] == 0


def test_frames_follow_gpupool_flush_ops(serve: Any, trained: dict[str, Any]) -> None:
    """$GPUPOOL_FLUSH_OPS sets the commands a frame, as it does the Python client's (client/torch/runtime.py): 4 cut
    the same training into several times the default's frames, with the same losses; a bad value is refused at attach.
    """
    small = _train(serve, "tiny-mlp", STEPS, "--op-set", env={"GPUPOOL_FLUSH_OPS": "4 "})
    _SMALL.append(small)
    assert small["spike"] == trained["spike"]  # the same records, cut into frames elsewhere
    assert small["stats"]["op_records"] == trained["stats"]["op_records"]
    assert small["wire"]["frames"] > small["stats"]["op_records"] / 5  # the default's: fewer than records / 8
    assert small["wire"]["frames"] > 3 * trained["wire"]["frames"]
    bad = _run(serve, "tiny-mlp", 1, env={"GPUPOOL_FLUSH_OPS": "0"})
    assert bad.returncode != 0
    assert "GPUPOOL_FLUSH_OPS=0 is not a number of commands from 1 to 65536" in bad.stderr


_SMALL: list[dict[str, Any]] = []  # test_frames_follow_gpupool_flush_ops' training with GPUPOOL_FLUSH_OPS=4


def test_frames_go_to_the_session_straight_from_cpp(serve: Any) -> None:
    """A full frame reaches Session.send_commands by native_client.cpp's direct call (`PyHandOff`: one bytes object,
    no operator, no tensor; round 49), counted by wire_stats' `direct_frames` (none on 146577ae: every frame went
    through the `gpupool_native::send` operator; a sync's frame goes with its Sync, a download's by the operator, as
    before). GPUPOOL_NATIVE_HAND_OFF=0 keeps the operator: the same training hands the session as many frames, of the
    same records (the same losses). Frames of 4 commands: several a step."""
    env = {"GPUPOOL_FLUSH_OPS": "4"}
    new = _SMALL[0] if _SMALL else _train(serve, "tiny-mlp", STEPS, "--op-set", env=env)
    assert new["wire"]["direct_frames"] > 3 * STEPS
    assert new["sent_frames"] - new["wire"]["direct_frames"] <= 3  # the downloads' frames after the training
    old = _train(serve, "tiny-mlp", STEPS, "--op-set", env={**env, "GPUPOOL_NATIVE_HAND_OFF": "0"})
    assert old["wire"]["direct_frames"] == 0
    assert old["sent_frames"] == new["sent_frames"] and old["wire"]["frames"] == new["wire"]["frames"]
    assert old["spike"] == new["spike"]
    assert old["stats"]["op_records"] == new["stats"]["op_records"]


def test_an_op_outside_the_set_goes_to_the_python_fallback(trained: dict[str, Any]) -> None:
    assert trained["outside_diff"] <= 1e-6  # sin of the first weight: local's value
    assert trained["python"] == {"remote": 1, "cpu": 0}  # sent as an `Op` by the Python fallback
    assert trained["wire"]["python_ops"] == 2  # sin, then (its composite kernel at PrivateUse2) sin.out


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
    assert encoder["wire"]["view_args"] > 0 and encoder["wire"]["view_handles"] == 0


def test_a_daemon_failure_comes_back_at_the_sync(trained: dict[str, Any]) -> None:
    # the meta kernels cannot see a target out of range; the daemon's kernel does, and .item() raises its error
    assert trained["daemon_error"] == "RemoteError: aten::nll_loss_forward: Target 99 is out of bounds."
    assert trained["after_error"] > 0  # the session goes on


@pytest.fixture(scope="module")
def breadth(serve: Any) -> dict[str, Any]:
    return _train(serve, "tiny-mlp", 1, "--breadth", quota_bytes=64 * 1024 * 1024)


# each class of op the C++ encoder does not send, and the way the Python fallback takes: an `Op` (remote), or the CPU
# around a sync (cpu); counts of the fallback's calls per case (a claimed structured op's functional form reaches it,
# runs its composite kernel there, and its out= form comes back: two calls for one op)
ROUTES = {
    "rounding": ({"remote": 1, "cpu": 0}, 2),  # a string argument
    "rounding_": ({"remote": 1, "cpu": 0}, 2),  # a string argument, in place
    "gelu_tanh": ({"remote": 2, "cpu": 0}, 4),  # a string argument, forward and backward
    "searchsorted": ({"remote": 1, "cpu": 0}, 1),  # a string keyword argument
    "nonzero": ({"remote": 0, "cpu": 1}, 1),  # a data-dependent shape
    "masked_select": ({"remote": 0, "cpu": 1}, 1),
    "unique": ({"remote": 0, "cpu": 1}, 1),  # data-dependent shapes, several outputs
    "equal": ({"remote": 0, "cpu": 2}, 2),  # a non-tensor return
    "cpu_tensor_arg": ({"remote": 1, "cpu": 0}, 1),  # a CPU tensor of 20 elements among the arguments
    "generator": ({"remote": 0, "cpu": 1}, 1),  # a Generator argument
    "generator_": ({"remote": 0, "cpu": 1}, 1),  # a Generator, in place on a view: written back
    "out_resized": ({"remote": 1, "cpu": 0}, 1),  # an out= argument the op resizes
    # not a fallback case: C++ records whose Python numbers are wrapped numbers in the meta kernels too (a plain
    # 0-dim double made the 0-dim result float64 on the client, float32 on the daemon: round 29)
    "python_number": ({"remote": 0, "cpu": 0}, 0),
}


@pytest.mark.parametrize("case", sorted(ROUTES))
def test_each_op_class_the_cpp_encoder_lacks_gives_local_results(breadth: dict[str, Any], case: str) -> None:
    got = breadth[case]
    assert "error" not in got, got
    if "value" in got:
        assert got["value"] == got["local"]
    else:
        assert got["same_shape"] and got["diff"] <= 1e-6
    assert (got["python"], got["python_ops"]) == ROUTES[case]


def _shim_error(e: dict[str, Any], kind: str, op: str, text: str) -> None:
    assert e["type"] == kind and e["op"] == op and e["message"] == f"{op}: {text}", e
    assert "RuntimeError" in e["mro"] and "GpupoolError" in e["mro"]  # what a shim user catches


def test_daemon_errors_surface_at_the_next_sync_as_the_shims(breadth: dict[str, Any]) -> None:
    e = breadth["errors"]
    assert e["compact_fire_and_forget"] and e["python_fire_and_forget"]  # nothing raised before the sync
    _shim_error(e["compact"], "RemoteError", "aten::index_select", "index out of range in self")
    _shim_error(e["synchronize"], "RemoteError", "aten::index_select", "index out of range in self")
    assert e["synchronize_after"] == {}  # reported once: the next synchronize is clean
    # an invalid call: Meta refuses it, and the Python fallback's CPU path raises what local torch raises
    assert e["shapes"]["type"] == "RuntimeError" and "must match the size of tensor b (3)" in e["shapes"]["message"]
    _shim_error(e["python"], "RemoteError", "aten::searchsorted.Tensor",
                "torch.searchsorted(): sorter index out of range")  # fmt: skip
    assert e["quota"]["type"] == "OutOfMemoryError" and e["quota"]["torch_oom"]  # as CUDA's, as the shim's
    assert "memory quota exceeded" in e["quota"]["message"] and "ResourceExhausted" in e["quota"]["mro"]
    for after in ("compact_after", "python_after", "quota_after"):  # the session goes on, with right values
        remote, local = e[after]
        assert abs(remote - local) <= 1e-5, after
    assert e["closed"]["type"] == "DeviceLost" and "closed" in e["closed"]["message"]
    assert e["closed_send"]["type"] == "DeviceLost" and "closed" in e["closed_send"]["message"]  # a frame's hand-off


@pytest.mark.parametrize(("model", "steps"), [("mlp", 4), ("cnn", 3)])
def test_bigger_models_train_like_local_cpu(serve: Any, model: str, steps: int) -> None:
    """launch_bound.py's stock MLP (5 linear layers, MSE) and sentiment CNN (30000-word embedding: a 15 MB upload in
    4 MiB chunks; conv1d, amax, masks; eval mode: dropout's random numbers would be the daemon's) through the daemon."""
    got = _train(serve, model, steps)
    local, spike = got["local"], got["spike"]
    assert len(spike) == steps and max(abs(a - b) for a, b in zip(local, spike, strict=True)) <= 1e-5
    assert len(set(spike)) == steps
    assert got["max_param_diff"] <= 1e-5
    assert got["outside_diff"] <= 1e-5  # sin of the first weight (the CNN: 1.1e-6, vectorized differently)
    assert got["stats"]["double_frees"] == 0 and got["wire"]["pending"] == 0
