"""`gpupool run --native-client --cuda`: unmodified CUDA scripts (tests/cuda_scripts/, no gpupool import) run on the C++
client against a real `gpupool up` (fake GPUs, loopback, TLS) with local CPU's losses and weights within float32
rounding (the CPU run is a fresh process: support.assert_float32_close) and the Python client's bit for bit; the
torch.cuda facade answers from the lease (facade_native.py); what the C++ client lacks is one message naming the call.

Slow (the C++ client's first build takes ~1 min; cached after). Skipped only where no C++ compiler or ninja exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from gpupool.client.native import WAY_OUT
from gpupool.client.native.backend import compiler_missing
from gpupool.client.pool import SchedulerClient
from scheduler_fixtures import ROOT, wait_until
from support import assert_float32_close, assert_loss_lines_close
from test_cuda_scripts import LOSS, SCRIPTS, amp_on_pool, on_cpu  # each: one run per session

_why = compiler_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why is not None, reason=f"native client: {_why}")]

ANNOUNCE = "gpupool --cuda: cuda -> gpupool (1 leased device(s), native client)"


@pytest.fixture(scope="module")
def pool(two_gpu_pool: str) -> str:
    """The shared pool of two 512 MiB fake GPUs (conftest.py: two_gpu_pool); these tests lease one."""
    return two_gpu_pool


# A CUDA training script as tutorials write it: `.cuda()` when CUDA is there; a conv, a LayerNorm (their composite
# kernels used to run on the client: a conv's backward failed, a LayerNorm's loss was off in the last bits), Adam.
# Prints the losses and the trained weights as JSON.
TRAIN = """
import json, sys
import torch
from torch import nn

cuda = torch.cuda.is_available()
torch.manual_seed(0)
gen = torch.Generator().manual_seed(1)
model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 32), nn.LayerNorm(32),
                      nn.Tanh(), nn.Linear(32, 3))
if cuda:
    model.cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
