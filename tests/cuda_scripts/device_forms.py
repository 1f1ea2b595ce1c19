"""Run under `gpupool run --cuda` (either client, any number of devices): every way a script names a CUDA device
lands on the pooled one (asserts). Each line is a form one of client/cuda/devices.py's wrappers must catch: the
factories' `device=` (found in torch's schemas and docstrings), Tensor.to / Tensor.cuda / Module.to's own argument
parsing, `is_cuda`, and a factory called from a thread."""

import sys
import threading

import torch

assert torch.cuda.is_available()
last = torch.cuda.device_count() - 1  # gpupool:<last> is `cuda:<last>` (no torchrun: numbers as they are)
LAST = torch.device("gpupool", last)


def on(t: torch.Tensor, where: torch.device = LAST) -> None:
    assert t.device == where, (t.device, where)
    assert t.is_cuda


x = torch.arange(4.0)
# Tensor.to: a device first (string, integer id, torch.device) or by keyword; a dtype or a tensor first stays.
on(x.to(f"cuda:{last}"))
on(x.to(last))
on(x.to(torch.device("cuda", last)))
on(x.to(device=f"cuda:{last}", dtype=torch.float64))
on(x.to(f"cuda:{last}", torch.float16))
assert x.to(torch.float64).device.type == "cpu" and not x.to(torch.float64).is_cuda
# Tensor.cuda: index positional or by keyword, non_blocking.
on(x.cuda(last))
on(x.cuda(device=last, non_blocking=True))
on(x.cuda(f"cuda:{last}"))
# Factories: device= as a string, an integer id and a torch.device.
on(torch.zeros(2, device=f"cuda:{last}"))
on(torch.full((2,), 3.0, device=last))
on(torch.tensor([1.0], device=torch.device("cuda", last)))
on(torch.as_tensor([1.0], device=f"cuda:{last}"))
on(torch.asarray([1.0], device=f"cuda:{last}"))  # a Python-only binding: found by its docstring, not a schema
on(torch.randint(0, 5, (3,), device=last))
on(torch.arange(3, device=f"cuda:{last}"))
on(torch.linspace(0, 1, 3, device=f"cuda:{last}"))
on(torch.eye(2, device=f"cuda:{last}"))
if "native" not in sys.argv[1:]:  # the C++ client fails fftfreq itself (it resizes an out= view)
    on(torch.fft.fftfreq(4, device=f"cuda:{last}"))  # torch.fft's namespace
on(torch.normal(0.0, 1.0, size=(2,), device=f"cuda:{last}"))
# *_like and new_*: by keyword, from a CPU tensor.
on(torch.zeros_like(x, device=f"cuda:{last}"))
on(torch.randn_like(x, device=last))
on(x.new_zeros(2, device=f"cuda:{last}"))
on(x.new_full((2,), 1.0, device=last))
on(x.new_tensor([1.0], device=f"cuda:{last}"))
# Modules: Module.to (torch._C._nn._parse_to), Module.cuda, Module.to_empty.
on(torch.nn.Linear(2, 2).to(last).weight)
on(torch.nn.Linear(2, 2).to(device=f"cuda:{last}").weight)
on(torch.nn.Linear(2, 2).cuda(last).weight)
on(torch.nn.Linear(2, 2, device="meta").to_empty(device=f"cuda:{last}").weight)
# is_cuda: True on the pool only; .device stays gpupool's.
assert not x.is_cuda and not torch.nn.Parameter(x).is_cuda
assert torch.nn.Parameter(x.cuda(last)).is_cuda


# A thread maps too (the wrappers are torch's module attributes: no per-thread state).
ready, go, made = threading.Event(), threading.Event(), []


def early() -> None:
    ready.set()
    go.wait(30)
    made.append(torch.ones(2, device=f"cuda:{last}"))


thread = threading.Thread(target=early)
thread.start()
ready.wait(30)
go.set()
thread.join(30)
assert made, "the thread made no tensor"
on(made[0])
print("device forms ok", last)
