"""`gpupool run --native-client -n 2`: the C++ client on a lease of two GPUs against a real `gpupool up` (two fake GPUs,
loopback, TLS). gpupool:0 and gpupool:1 are each their own daemon session; a model split over them (`.to("gpupool:1")`
between its halves: through the host, as the Python client copies) trains with the losses and weights of the Python
client and of the CPU, bit for bit; an op mixing the two devices is refused with torch's own message, as the Python
client refuses it; the current device (`torch.gpupool.set_device`, `torch.cuda.set_device`, `with torch.cuda.device`)
places factories; under --cuda, tests/cuda_scripts/model_parallel.py (cuda:0 and cuda:1) gives the CPU's losses.

Slow (the C++ client's first build takes ~1 min; cached after). Skipped only where no C++ compiler or ninja exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gpupool.client.native.backend import compiler_missing
from gpupool.client.pool import SchedulerClient
from scheduler_fixtures import ROOT, wait_until
from support import assert_loss_lines_close
from test_cuda_scripts import LOSS, RANK_LINE, SCRIPTS, beside, on_cpu, torchrun, torchrun_on_cpu, values

_why = compiler_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why is not None, reason=f"native client: {_why}")]


@pytest.fixture(scope="module")
def pool(two_gpu_pool: str) -> str:
    """The shared pool of two 512 MiB fake GPUs (conftest.py: two_gpu_pool); the scheduler's address."""
    return two_gpu_pool


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GPUPOOL_LEASE", "GPUPOOL_CUDA", "GPUPOOL_CLIENT")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _run(pool: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gpupool.cli", "run", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=_env(GPUPOOL_SCHEDULER=pool),
                          cwd=SCRIPTS)  # fmt: skip
    if ok:
        assert done.returncode == 0, f"{cmd}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done