data = [(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
losses = []
for i in range(6):
    x, y = data[i % 3]
    if cuda:
        x, y = x.cuda(non_blocking=True), y.cuda()
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
out = {"losses": losses, "weights": [p.detach().cpu().tolist() for p in model.parameters()],
       "device": str(next(model.parameters()).device), "shim": "gpupool.client.torch" in sys.modules}
if cuda:  # the C++ client's op records (its stats' 4th counter)
    out["op_records"] = int(torch.ops.gpupool_native.stats()[3])
print(json.dumps(out))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GPUPOOL_LEASE", "GPUPOOL_CUDA", "GPUPOOL_CLIENT")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _run(cmd: list[str], env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=SCRIPTS)
    if ok:
        assert done.returncode == 0, f"{cmd}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done


def on_pool(pool: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--native-client", "--cuda", "-p", "0.5", "--", sys.executable,
           *args]  # fmt: skip
    return _run(cmd, _env(GPUPOOL_SCHEDULER=pool), ok)


def released(pool: str) -> None:
    wait_until(lambda: not SchedulerClient(pool).list_pool().leases, timeout=10, what="the run's lease released")


def test_a_cuda_training_script_gives_local_losses_and_weights(pool: str) -> None:
    """TRAIN on the C++ client against the same script in a fresh CPU process, within float32 rounding (its Linear's
    4608 weights: Adam's `sqrt` of them runs on two threads, support.assert_float32_close; the CPU run warmed first,
    support.warmed_python)."""
    ran = on_pool(pool, "-c", TRAIN)
    got = json.loads(ran.stdout.strip().splitlines()[-1])
    want = json.loads(on_cpu("-c", TRAIN).stdout.strip().splitlines()[-1])
    assert got["device"] == "gpupool:0" and want["device"] == "cpu"
    assert not got["shim"] and got["op_records"] > 6 * 20  # the C++ client sent the ops, the shim never loaded
    assert ANNOUNCE in ran.stderr
    assert len(set(got["losses"])) == 6  # it trains
    assert_float32_close(got["losses"], want["losses"], "losses")
    assert_float32_close(got["weights"], want["weights"], "weights")
    released(pool)


@pytest.mark.parametrize(
    "script",
    ["mnist_style.py", "device_agnostic.py", "checkpoint.py", "lstm_lm.py", "custom_function.py", "word_lm_tied.py",
     "gru_lm.py"],
)  # fmt: skip
def test_unmodified_cuda_scripts_give_the_cpu_losses(pool: str, script: str) -> None:
    """word_lm_tied.py (round 32) saves the whole model and loads it back, which only the C++ client can (the shim
    saves device tensors as CPU ones: docs/cuda.md); gru_lm.py failed on this client until round 32."""
    pooled = on_pool(pool, script)
    losses = LOSS.findall(pooled.stdout)
    assert len(losses) >= 4, pooled.stdout
    assert_loss_lines_close(losses, LOSS.findall(on_cpu(script).stdout))  # a fresh CPU process: float32 rounding
    if script == "word_lm_tied.py":  # one tied weight after .to("cuda") and after torch.load of the whole model
        assert "tied after load: True, 10 parameters" in pooled.stdout, pooled.stdout
    assert ANNOUNCE in pooled.stderr, pooled.stderr[-2000:]
    released(pool)


def test_autocast_and_grad_scaler_give_the_shims_losses(pool: str) -> None:
    """amp.py (autocast float16 + GradScaler): the C++ client computes what the shim computes, bit for bit, and both are
    near the CPU's float32 losses (AMP is off there)."""
    native = LOSS.findall(on_pool(pool, "amp.py").stdout)
    shim = LOSS.findall(amp_on_pool(pool).stdout)  # the shim's run (test_cuda_scripts.py ran it, or it runs now)
    local = LOSS.findall(on_cpu("amp.py").stdout)
    assert len(native) == 5 and native == shim
    assert native != local  # float16 really ran
    values = [float(line.rsplit(" ", 1)[1]) for line in native]
    assert values == pytest.approx([float(line.rsplit(" ", 1)[1]) for line in local], rel=1e-3)


def test_torch_cuda_facade_and_refusals(pool: str) -> None:
    """facade_native.py asserts the answers (count, names, memory after the buffered ops, seeds reaching the daemon,
    events, autocast, torch.save/load of device tensors) and that each refusal is one message naming the call."""
    done = on_pool(pool, "facade_native.py", str(256 * 1024**2))
    assert "facade ok" in done.stdout
    refusals = [line for line in done.stderr.splitlines() if line.startswith("refused: ")]
    assert len(refusals) == 5, done.stderr  # torch.compile runs eagerly since round 42, rng states load since 43
    assert "torch.compile runs eagerly on a pooled GPU" in done.stderr
    assert not any(WAY_OUT in line for line in refusals)  # none of them is one the Python client has
    assert ANNOUNCE in done.stderr


def test_every_device_form_lands_on_the_pool(pool: str) -> None:
    """device_forms.py (the Python client's test runs it on cuda:1 of two GPUs): on the C++ client's one device
    (`native`: but torch.fft.fftfreq, which the C++ client cannot run)."""
    assert "device forms ok 0" in on_pool(pool, "device_forms.py", "native").stdout


def test_the_env_selects_both(pool: str) -> None:
    """$GPUPOOL_CLIENT=native and $GPUPOOL_CUDA=1 in `gpupool run`'s environment are the two flags."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-p", "0.5", "--", sys.executable, "mnist_style.py"]
    done = _run(cmd, _env(GPUPOOL_SCHEDULER=pool, GPUPOOL_CLIENT="native", GPUPOOL_CUDA="1"))
    assert ANNOUNCE in done.stderr
    assert_loss_lines_close(LOSS.findall(done.stdout), LOSS.findall(on_cpu("mnist_style.py").stdout))


UNTOUCHED = """
import torch
assert not torch.cuda.is_available() and torch.cuda.is_available.__module__ == "torch.cuda"
assert torch.load.__module__ == "torch.serialization" and not torch.overrides._get_current_function_mode_stack()
assert torch._C._get_privateuse1_backend_name() == "gpupool"
print("untouched")
"""


def test_without_cuda_flag_torch_cuda_is_untouched(pool: str) -> None:
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--native-client", "-p", "0.5", "--", sys.executable, "-c"]
    done = _run([*cmd, UNTOUCHED], _env(GPUPOOL_SCHEDULER=pool))
    assert "untouched" in done.stdout and "gpupool --cuda" not in done.stderr
