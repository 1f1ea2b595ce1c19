"""Two gpupool devices in one process (`gpupool run -n 2`, or `attach` twice): a model trained on gpupool:1 alone, and
one split across gpupool:0 and gpupool:1 (model parallel, `.to()` between the layers), give the CPU's losses; torch's
device guards, torch.accelerator and gpupool's current device agree; DataParallel is refused with its reason.

The cases run in a child process (the device guard is process-wide) against the session's `gpupool serve --fake-gpus
2` (conftest.py: serve): one child with the native device guard and one with torch's Python guard (GPUPOOL_NATIVE=0),
side by side, each running TRAIN and then CURRENT (on sessions of their own) and printing one RESULT line for each;
the tests check their parts of the two children's results (four children, one per test and one at a time, until
round 21)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import communicate

REPO = Path(__file__).resolve().parents[2]
Child = Callable[[bool], dict[str, Any]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("native-cache")  # the native guard is built once for the module


PRELUDE = r"""
import json, os, threading
import torch
from torch import nn
import gpupool.torch as gt
from gpupool.client.torch import native

PART = 0  # each script of the child attaches with tokens (leases) of its own

def attach(i):
    return gt.attach(os.environ["T_ADDRESS"], os.environ["T_TOKEN%d_%d" % (PART, i)], index=i)

def train(first, second, steps=4):
    "An MLP whose first layer lives on `first` and second on `second`: the CPU's losses or a gpupool run's."
    torch.manual_seed(0)
    l1, l2 = nn.Linear(8, 16), nn.Linear(16, 1)
    l1.to(first)
    l2.to(second)
    opt = torch.optim.Adam([*l1.parameters(), *l2.parameters()], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        h = torch.relu(l1(x.to(first)))
        loss = nn.functional.mse_loss(l2(h.to(second)), y.to(second))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    grads = sorted({str(p.grad.device) for p in [*l1.parameters(), *l2.parameters()]})
    return {"losses": losses, "grad_devices": grads, "weight": l2.weight.detach().cpu().sum().item()}
"""

TRAIN = r"""
seen = {"cpu": train("cpu", "cpu")}
d0 = attach(0)
seen["on_0"] = train(d0, d0)  # the process's first backward, before gpupool:1 exists
d1 = attach(1)
seen["on_1"] = train(d1, d1)
seen["split_0_1"] = train(d0, d1)
seen["split_1_0"] = train(d1, d0)
out = {}
def in_thread():  # backward started on a thread of the script's own
    w = torch.ones(3).to(d1).requires_grad_()
    ((w * 2).to(d0) * 3).sum().backward()
    out["thread_grad"] = [str(w.grad.device), w.grad.cpu().tolist()]
t = threading.Thread(target=in_thread)
t.start()
t.join()
seen.update(out)
seen["device_count"] = [torch.gpupool.device_count(), torch.accelerator.device_count()]
gt.detach_all()
print("RESULT", json.dumps({"active": native.active(), "seen": seen}))
"""

CURRENT = r"""
PART += 1
seen = {}
d0, d1 = attach(0), attach(1)
a, b = torch.arange(4.0).to(d0), torch.arange(4.0).to(d1)
torch.gpupool.set_device(1)
seen["set_1"] = [gt.current_index(), torch.gpupool.current_device(), torch.accelerator.current_device_index(),
                 str(torch.ones(2, device="gpupool").device), str(torch.zeros(2, device="gpupool").device)]
with torch.device("gpupool"):  # no index: the current device
    seen["with_device_no_index"] = str(torch.ones(2).device)
with torch.device("gpupool:0"):
    seen["with_device_0"] = str(torch.ones(2).device)
torch.gpupool.set_device(0)
seen["ops_on_1_keep_current"] = [(b * 2).sum().item(), gt.current_index(), torch.accelerator.current_device_index()]
w = torch.ones(3).to(d1).requires_grad_()
(w * 3).sum().backward()
seen["backward_on_1_keeps_current"] = [str(w.grad.device), gt.current_index(),
                                       torch.accelerator.current_device_index()]
with torch.accelerator.device_index(1):  # torch's device guard (exchangeDevice), around ops on both devices
    seen["inside_guard_1"] = [gt.current_index(), torch.accelerator.current_device_index(),
                              str(torch.ones(2, device="gpupool").device), (a + 1).sum().item(), str((b + 1).device)]
seen["after_guard"] = [gt.current_index(), torch.accelerator.current_device_index(),
                       str(torch.ones(2, device="gpupool").device)]
torch.accelerator.set_device_index(1)
seen["accelerator_set_1"] = [gt.current_index(), str(torch.ones(2, device="gpupool").device)]
torch.gpupool.set_device(0)
other = {}
def in_thread():  # the current device is per thread, as CUDA's
    other["start"] = gt.current_index()
    torch.gpupool.set_device(1)
    other["set"] = [gt.current_index(), str(torch.ones(2, device="gpupool").device)]
t = threading.Thread(target=in_thread)
t.start()
t.join()
seen["thread"] = [other, gt.current_index()]
try:
    torch.gpupool.set_device(128)
except ValueError as exc:
    seen["out_of_range"] = str(exc)
try:
    nn.DataParallel(nn.Linear(4, 2).to(d0), device_ids=[0, 1])
    seen["data_parallel"] = "built"
except RuntimeError as exc:
    seen["data_parallel"] = str(exc)
gt.detach_all()
print("RESULT", json.dumps({"active": native.active(), "seen": seen}))
"""


def _start(serve: Any, cache: Path, scripts: list[str], native: bool) -> subprocess.Popen[str]:
    """A child running `scripts` one after the other."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPUPOOL_NATIVE", "CXX", "GPUPOOL_LEASE", "GPUPOOL_CUDA")}
    env.update(GPUPOOL_NATIVE_CACHE=str(cache), GPUPOOL_NATIVE="1" if native else "0", T_ADDRESS=serve.address,
               PYTHONPATH=str(REPO))  # fmt: skip
    env.update({f"T_TOKEN{part}_{i}": serve.token(device=i) for part in range(len(scripts)) for i in (0, 1)})
    cmd = [sys.executable, "-c", PRELUDE + "".join(scripts)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(proc: subprocess.Popen[str], scripts: int, native: bool) -> list[dict[str, Any]]:
    """The child's results, one per script, in order."""
    stdout, stderr = communicate(proc, 240)
    out = stdout + stderr
    assert proc.returncode == 0, out[-4000:]
    result = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result) == scripts, out[-4000:]
    got: list[dict[str, Any]] = [json.loads(line[len("RESULT ") :]) for line in result]
    for one in got:
        assert one["active"] == (native and _have_compiler()), out[-4000:]  # the guard the case asked for is in place
    return got


