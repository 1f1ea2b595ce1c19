"""Registration of the `gpupool` device type with PyTorch (torch >= 2.10).

`torch.utils.backend_registration._setup_privateuseone_for_python_backend` renames the PrivateUse1
dispatch key to `gpupool`, so `torch.device("gpupool:0")`, `Tensor.to("gpupool")` and factories
with `device="gpupool"` are real; `torch.gpupool` becomes the backend module below (device count,
`manual_seed_all` for `torch.manual_seed`, `synchronize`). One PrivateUse1 fallback kernel takes
every op that reaches the backend without a remote tensor (factories such as `torch.empty`,
`torch.zeros`, `torch.arange`): remote tensors themselves are caught earlier, by the Python
dispatch key of their wrapper class. torch's setup registers a Python device guard; `native.install` replaces it
with the C++ guard of `native_guard.cpp` (no Python call per op; every nameable device, a per-thread current device)
when it can be built.

Backward runs on the calling thread (client/engine.py): torch's autograd engine hands the nodes of a device's
tensors to one worker thread per device index, and sizes that set of threads once, from the device guard's count, at
the process's first backward. torch's Python guard always says one device, and a process can attach gpupool:1 after
its first backward, so a node on gpupool:1 would find no queue (an INTERNAL ASSERT). With autograd's multithreading off
for the call every node runs on the caller's CPU queue, in the same order, whatever the device: remote ops are queued
to the daemons asynchronously anyway, so the worker threads bought nothing but a thread hand-off per backward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils.backend_registration as backend_registration

from .. import checkpoints, fastpath, inductor, mp_share, rng, streams, zerotensor
from ..engine import run_backward_on_calling_thread
from . import api, meta, native, native_ops, runtime, tensor
from .dispatch import dispatch, factory, find_runtime, torch_dispatch

NAME = "gpupool"


class BackendModule:
    """`torch.gpupool`: what torch asks a device module for."""

    def __getattr__(self, attr: str) -> Any:  # Inductor's code generators: one clear refusal (client/inductor.py)
        return inductor.device_attribute(NAME, attr)

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return api.current_index()

    def set_device(self, index: int | torch.device) -> None:
        api.set_device(index.index or 0 if isinstance(index, torch.device) else index)

    def device_count(self) -> int:
        return max(1, api.device_count())

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        runtime.manual_seed_all(seed)

    def manual_seed(self, seed: int) -> None:
        runtime.manual_seed_all(seed)

    def synchronize(self, device: Any = None) -> None:
        api.synchronize(device)

    def get_amp_supported_dtype(self) -> list[torch.dtype]:  # torch.amp.autocast("gpupool"): torch.utils.checkpoint's
        return [torch.float16, torch.bfloat16]  # recomputation enters it (until round 56 an AssertionError there)


# streams and events, one ordered stream a device (client/streams.py): what FSDP2 asks of a gpupool mesh's device
# module; generator states (client/rng.py): what torch.random.fork_rng asks of it
for _name, _value in {**streams.module_functions(api.synchronize), **rng.module_functions()}.items():
    setattr(BackendModule, _name, _value if isinstance(_value, type) else staticmethod(_value))
rng.install()  # torch.random.fork_rng with this process's devices (client/rng.py `fork_rng`)


_library: list[torch.library.Library] = []


def _backend_fallback(op: Any, *args: Any, **kwargs: Any) -> Any:
    return factory(op, args, kwargs)


# Ops that can reach the backend *with* remote tensors: C++ code that excludes the Python dispatch key
# (torch.tensor(...) / x[[1, 2]] build the tensor on the CPU and copy it with the key excluded) lands in
# the backend kernel of `_copy_from`. A Python fallback kernel cannot take tensors that have the Python
# key (torch asserts), so these get kernels of their own.
BACKEND_OPS = ("_copy_from", "_copy_from_and_resize", "_local_scalar_dense", "_to_copy")


def _backend_kernel(op: Any) -> Any:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        if find_runtime(args, kwargs) is None:
            return factory(op, args, kwargs)
        return dispatch(op, args, kwargs)

    return kernel


def _pin_memory(self: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """`pin_memory()` for gpupool is plain host memory (uploads go over the network, not DMA); pinning for
    another accelerator (a local CUDA GPU) goes on to torch's own kernel."""
    target = device or torch.accelerator.current_accelerator()
    if target is None or torch.device(target).type == NAME:
        return self.clone()
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.aten._pin_memory.default.redispatch(keys, self, device)


