"""The native device guard (client/torch/native.py): built at first use into an empty cache, it replaces torch's Python
guard, and a client with it trains to exactly the losses and sees exactly the device semantics of one with the Python
guard (GPUPOOL_NATIVE=0) or one whose compiler is broken (CXX=/bin/false), both of which log one line and work.

Each way runs in a child process (the guard is process-wide) against the session's real daemon; the three children
run side by side (one after the other until round 21)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import communicate

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, logging, os
logging.basicConfig(level=logging.INFO, format="LOG %(name)s: %(message)s")
import torch
import torch.utils.backend_registration as registration

calls = [0]  # calls into torch's Python device guard (each of its methods asks the Python object for type_)
_type = registration._DummyDeviceGuard.type_
def counting_type(self):
    calls[0] += 1
    return _type(self)
registration._DummyDeviceGuard.type_ = counting_type

import gpupool.torch as gt
from gpupool.client.torch import native
from torch import nn

seen = {}
d0 = gt.attach(os.environ["T_ADDRESS"], os.environ["T_TOKEN0"], index=0)
d1 = gt.attach(os.environ["T_ADDRESS"], os.environ["T_TOKEN1"], index=1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(d0)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
x, y = torch.randn(32, 8).to(d0), torch.randn(32, 1).to(d0)
losses = []
for _ in range(4):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
seen["losses"] = losses
seen["grad_device"] = str(model[0].weight.grad.device)
seen["accelerator_index"] = torch.accelerator.current_device_index()
torch.accelerator.set_device_index(1)
seen["accelerator_index_after_set_1"] = torch.accelerator.current_device_index()
seen["stream"] = repr(torch.accelerator.current_stream())
torch.gpupool.set_device(1)
seen["factory_after_set_device_1"] = str(torch.ones(2, device="gpupool").device)
seen["current_index"] = gt.current_index()
torch.gpupool.set_device(0)
a, b = torch.arange(4.0).to(d0), torch.arange(4.0).to(d1)
with torch.accelerator.device_index(1):  # a device guard around ops on both devices
    seen["two_devices"] = [(a * 2).sum().item(), str((b + 1).device), (b + 1).sum().item()]
w = torch.ones(3).to(d1).requires_grad_()
try:
    (w * 3).sum().backward()
    seen["backward_on_1"] = str(w.grad.device)
except RuntimeError as exc:  # was autograd's INTERNAL ASSERT before backward ran on the calling thread (backend.py)
    seen["backward_on_1"] = "error: " + str(exc).split(" INTERNAL")[0]
gt.detach_all()
print("RESULT", json.dumps({"active": native.active(), "python_guard_calls": calls[0], "seen": seen}))
"""


def _start(serve: Any, cache: Path, **env: str) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("GPUPOOL_NATIVE", "CXX")}
    # the guard alone: the native op path (native_ops.cpp, the same cache) has tests of its own (test_shim_native_ops)
    full.update(GPUPOOL_NATIVE_CACHE=str(cache), T_ADDRESS=serve.address, T_TOKEN0=serve.token(),
                T_TOKEN1=serve.token(), PYTHONPATH=str(REPO), GPUPOOL_NATIVE_OPS="0", **env)  # fmt: skip
    cmd = [sys.executable, "-c", CHILD]
    return subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], list[str]]:
    stdout, stderr = communicate(proc, 240)
    out = stdout + stderr
    assert proc.returncode == 0, out[-4000:]
    result = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result) == 1, out[-4000:]
    logs = [line for line in out.splitlines() if "native device guard" in line or "GPUPOOL_NATIVE=" in line]
    return json.loads(result[0][len("RESULT ") :]), logs


def _have_compiler() -> bool:
    return shutil.which((os.environ.get("CXX") or "c++").split()[0]) is not None


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """The test's children; any still running when it ends (a failed assertion) are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_native_guard_trains_and_behaves_as_the_python_guard(
    serve: Any, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    # The three children run side by side (each with a cache of its own); the test waits for them in turn.
    children += [
        _start(serve, tmp_path / "unused", GPUPOOL_NATIVE="0"),
        _start(serve, tmp_path / "broken", CXX="/bin/false"),
        *([_start(serve, tmp_path / "cache")] if _have_compiler() else []),
    ]
    python, python_logs = _result(children[0])
    assert not python["active"] and python["python_guard_calls"] > 0  # the counter sees the Python guard at work
    assert len(python_logs) == 1 and "GPUPOOL_NATIVE=0" in python_logs[0], python_logs
    assert not (tmp_path / "unused").exists()  # nothing was built

    broken, broken_logs = _result(children[1])
    assert not broken["active"] and broken["python_guard_calls"] > 0
    assert len(broken_logs) == 1 and "native device guard unavailable" in broken_logs[0], broken_logs
    assert "/bin/false" in broken_logs[0]
    assert not list((tmp_path / "broken").glob("*.so"))  # no half-built library left behind

    assert broken["seen"] == python["seen"]
    if not _have_compiler():
        pytest.skip("no C++ compiler here: the native guard cannot be built (scripts/setup.sh installs g++)")
    native, native_logs = _result(children[2])
    assert native["active"], native_logs
    assert native["python_guard_calls"] == 0  # torch's C++ no longer calls into Python for the device guard
    assert len(native_logs) == 1 and "built the native device guard" in native_logs[0], native_logs
    assert len(list((tmp_path / "cache").glob("guard-*.so"))) == 1
    # The same losses, bit for bit, and the same device semantics, except torch.accelerator's view of the current
    # device: torch's Python guard always answers index 0; the native guard answers gpupool's current device.
    accelerator = ("accelerator_index_after_set_1", "stream")
    assert {k: v for k, v in native["seen"].items() if k not in accelerator} == {
        k: v for k, v in python["seen"].items() if k not in accelerator
    }
    stream = "torch.Stream device_type=gpupool, device_index={}, stream_id=0"
    assert [python["seen"][k] for k in accelerator] == [0, stream.format(0)]
    assert [native["seen"][k] for k in accelerator] == [1, stream.format(1)]
    assert python["seen"]["factory_after_set_device_1"] == "gpupool:1"
    assert python["seen"]["backward_on_1"] == "gpupool:1"


PROBE = "import gpupool.torch; from gpupool.client.torch import native; print('ACTIVE', native.active())"


def test_processes_starting_together_build_it_once(tmp_path: Path) -> None:
    if not _have_compiler():
        pytest.skip("no C++ compiler here")
    env = {k: v for k, v in os.environ.items() if k not in ("GPUPOOL_NATIVE", "CXX")}
    env.update(GPUPOOL_NATIVE_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO), GPUPOOL_NATIVE_OPS="0")
    cmd = [sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO); " + PROBE]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("ACTIVE True" in out for out in outs), outs
    assert sum(out.count("built the native device guard") for out in outs) == 1, outs
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name != ".lock"][0].startswith("guard-")
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the library and the lock file: no temporaries
