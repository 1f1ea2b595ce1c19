"""A gpupool tensor sent to another process (torch.multiprocessing): one clear error instead of torch's.

torch pickles a tensor for another process (`mp.Process(args=...)` under spawn, `mp.Queue.put`, `mp.spawn`'s
arguments) with `torch.multiprocessing.reductions.reduce_tensor`: a CUDA tensor as a CUDA IPC handle, which the other
process opens onto the same GPU memory, every other tensor through POSIX shared memory (`_share_fd_cpu_`). A gpupool
tensor took the second way and failed with torch's `_share_fd_: only available on CPU`, which says neither what nor
why. pytorch/examples' mnist_hogwild `--cuda` does this: its processes train one model in place, shared through CUDA
IPC (round 32, docs/cuda.md).

It cannot be made to work soundly: a gpupool tensor is a handle in this process's session on the daemon, a session
belongs to one process's connection, and the daemon never lets one session read or write another's tensors (the
multi-tenant boundary, docs/security.md). Another process holds a session of its own, so there is no memory to map.
So sending one is refused here, naming the tensor's device and what works instead. CPU tensors (a DataLoader
worker's batches, `model.share_memory()` on the CPU) go on as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

_installed: list[bool] = []


def why(device: Any) -> str:
    return (
        f"a tensor on {device} cannot be sent to another process (torch.multiprocessing): torch shares a GPU "
        "tensor between processes through CUDA IPC, and a gpupool tensor lives in this process's own session on "
        "the daemon, which no other process's session may read or write. Training one model in place from several "
        "processes (hogwild, as pytorch/examples' mnist_hogwild --cuda does) is not available on a pooled GPU: "
        "train such a shared model on the CPU, send tensor.cpu(), or train with DistributedDataParallel, one "
        "process per device (docs/distributed.md)"
    )


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def reduce_tensor(tensor: Any) -> Any:
        import torch

        if tensor.device.type == torch._C._get_privateuse1_backend_name() == "gpupool":
            raise RuntimeError(why(tensor.device))
        return original(tensor)

    reduce_tensor._gpupool_refusal = True  # type: ignore[attr-defined]
    return reduce_tensor


def install(classes: tuple[type, ...] = ()) -> None:
    """Replace torch's tensor reduction wherever torch registered it (Tensor, Parameter, the legacy tensor classes),
    and register the guard for `classes` (the Python client's tensor subclasses, whose own `__reduce_ex__` copies
    to the CPU: sent through a spawn it broke with `bad value(s) in fds_to_keep`, after a copy the other process
    could not have trained in place anyway); idempotent. Both clients call it when they make the device."""
    if _installed:
        return
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing.reductions as reductions

    reducers = ForkingPickler._extra_reducers  # type: ignore[attr-defined]
    guarded = _guarded(reductions.reduce_tensor)
    for cls, reducer in list(reducers.items()):
        if reducer is reductions.reduce_tensor:
            ForkingPickler.register(cls, guarded)
    for cls in classes:  # exact types: ForkingPickler looks a reducer up by type(obj)
        ForkingPickler.register(cls, guarded)
    _installed.append(True)