# Device types whose DataParallel is refused: gpupool's own, and "cuda" once `--cuda` maps it onto gpupool
# (client/cuda/patches.py adds it).
DATA_PARALLEL_REFUSED = {NAME}
DATA_PARALLEL_WHY = (
    "torch.nn.DataParallel is not available on gpupool devices: it scatters inputs, replicates the module and gathers "
    "outputs through torch.cuda.comm's C++ kernels (torch._C._scatter, _broadcast_coalesced, _gather), which torch "
    "builds for CUDA GPUs only. Use DistributedDataParallel, one process per device (gpupool run -n N -- torchrun "
    "--nproc-per-node N script.py), or place the layers on gpupool:0 and gpupool:1 yourself (docs/distributed.md)"
)


def _refuse_data_parallel() -> None:
    """DataParallel over gpupool devices fails at its first forward with "module 'torch._C' has no attribute
    '_scatter'": refuse it where it is built, with the reason and what works instead."""
    from torch.nn.parallel import DataParallel

    original = DataParallel.__init__
    if getattr(original, "_gpupool_refusal", False):
        return

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.device_ids and self.src_device_obj.type in DATA_PARALLEL_REFUSED:
            raise RuntimeError(DATA_PARALLEL_WHY)

    init._gpupool_refusal = True  # type: ignore[attr-defined]
    DataParallel.__init__ = init  # type: ignore[method-assign]


def register() -> None:
    """Idempotent: make the PrivateUse1 backend `gpupool` (fails if another backend took the name), and
    route the ops of remote tensors to the dispatcher."""
    tensor.set_dispatcher(dispatch, torch_dispatch)
    native_ops.use(True)  # steady ops in C (native_ops.cpp), the rest to torch_dispatch; GPUPOOL_NATIVE_OPS=0
    current = torch._C._get_privateuse1_backend_name()
    if current == NAME and _library:
        return
    if current not in ("privateuseone", NAME):
        raise RuntimeError(f"the PrivateUse1 backend is already registered as {current!r}; gpupool needs it")
    if current == "privateuseone":
        backend_registration._setup_privateuseone_for_python_backend(NAME, backend_module=BackendModule())
        native.install()  # the C++ device guard replaces the Python one torch's setup registered (native.py)
        native_ops.link_current_device()  # api.current_index: one C call into the guard, not ctypes's
        native.set_device_count(api.device_count())  # `gpupool run -n 2`: both devices, before either is attached
        run_backward_on_calling_thread()
        _refuse_data_parallel()
        mp_share.install((tensor.RemoteTensor, tensor.RemoteView))  # sent to another process: one clear error
        checkpoints.install_load()  # torch.load of storages saved on gpupool: onto the device (client/checkpoints.py)
        fastpath.install(NAME)  # transformer eval: torch's ordinary path, not its fused kernels (client/fastpath.py)
        zerotensor.install()  # forward-mode AD's zero tangents: ordinary zeros (client/zerotensor.py)
    lib = torch.library.Library("_", "IMPL")  # noqa: TOR901 - the global namespace is required for fallbacks
    lib.fallback(_backend_fallback, "PrivateUse1")
    _library.append(lib)
    ops = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - kernels for existing aten ops
    for name in BACKEND_OPS:
        packet = getattr(torch.ops.aten, name)
        ops.impl(name, _backend_kernel(packet.default), "PrivateUse1")
    for name in meta.KERNEL_OVER_COMPOSITE:  # a kernel of gpupool's own, so torch does not decompose them first
        ops.impl(
            name.removeprefix("aten::"),
            _backend_kernel(getattr(torch.ops.aten, name.removeprefix("aten::")).default),
            "PrivateUse1",
        )
    ops.impl("_pin_memory", _pin_memory, "CPU")  # torch's kernel raises for PrivateUse1 (DataLoader pin_memory)
    _library.append(ops)
