"""torch's functional collectives (`torch.ops._c10d_functional.*`) on gpupool tensors, through the gpupool backend.

DTensor's redistributions (`full_tensor()`, `redistribute`, a norm over sharded gradients in `clip_grad_norm_`) call
these ops with a group's name. torch's own kernels look the group up in C++ and call its C++ backend for the tensors'
device; the gpupool backend is a Python process group with none ("No backend type associated with device type
gpupool"). These kernels look the group up the same way (`_resolve_process_group`) and call its Python collectives
(client/distributed.py), which enqueue each as one command of the rank's session stream: the result is there for
the ops after it, as a NCCL collective's is on its CUDA stream, and `wait_tensor` (torch's, no work registered) has
nothing to wait for. The C++ client registers them as PrivateUse1 kernels (`register_kernels`); the Python client
routes a remote tensor's op here from its dispatch (client/torch/backend.py, `transfer.SPECIAL`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from gpupool.errors import InvalidArgument

_libraries: list[Any] = []


def _group(name: Any) -> Any:
    from torch.distributed.distributed_c10d import _resolve_process_group

    from .distributed import ProcessGroupGpupool

    group = _resolve_process_group(name)
    if not isinstance(group, ProcessGroupGpupool):
        raise InvalidArgument(
            f"a functional collective on gpupool tensors names group {name!r}, a {type(group).__name__}: gpupool "
            "tensors take part in collectives of the gpupool backend (nccl under --cuda)"
        )
    return group


def _reduce(op: str) -> Any:
    opts = dist.AllreduceOptions()
    known: dict[str, Any] = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "product": dist.ReduceOp.PRODUCT,
             "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}  # fmt: skip
    if op.lower() not in known:
        raise InvalidArgument(f"reduce op {op!r} is not supported by the gpupool backend (sum, avg, product, min, max)")
    opts.reduceOp = known[op.lower()]
    return opts


def _scatter_opts(op: str) -> Any:
    opts = dist.ReduceScatterOptions()
    opts.reduceOp = _reduce(op).reduceOp
    return opts


def all_reduce_(tensor: torch.Tensor, reduce_op: str, group_name: Any) -> torch.Tensor:
    _group(group_name).allreduce([tensor], _reduce(reduce_op))
    return tensor


def all_reduce(tensor: torch.Tensor, reduce_op: str, group_name: Any) -> torch.Tensor:
    return all_reduce_(tensor.clone(memory_format=torch.contiguous_format), reduce_op, group_name)


def all_reduce_coalesced_(tensors: list[torch.Tensor], reduce_op: str, group_name: Any) -> list[torch.Tensor]:
    return [all_reduce_(t, reduce_op, group_name) for t in tensors]


def all_reduce_coalesced(tensors: list[torch.Tensor], reduce_op: str, group_name: Any) -> list[torch.Tensor]:
    return [all_reduce(t, reduce_op, group_name) for t in tensors]


def all_gather_into_tensor_out(
    tensor: torch.Tensor, group_size: int, group_name: Any, *, out: torch.Tensor
) -> torch.Tensor:
    _group(group_name).all_gather_single(out, tensor.contiguous())
    return out


def all_gather_into_tensor(tensor: torch.Tensor, group_size: int, group_name: Any) -> torch.Tensor:
    out = tensor.new_empty((tensor.shape[0] * group_size, *tensor.shape[1:]) if tensor.dim() else (group_size,))
    return all_gather_into_tensor_out(tensor, group_size, group_name, out=out)


def all_gather_into_tensor_coalesced(tensors: list[torch.Tensor], group_size: int, group_name: Any) -> list[Any]:
    return [all_gather_into_tensor(t, group_size, group_name) for t in tensors]


def reduce_scatter_tensor_out(
    tensor: torch.Tensor, reduce_op: str, group_size: int, group_name: Any, *, out: torch.Tensor
) -> torch.Tensor:
    _group(group_name).reduce_scatter_single(out, tensor.contiguous(), _scatter_opts(reduce_op))
    return out


def reduce_scatter_tensor(tensor: torch.Tensor, reduce_op: str, group_size: int, group_name: Any) -> torch.Tensor:
    if tensor.dim() == 0 or tensor.shape[0] % group_size:
        raise InvalidArgument(f"reduce_scatter_tensor: dim 0 of {tuple(tensor.shape)} is no multiple of {group_size}")
    out = tensor.new_empty((tensor.shape[0] // group_size, *tensor.shape[1:]))
    return reduce_scatter_tensor_out(tensor, reduce_op, group_size, group_name, out=out)


def reduce_scatter_tensor_coalesced(
    tensors: list[torch.Tensor], reduce_op: str, group_size: int, group_name: Any
) -> list[torch.Tensor]:
    return [reduce_scatter_tensor(t, reduce_op, group_size, group_name) for t in tensors]


def broadcast_(tensor: torch.Tensor, src: int, group_name: Any) -> torch.Tensor:
    group = _group(group_name)
    opts = dist.BroadcastOptions()
    opts.rootRank = int(src)
    group.broadcast([tensor], opts)
    return tensor


def broadcast(tensor: torch.Tensor, src: int, group_name: Any) -> torch.Tensor:
    return broadcast_(tensor.clone(memory_format=torch.contiguous_format), src, group_name)


def all_to_all_single(
    input: torch.Tensor,  # noqa: A002 - torch's name
    output_split_sizes: list[int] | None,
    input_split_sizes: list[int] | None,
    group_name: Any,
) -> torch.Tensor:
    """The group's `alltoall_base` (client/distributed.py: an allgather, each rank keeping its rows) into a new
    tensor of `sum(output_split_sizes)` rows (the input's rows without them). Until round 39 one InvalidArgument."""
    rows = sum(output_split_sizes) if output_split_sizes else input.shape[0]
    out = input.new_empty((rows, *input.shape[1:]))
    _group(group_name).alltoall_base(out, input, list(output_split_sizes or []), list(input_split_sizes or []))
    return out


def shard_dim_alltoall(tensor: torch.Tensor, gather_dim: int, shard_dim: int, group_name: Any) -> torch.Tensor:
    """DTensor's `Shard(i) -> Shard(j)` (`_dtensor::shard_dim_alltoall`) as torch does it on a CPU mesh, whose gloo has
    no all-to-all either: gather the whole along `gather_dim`, keep this rank's chunk along `shard_dim` (it moves
    `size` times an all-to-all's bytes)."""
    from torch.distributed.tensor.placement_types import Shard

    group = _group(group_name)
    size = group.size()
    gathered = all_gather_into_tensor(tensor.contiguous(), size, group_name)
    whole = torch.cat(torch.chunk(gathered, size, dim=0), dim=gather_dim) if gather_dim else gathered
    return Shard._custom_chunk(whole, size, dim=shard_dim)[group.rank()].contiguous()


KERNELS: dict[str, Callable[..., Any]] = {
    "all_reduce": all_reduce,
    "all_reduce_": all_reduce_,
    "all_reduce_coalesced": all_reduce_coalesced,
    "all_reduce_coalesced_": all_reduce_coalesced_,
    "all_gather_into_tensor": all_gather_into_tensor,
    "all_gather_into_tensor_out": all_gather_into_tensor_out,
    "all_gather_into_tensor_coalesced": all_gather_into_tensor_coalesced,
    "reduce_scatter_tensor": reduce_scatter_tensor,
    "reduce_scatter_tensor_out": reduce_scatter_tensor_out,
    "reduce_scatter_tensor_coalesced": reduce_scatter_tensor_coalesced,
    "broadcast": broadcast,
    "broadcast_": broadcast_,
    "all_to_all_single": all_to_all_single,
    "shard_dim_alltoall": shard_dim_alltoall,
}


def _ops() -> dict[str, Any]:
    """The overloads this torch has, by name (each op has one, `default`): `_c10d_functional`'s, and DTensor's
    `_dtensor::shard_dim_alltoall`."""
    import torch.distributed._functional_collectives  # noqa: F401 - defines the ops' Python side

    found = {}
    for name in KERNELS:
        packet = getattr(torch.ops._dtensor if name == "shard_dim_alltoall" else torch.ops._c10d_functional, name, None)
        if packet is not None:
            found[name] = packet.default
    return found


def register_kernels(dispatch_key: str = "PrivateUse1") -> None:
    """The C++ client: these kernels for gpupool tensors (idempotent)."""
    if _libraries or not dist.is_available():
        return
    libraries = {ns: torch.library.Library(ns, "IMPL") for ns in ("_c10d_functional", "_dtensor")}  # noqa: TOR901
    for name, op in _ops().items():
        libraries[op.namespace].impl(name, KERNELS[name], dispatch_key)
    _libraries.extend(libraries.values())


def special_handlers() -> dict[Any, Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]]:
    """The Python client: {op overload: handler(func, args, kwargs)} for its dispatch's table of special ops."""
    if not dist.is_available():
        return {}

    def handler(kernel: Callable[..., Any]) -> Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]:
        return lambda func, args, kwargs: kernel(*args, **kwargs)

    return {op: handler(KERNELS[name]) for name, op in _ops().items()}