@pytest.fixture(scope="module")
def child(serve: Any, cache: Path) -> Child:
    """child(native) -> {"train": TRAIN's seen, "current": CURRENT's}. The two children (native guard, Python guard)
    start together when a test first asks for one, and run side by side; each test checks its own child's outcome."""
    outcomes: dict[bool, list[dict[str, Any]] | AssertionError] = {}

    def get(native: bool) -> dict[str, Any]:
        if not outcomes:
            procs = {guard: _start(serve, cache, [TRAIN, CURRENT], guard) for guard in (True, False)}
            for guard, proc in procs.items():
                try:
                    outcomes[guard] = _results(proc, 2, guard)
                except AssertionError as exc:
                    outcomes[guard] = exc
        got = outcomes[native]
        if isinstance(got, AssertionError):
            raise got
        train, current = got
        return {"train": train["seen"], "current": current["seen"]}

    return get


def _have_compiler() -> bool:
    return shutil.which((os.environ.get("CXX") or "c++").split()[0]) is not None


@pytest.mark.parametrize("native", [True, False], ids=["native-guard", "python-guard"])
def test_training_on_gpupool_1_and_split_across_both_gives_the_cpu_losses(child: Child, native: bool) -> None:
    seen = child(native)["train"]
    cpu = seen["cpu"]
    assert cpu["grad_devices"] == ["cpu"]
    expected_grads = {"on_0": ["gpupool:0"], "on_1": ["gpupool:1"], "split_0_1": ["gpupool:0", "gpupool:1"],
                      "split_1_0": ["gpupool:0", "gpupool:1"]}  # fmt: skip
    for case, grads in expected_grads.items():
        assert seen[case]["losses"] == pytest.approx(cpu["losses"], abs=1e-5), case
        assert seen[case]["weight"] == pytest.approx(cpu["weight"], abs=1e-5), case
        assert seen[case]["grad_devices"] == grads, case
    assert cpu["losses"][-1] < cpu["losses"][0]  # it trained
    assert seen["thread_grad"] == ["gpupool:1", [6.0, 6.0, 6.0]]
    assert seen["device_count"] == [2, 2]


def test_current_device_is_one_per_thread_and_torch_guards_agree(child: Child) -> None:
    if not _have_compiler():
        pytest.skip("no C++ compiler here: the native guard cannot be built (scripts/setup.sh installs g++)")
    seen = child(True)["current"]
    assert seen["set_1"] == [1, 1, 1, "gpupool:1", "gpupool:1"]
    assert seen["with_device_no_index"] == "gpupool:1"
    assert seen["with_device_0"] == "gpupool:0"
    assert seen["ops_on_1_keep_current"] == [12.0, 0, 0]
    assert seen["backward_on_1_keeps_current"] == ["gpupool:1", 0, 0]
    assert seen["inside_guard_1"] == [1, 1, "gpupool:1", 10.0, "gpupool:1"]
    assert seen["after_guard"] == [0, 0, "gpupool:0"]
    assert seen["accelerator_set_1"] == [1, "gpupool:1"]
    assert seen["thread"] == [{"start": 0, "set": [1, "gpupool:1"]}, 0]
    assert "out of range" in seen["out_of_range"]
    assert "DataParallel is not available on gpupool devices" in seen["data_parallel"]
    assert "DistributedDataParallel" in seen["data_parallel"]


def test_python_guard_keeps_gpupool_current_device_the_same_way(child: Child) -> None:
    """torch's Python guard can only answer "index 0" (its pybind class lets Python override `type_` alone): gpupool's
    own current device (torch.gpupool, factories, threads) behaves as with the native guard; torch.accelerator's view
    of it, and torch's device guards, cannot move."""
    seen = child(False)["current"]
    assert seen["set_1"] == [1, 1, 0, "gpupool:1", "gpupool:1"]
    assert seen["with_device_no_index"] == "gpupool:1"
    assert seen["ops_on_1_keep_current"] == [12.0, 0, 0]
    assert seen["backward_on_1_keeps_current"] == ["gpupool:1", 0, 0]
    assert seen["inside_guard_1"] == [0, 0, "gpupool:0", 10.0, "gpupool:1"]
    assert seen["after_guard"] == [0, 0, "gpupool:0"]
    assert seen["thread"] == [{"start": 0, "set": [1, "gpupool:1"]}, 0]
    assert "out of range" in seen["out_of_range"]
    assert "DataParallel is not available on gpupool devices" in seen["data_parallel"]
