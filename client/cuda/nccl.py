"""`nccl` -> the `gpupool` collective backend, for `gpupool run --cuda -- torchrun ... train.py`.

torch builds every process group in `distributed_c10d._new_process_group_helper` (init_process_group,
new_group, new_subgroups, device meshes all go through it). Wrapping that one function:

- a backend of `nccl` or `cuda:nccl` is built as `gpupool` (client/distributed.py: collectives run between the
  daemons); torch's NCCL default timeout becomes the default one, so the daemons' own default applies;
- the group is then recorded under the name the script gave, so `dist.get_backend()` says `nccl` (and a
  `new_group()` without a backend asks for `nccl` again, which comes back here);
- `device_id=` (NCCL's eager init hint) is dropped: the gpupool group binds its rank's own device anyway (a CUDA
  `device_id` given to `init_process_group` is first mapped to its gpupool device, so torch's own check that it is
  the accelerator's type passes: the FSDP2 example's `init_process_group(backend, device_id=device)`);
- torch's default timeout for `nccl` (`_get_default_timeout`) is the default one, without the warning a torch
  built without NCCL gives.

`init_process_group()` without a backend needs nothing: torch picks the default backend of the current
accelerator, which is gpupool. Mixed strings (`cpu:gloo,cuda:nccl`) are refused, naming the call: the gpupool
backend is a whole process group for its devices, so torch cannot add a gloo backend for CPU tensors beside it.
`DistributedDataParallel(device_ids=[local_rank])` gets the rank's gpupool index (devices.pool_index), and
`dist.is_nccl_available()` says True.

The same holds under the C++ client (`gpupool run --native-client --cuda`): its `gpupool` backend is this one, over
its sessions (client/native/group.py).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from .devices import is_cuda_device, pool_index, to_gpupool

GPUPOOL = "gpupool"


def _wants_nccl(backend: Any) -> bool:
    return backend is not None and "nccl" in str(backend).lower()


def _translate(backend: Any) -> str:
    """`nccl` / `cuda:nccl` -> `gpupool`; anything naming nccl beside another backend is refused."""
    pairs = [p.strip() for p in str(backend).lower().split(",") if p.strip()]
    if pairs in (["nccl"], ["cuda:nccl"]):
        return GPUPOOL
    raise RuntimeError(
        f"torch.distributed process group backend {str(backend)!r} is not available on a pooled GPU "
        "(gpupool run --cuda): nccl maps to the gpupool backend, which serves the leased devices only; "
        "use backend='nccl' (docs/cuda.md)"
    )


def _wrap_helper(helper: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(helper)

    @functools.wraps(helper)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        asked = bound.arguments.get("backend")
        if not _wants_nccl(asked):
            return helper(*args, **kwargs)
        import torch.distributed.distributed_c10d as c10d
        from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

        bound.arguments["backend"] = c10d.Backend(_translate(asked))
        if default_pg_nccl_timeout is not None and bound.arguments.get("timeout") == default_pg_nccl_timeout:
            bound.arguments["timeout"] = default_pg_timeout
        if "device_id" in bound.arguments:
            bound.arguments["device_id"] = None
        pg, store = helper(*bound.args, **bound.kwargs)
        if pg in c10d._world.pg_map:  # not NON_GROUP_MEMBER: report what the script asked for
            c10d._world.pg_map[pg] = (str(asked), c10d._world.pg_map[pg][1])
        return pg, store

    return wrapped


def _wrap_default_timeout(original: Callable[..., Any]) -> Callable[..., Any]:
    """`init_process_group("nccl")` without a timeout asks torch for NCCL's default first, which a torch built
    without NCCL (a CPU-only client's) answers with a UserWarning that NCCL is not compiled: noise, since the group
    is gpupool's. Its default is the one `_wrap_helper` gives the gpupool backend anyway."""

    @functools.wraps(original)
    def default_timeout(backend: Any) -> Any:
        if _wants_nccl(backend):
            from torch.distributed.constants import default_pg_timeout

            return default_pg_timeout
        return original(backend)

    return default_timeout


def _wrap_init(original: Callable[..., Any]) -> Callable[..., Any]:
    """init_process_group with a CUDA (or integer: CUDA's number) `device_id` mapped to its gpupool device: torch
    checks that it is of the accelerator's type, which is gpupool (until round 35 the script's accelerator was gpupool
    too, so a `device_id` it made from it passed; now it is `cuda`, as on a GPU machine: client/cuda/devices.py)."""

    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        device_id = kwargs.get("device_id")
        if device_id is not None and not isinstance(device_id, bool) and _ddp_index(device_id) is not device_id:
            kwargs["device_id"] = to_gpupool(device_id)
        return original(*args, **kwargs)

    return init_process_group


def _ddp_index(value: Any) -> Any:
    """A DDP device id (CUDA number or CUDA device) as the rank's gpupool index."""
    if isinstance(value, int) and not isinstance(value, bool):
        return pool_index(value)
    if is_cuda_device(value):
        index = torch.device(value).index
        return torch.device(GPUPOOL) if index is None else pool_index(index)
    return value


def _patch_ddp() -> None:
    from torch.nn.parallel import DistributedDataParallel

    original = DistributedDataParallel.__init__

    @functools.wraps(original)
    def init(self: Any, module: Any, device_ids: Any = None, output_device: Any = None, *args: Any, **kw: Any) -> None:
        if device_ids is not None:
            device_ids = [_ddp_index(d) for d in device_ids]
        original(self, module, device_ids, _ddp_index(output_device), *args, **kw)

    DistributedDataParallel.__init__ = init  # type: ignore[method-assign]


def _patch_device_mesh() -> None:
    """`init_device_mesh("cuda", ...)`, `DeviceMesh("cuda", ...)`: a mesh of the gpupool device, whose tensors say
    `gpupool:N`. FSDP2 and DTensor take the mesh's device type as their tensors' (`torch.device(mesh.device_type,
    torch.<type>.current_device())`, checked against each parameter's device) and its device module for streams and
    events (`torch.gpupool`: client/streams.py); a "cuda" mesh made FSDP2 refuse every parameter ("Expects the parameter
    to already be moved to device cuda:0 but got gpupool:0"). `mesh.device_type` says `gpupool`."""
    from torch.distributed.device_mesh import DeviceMesh

    original = DeviceMesh.__init__

    @functools.wraps(original)
    def init(self: Any, device_type: str, *args: Any, **kwargs: Any) -> None:
        original(self, GPUPOOL if device_type == "cuda" else device_type, *args, **kwargs)

    DeviceMesh.__init__ = init  # type: ignore[method-assign]


def install() -> None:
    """Map nccl onto the gpupool backend (the caller installs once)."""
    if not torch.distributed.is_available():
        return
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from .. import distributed

    distributed.register()
    c10d._new_process_group_helper = _wrap_helper(c10d._new_process_group_helper)
    c10d._get_default_timeout = _wrap_default_timeout(c10d._get_default_timeout)
    c10d.init_process_group = dist.init_process_group = _wrap_init(c10d.init_process_group)
    dist.is_nccl_available = lambda: True
    _patch_ddp()
    _patch_device_mesh()
