"""The native runner on a CUDA session (round 36): learned runs of tests/unit/test_server_runs.py's training step,
its tensors on the GPU, run by the runner (`runner` "native") and by the Python path side by side, with the same
results, errors and accounting (`Pair.same`). Its CUDA branches had only ever run as far as the Python predicate
`below_autograd` (test_server_runs.py's cuda test): its calls below autograd on CUDA kernels, the value guard's one
read of a CUDA tensor's bounds (native_runner.cpp `in_ranges`: `aminmax` into one tensor, one copy to the host),
zeroing a CUDA storage. The step's indices come from an op of the step, so the guard reads the device each step;
with `scale` 3 they are out of range, and both paths refuse the same op.

No GPU was lent when this was written: the test skips here and has never run (bench/real_gpu.sh's `tests` stage
runs it)."""

from __future__ import annotations

import itertools

import pytest
import torch
from gpupool.server.devices import CudaDevice
from gpupool.server.sessions import DeviceMemory, WorkerSession
from test_server_runs import IDX, NUMBER, G, P, Pair, W, X, free, runner, step, training  # noqa: F401 - the fixture

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class CudaPair(Pair):
    """`Pair` with both sessions on CUDA device 0 (the same tensors, moved there)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = []
        for _ in range(2):
            dev = CudaDevice(0)
            on = dev.torch_device
            s = WorkerSession("t", NUMBER, dev, DeviceMemory(dev), 1 << 24, max_handles=4096)
            torch.manual_seed(0)
            s.bind(X, torch.randn(4, 3).to(on))
            s.bind(W, torch.randn(3, 5).to(on))
            s.bind(P, torch.zeros(()).to(on))
            s.bind(IDX, torch.tensor([0, 1, 2, 1]).to(on))
            s.bind(G, torch.randn(4, 3).to(on))
            s.rng_state = dev.new_rng_state(1234)  # both sessions draw the same random numbers
            self.s.append(s)


@cuda
def test_a_training_loop_on_a_cuda_session_runs_as_the_python_path_does(runner: str) -> None:  # noqa: F811
    p = CudaPair()
    p.stream(training(p, 10), itertools.cycle([7, 13, 5, 64]))
    assert p.s[0].tensors[X].device.type == "cuda"
    p.stream(step(p, 10, scale=3) + [free(9)] + step(p, 11), itertools.cycle([64]))  # one step's indices out of range
    assert p.s[0].poisoned and p.s[1].poisoned  # the guard refused the op in both
    if runner == "native":
        assert p.runs().native > 0
