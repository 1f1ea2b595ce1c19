"""What a session's worker runs per client op: its aten calls and its host reads of tensor values (an audit tool).

With `GPUPOOL_OP_AUDIT=DIR` in the daemon's environment, every session worker (server/worker.py) counts, below
autograd (a `TorchDispatchMode`, so the aten calls the kernels run, the ones a CPU or CUDA kernel of a composite op
makes inside included where they go through the dispatcher), each aten call it makes by op and by the daemon's
source line that made it, and each read of a tensor's values on the host: `aten._local_scalar_dense` (`.item()`,
`int(t)`, `float(t)`, `bool(t)`), `Tensor.tolist`, `Tensor.cpu`, `Tensor.numpy` (on a CUDA device each is a copy
from the device and a wait for it; on a fake GPU the same calls, free there) and a copy between devices. After each
slice it appends its running totals to `DIR/worker-PID.jsonl` (one JSON object a line; the file is opened before the
sandbox, which forbids creating files), so that a client that reads the last line after a Sync (`loss.item()`) knows
what every op it sent before had run: bench/op_audit.py compares them with the aten calls local torch makes for the
same step. The counts are deterministic (no timing). Off (the default), nothing here is imported.
Never for a production daemon: every op goes through Python twice, and the file grows per slice.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ENV = "GPUPOOL_OP_AUDIT"
_SELF = os.path.abspath(__file__)
_ROOT = os.path.dirname(os.path.dirname(_SELF))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_SCALAR = torch.ops.aten._local_scalar_dense.default
_COPIES = frozenset({torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default})
# Calls that launch no kernel on a CUDA device (views, allocations, metadata): counted apart from the kernels.
NO_KERNEL = frozenset(
    {
        "aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.new_empty_strided",
        "aten.set_", "aten.resize_", "aten.detach", "aten.alias", "aten.lift_fresh", "aten._local_scalar_dense",
        "aten.is_nonzero", "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset",
    }
)  # fmt: skip


def site(skip: int = 2) -> str:
    """The innermost daemon source line (server/, gpupool/) that made the call: `file.py:function:line`."""
    frame: Any = sys._getframe(skip)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH) and path.startswith(_ROOT) and path != _SELF:
            return f"{os.path.relpath(path, _ROOT)}:{frame.f_code.co_name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def kernel_name(func: Any) -> str:
    """`aten.mm` for `aten.mm.default` (the overload packet's name)."""
    return f"aten.{func.overloadpacket.__name__}"


def launches(name: str, func: Any) -> bool:
    """Whether an aten call runs a kernel on a CUDA device (not a view, an allocation or metadata)."""
    return name not in NO_KERNEL and not func.is_view


class Counts(TorchDispatchMode):
    """Counts aten calls (op name, site) and host reads (kind, site) while it is entered."""

    def __init__(self, sites: bool = True) -> None:
        super().__init__()
        self.sites = sites
        self.calls: Counter[str] = Counter()  # "op|site"
        self.reads: Counter[str] = Counter()  # "kind|site"

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        where = site() if self.sites else ""
        name = kernel_name(func)
        self.calls[f"{name}|{where}"] += 1
        if func is _SCALAR:
            self.reads[f"item|{where}"] += 1
        elif func in _COPIES:
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and dst is not None and torch.device(dst) != src.device:
                self.reads[f"copy {src.device.type}->{torch.device(dst).type}|{where}"] += 1
        return func(*args, **kwargs)

    def note(self, kind: str) -> None:
        self.reads[f"{kind}|{site(3) if self.sites else ''}"] += 1

    def totals(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "reads": dict(self.reads)}


_READS = ("tolist", "cpu", "numpy")  # the Tensor methods that read values on the host without an aten call of their own


class WorkerAudit:
    """The worker's audit: made before the sandbox (it opens the file), `dump` after each slice."""

    def __init__(self, directory: str) -> None:
        self.file = open(os.path.join(directory, f"worker-{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
        self.counts = Counts()
        self._own = {name: torch.Tensor.__dict__.get(name) for name in _READS}
        for name in _READS:
            setattr(torch.Tensor, name, self._reader(name, getattr(torch.Tensor, name)))
        self.counts.__enter__()

    def _reader(self, name: str, original: Any) -> Any:
        def read(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.counts.note(name)
            return original(t, *args, **kwargs)

        return read

    def dump(self) -> None:
        self.file.write(json.dumps(self.counts.totals()) + "\n")

    def close(self) -> None:
        """Counting stops and the Tensor methods are torch's again (a worker never closes its audit: tests do)."""
        self.counts.__exit__(None, None, None)
        for name, own in self._own.items():
            if own is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own)
        self.file.close()


def from_env() -> WorkerAudit | None:
    directory = os.environ.get(ENV)
    return WorkerAudit(directory) if directory else None