def _last_json(done: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def released(pool: str) -> None:
    wait_until(lambda: not SchedulerClient(pool).list_pool().leases, timeout=10, what="the run's lease released")


# A model split over two devices (argv: the two devices), no gpupool import: the first half on one, the second on the
# other, the activations and labels moved with `.to()`, Adam; then the current device and what an op mixing devices
# does. Prints the losses, the weights and what it saw as JSON.
SPLIT = """
import json, sys
import torch
from torch import nn

first, second = sys.argv[1], sys.argv[2]
if first != "cpu":
    import gpupool.torch  # the Python client's device (the C++ client needs no import)
torch.manual_seed(0)
gen = torch.Generator().manual_seed(1)
l1 = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32)).to(first)
l2 = nn.Sequential(nn.Tanh(), nn.Linear(32, 3)).to(second)
opt = torch.optim.Adam([*l1.parameters(), *l2.parameters()], lr=1e-2)
data = [(torch.randn(8, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
losses = []
for i in range(6):
    x, y = data[i % 3]
    opt.zero_grad()
    loss = nn.functional.cross_entropy(l2(l1(x.to(first)).to(second)), y.to(second))
    loss.backward()
    opt.step()
    losses.append(loss.item())
out = {"losses": losses, "weights": [p.detach().cpu().tolist() for p in [*l1.parameters(), *l2.parameters()]],
       "devices": sorted({str(p.grad.device) for p in [*l1.parameters(), *l2.parameters()]})}
a, b = torch.ones(3, device=first), torch.ones(3, device=second)
try:
    (a + b).cpu()
    out["mixed"] = "ran"
except RuntimeError as exc:
    out["mixed"] = str(exc).splitlines()[0]
out["after_mixed"] = (a * 2).sum().item() + (b * 3).sum().item()  # both sessions go on
# a copy of a view from one device to the other, and back
w = torch.arange(12.0).reshape(3, 4).to(first)
out["view_copy"] = w.t()[1:].to(second).to(first).cpu().tolist()
if first != "cpu":
    mod = getattr(torch, torch.device(first).type)
    out["count"] = mod.device_count()
    mod.set_device(1)
    out["current"] = [mod.current_device(), str(torch.zeros(2, device=torch.device(first).type).device)]
    mod.set_device(0)
    out["back"] = [mod.current_device(), str(torch.zeros(2, device=torch.device(first).type).device)]
    import gpupool.client.native as native
    out["client"] = "native" if native.active() else "python shim"
    if native.active():  # gpupool:i is the session of the lease's device i
        from gpupool.client.pool import Lease
        leased = [d.uuid for d in Lease.from_env().devices]
        out["sessions"] = [native.session(i).device.uuid for i in (0, 1)] == leased and len(set(leased)) == 2
print(json.dumps(out))
"""

TORCH_MIXED = "Expected all tensors to be on the same device, but found at least two devices, gpupool:0 and gpupool:1!"


def test_a_model_split_over_two_devices_gives_the_shims_and_the_cpus_losses_and_weights(pool: str) -> None:
    def pooled() -> tuple[dict, dict]:
        native = _last_json(_run(pool, "--native-client", "-n", "2", "-p", "0.5", "--", sys.executable, "-c", SPLIT,
                                 "gpupool:0", "gpupool:1"))  # fmt: skip
        released(pool)
        shim = _last_json(_run(pool, "--client", "shim", "-n", "2", "-p", "0.5", "--", sys.executable, "-c", SPLIT,
                               "gpupool:0", "gpupool:1"))  # fmt: skip
        released(pool)
        return native, shim

    (native, shim), cpu = beside(pooled, on_cpu, "-c", SPLIT, "cpu", "cpu")
    local = _last_json(cpu)
    assert native["client"] == "native" and shim["client"] == "python shim"
    assert len(set(native["losses"])) == 6  # it trains
    # bit for bit with the CPU too, though its run is a fresh process (support.assert_float32_close): no tensor here
    # has more than 1024 elements, so no op takes a parallel path (ATen's grain is 2048 and more) and one thread on
    # one CPU runs the same kernels in both processes
    assert native["losses"] == shim["losses"] == local["losses"]
    assert native["weights"] == shim["weights"] == local["weights"]
    assert native["devices"] == ["gpupool:0", "gpupool:1"] and native["sessions"]
    assert native["mixed"] == shim["mixed"] == TORCH_MIXED
    assert native["after_mixed"] == shim["after_mixed"] == local["after_mixed"] == 15.0
    assert native["view_copy"] == local["view_copy"]
    assert native["count"] == shim["count"] == 2
    assert native["current"] == shim["current"] == [1, "gpupool:1"]
    assert native["back"] == [0, "gpupool:0"]


BEYOND = """
import torch
try:
    torch.ones(2, device="gpupool:2")
except Exception as exc:
    print("refused:", type(exc).__name__, str(exc).splitlines()[0])
import gpupool.torch as gt
for call in (lambda: gt.device(2), lambda: torch.gpupool.set_device(2)):
    try:
        call()
    except Exception as exc:
        print("refused:", type(exc).__name__, str(exc).splitlines()[0])
print("count", torch.gpupool.device_count(), gt.device_count(), gt.device(1))
"""


def test_a_device_past_the_lease_is_one_clear_message(pool: str) -> None:
    done = _run(pool, "--native-client", "-n", "2", "-p", "0.5", "--", sys.executable, "-c", BEYOND)
    refusals = [line for line in done.stdout.splitlines() if line.startswith("refused: ")]
    assert len(refusals) == 3, done.stdout
    assert all("gpupool:2 is not a device of this process (2 leased: gpupool:0..1)" in r for r in refusals), refusals
    assert "count 2 2 gpupool:1" in done.stdout
    released(pool)


def test_model_parallel_cuda_script_over_cuda_0_and_cuda_1_gives_the_cpu_losses(pool: str) -> None:
    """tests/cuda_scripts/model_parallel.py under `--native-client --cuda -n 2`: layers on cuda:0 and cuda:1,
    `torch.cuda.device_count()` 2, `torch.cuda.set_device(1)` then a factory on "cuda"; the CPU's losses."""
    cmd = ("--native-client", "--cuda", "-n", "2", "-p", "0.5", "--", sys.executable, "model_parallel.py")
    done, local = beside(lambda: _run(pool, *cmd), on_cpu, "model_parallel.py")
    losses = LOSS.findall(done.stdout)
    assert len(losses) == 6, done.stdout + local.stdout
    assert_loss_lines_close(losses, LOSS.findall(local.stdout))  # a fresh CPU process: float32 rounding
    assert "done on cuda:0 cuda:1" in done.stdout
    assert "gpupool --cuda: cuda -> gpupool (2 leased device(s), native client)" in done.stderr
    released(pool)


CUDA_CURRENT = """
import torch
assert torch.cuda.device_count() == 2
with torch.cuda.device(1):
    inside = (torch.cuda.current_device(), torch.ones(2, device="cuda").device.index, torch.ones(2).cuda().device.index)
outside = (torch.cuda.current_device(), torch.ones(2, device="cuda").device.index)
x = torch.arange(6.0, device="cuda:1")
y = x.to("cuda:0") * 2
print("seen", inside, outside, x.device.index, y.device.index, y.sum().item(), torch.cuda.get_device_name(1) != "")
torch.cuda.synchronize("cuda:1")
"""


def test_cuda_current_device_and_copies(pool: str) -> None:
    done = _run(pool, "--native-client", "--cuda", "-n", "2", "-p", "0.5", "--", sys.executable, "-c", CUDA_CURRENT)
    assert "seen (1, 1, 1) (0, 0) 1 0 30.0 True" in done.stdout, done.stdout + done.stderr[-2000:]
    released(pool)


def test_ddp_example_on_two_ranks_trains_like_one_device(pool: str, tmp_path: Path) -> None:
    """examples/ddp/train.py under `gpupool run --native-client -n 2 -- torchrun --nproc-per-node 2`: each rank's C++
    client on its own lease device (LOCAL_RANK, as gpupool:0), DDP's allreduces on the `gpupool` backend between the
    daemons; rank 0's parameters equal a single-device CPU run on the global batch (test_ddp_example.py's check)."""
    import torch

    from examples.ddp import train

    out = tmp_path / "ranks2.pt"
    done = _run(pool, "--native-client", "-n", "2", "--", sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", str(ROOT / "examples" / "ddp" / "train.py"), "--steps", "3",
                "--global-batch", "16", "--out", str(out))  # fmt: skip
    assert "joined the daemons' group" in done.stderr
    assert "gpupool.client.torch" not in done.stderr  # (no traceback through the Python client)
    got = torch.load(out)
    reference = train.train(torch.device("cpu"), 3, 16, 0.05, 0, rank=0, world=1).state_dict()
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    initial = train.build_model(0).state_dict()
    assert any(not torch.equal(got[k], initial[k]) for k in initial)  # it trained
    released(pool)


def test_torchrun_ddp_cuda_script_with_nccl_gives_the_cpu_losses(pool: str) -> None:
    """tests/cuda_scripts/ddp_torchrun.py under `gpupool run --native-client --cuda -n 2 -- torchrun
    --nproc-per-node 2`: nccl is the gpupool backend on the C++ client too, cuda:LOCAL_RANK each rank's own leased
    device; the losses and weights of the same script under torchrun on the CPU with gloo (test_cuda_scripts.py's
    check)."""
    pooled, local = beside(
        lambda: _run(pool, "--native-client", "--cuda", "-n", "2", "-p", "0.5", "--", *torchrun("ddp_torchrun.py", 2)),
        torchrun_on_cpu, "ddp_torchrun.py", 2,
    )  # fmt: skip
    losses, reference = values(LOSS.findall(pooled.stdout)), values(LOSS.findall(local.stdout))
    assert len(losses) == 8 and len(reference) == 8, pooled.stdout + local.stdout
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-7)
    ranks = sorted(RANK_LINE.findall(pooled.stdout))
    assert [r[:3] for r in ranks] == [("0", "cuda:0", "0"), ("1", "cuda:1", "1")], pooled.stdout
    sums = [float(r[3]) for r in ranks + sorted(RANK_LINE.findall(local.stdout))]
    assert sums[0] == sums[1] and sums == pytest.approx([sums[2]] * 4, rel=1e-5)  # DDP kept the ranks in step
    assert pooled.stderr.count("(2 leased device(s), native client)") >= 2, pooled.stderr[-2000:]
    released(pool)


# torch.compile of a model on gpupool, then of a CPU function in the same process (no gpupool import: the C++ client).
COMPILE = """
import json
import torch

model = torch.nn.Linear(4, 4).to("gpupool")
try:
    model = torch.compile(model)
    got = str(model(torch.randn(2, 4, device="gpupool")).sum().item())
except Exception as exc:
    got = f"{type(exc).__name__}: {exc}"
print(json.dumps({"gpupool": got, "cpu": torch.compile(lambda a: a * 2 + 1)(torch.ones(2)).tolist()}))
"""


def test_torch_compile_of_gpupool_tensors_is_refused_in_one_line_and_cpu_compiles(pool: str) -> None:
    """Round 39's journey: torch.compile of a model on gpupool ended in Inductor's `KeyError: 'gpupool'`; now one
    clear line (client/inductor.py), and torch.compile of CPU tensors in the same process still compiles."""
    got = _last_json(_run(pool, "-n", "1", "--client", "native", "--", sys.executable, "-c", COMPILE))
    released(pool)
    assert "torch.compile cannot compile gpupool tensors" in got["gpupool"] and "KeyError" not in got["gpupool"], got
    assert got["cpu"] == [3.0, 3.0]
