"""The op table: aten overload names -> callables, through an allowlist of what a remote client may run.
(The memory an op will allocate is sizing.py's business.)

Deny by default: an op runs only if its overload is listed in allowed_ops.txt (generated from torch's OpInfo
database and traced models by scripts/gen_allowlist.py, then reviewed); anything else is PERMISSION_DENIED
naming the op. Names are validated before they touch `torch.ops` (so `__class__` and friends never do), and
the families that reach the host (files, shared memory, printing) or that the daemon cannot hold are refused
on sight, whatever the list says.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import torch

from gpupool.errors import InvalidArgument, PermissionDenied

_NAME_RE = re.compile(r"^aten::(_?[a-z][a-z0-9_]*)(?:\.(_?[a-zA-Z][a-zA-Z0-9_]*))?$")

# Substrings of op names that reach the host outside the tensor world: files, IPC, stdout, process-wide caches.
DENIED_FRAGMENTS = ("from_file", "save", "load", "share", "_print", "mmap", "pin_memory", "_ipc", "_fd", "_cufft")
# Families whose tensors the daemon cannot hold or send (sparse, nested, quantized, mkldnn layouts), or whose
# kernels trust their inputs (test helpers, the internal cummax/cummin helpers):
# found by fuzzing to read or write out of bounds, or to abort the process on bad input.
UNSUPPORTED_FRAGMENTS = (
    "sparse",
    "nested",
    "quantize",
    "mkldnn",
    "jagged",
    "_test_",
    "_foobar",
    "_cummax_helper",
    "_cummin_helper",
    "_spdiags",
    "_compressed",
    "_to_sparse",
    "slow_conv",  # reached through aten::convolution (which has a meta kernel); direct calls are unbounded
    "_transform_bias_rescale_qkv",
    # Internal helpers (autograd decompositions, functorch, NNPACK, 4-bit quantized matmul) that a schema-driven
    # hunt with small random arguments crashed (SIGSEGV/SIGFPE); eager clients reach their public callers.
    "_batch_norm_impl_index",
    "_dyn_quant_",
    "_new_zeros_with_same_feature_meta",
    "_nnpack_",
    "_remove_batch_dim",
    "_add_batch_dim",
    "_reshape_alias_copy",
    "_thnn_differentiable_",
)
# Single overloads the same hunt crashed whose siblings stay allowed.
UNSUPPORTED_OVERLOADS = frozenset({"aten::_ctc_loss_backward.out"})
# Argument types that cannot come from a remote client (raw storages, streams).
_DENIED_TYPES = ("Storage", "Stream")
# Exact overloads denied on top: set_ onto raw storages or offsets into other tensors' storage.
DENIED_OVERLOADS = frozenset(
    {
        "aten::set_.source_Storage",
        "aten::set_.source_Storage_storage_offset",
        "aten::set_.source_Tensor_storage_offset",
        "aten::set_.default",
    }
)


ALLOWLIST_FILE = Path(__file__).with_name("allowed_ops.txt")


def load_allowlist(path: Path = ALLOWLIST_FILE) -> frozenset[str]:
    """Overload names ("aten::add.Tensor"; ".default" spelled out), one a line; '#' starts a comment."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return frozenset(line for line in lines if line)


def _canonical(name: str) -> str:
    return name if "." in name.removeprefix("aten::") else name + ".default"


class OpTable:
    """Resolves and caches op overloads by name, through the allowlist."""

    def __init__(self, allowed: frozenset[str] | None = None) -> None:
        self._ops: dict[str, torch._ops.OpOverload] = {}
        self._lock = threading.Lock()
        self.allowed = load_allowlist() if allowed is None else allowed

    def resolve(self, name: str) -> torch._ops.OpOverload:
        op = self._ops.get(name)
        if op is not None:
            return op
        op = _resolve(name)
        if _canonical(name) not in self.allowed:
            raise PermissionDenied(f"op {name!r} denied: it is not on the daemon's allowlist of tensor ops")
        with self._lock:
            self._ops[name] = op
        return op


def refused_on_sight(name: str) -> bool:
    """Whether `name` is refused whatever the allowlist says (host access, unsupported layouts, crashers)."""
    try:
        _resolve(name)
    except (InvalidArgument, PermissionDenied):
        return True
    return False


def _resolve(name: str) -> torch._ops.OpOverload:
    if len(name) > 128:
        raise InvalidArgument("op name too long")
    if not name.startswith("aten::"):
        raise PermissionDenied(f"op {name!r} denied: only aten:: ops run on the daemon")
    m = _NAME_RE.match(name)
    if not m:
        raise InvalidArgument(f"malformed op name {name!r} (expected e.g. 'aten::add.Tensor')")
    base, overload = m.group(1), m.group(2) or "default"
    if any(frag in base for frag in DENIED_FRAGMENTS) or name in DENIED_OVERLOADS:
        raise PermissionDenied(f"op {name!r} denied: it reaches the daemon's host")
    if any(frag in base for frag in UNSUPPORTED_FRAGMENTS) or name in UNSUPPORTED_OVERLOADS:
        raise InvalidArgument(f"op {name!r} is not supported on the daemon")
    try:
        packet = getattr(torch.ops.aten, base)
        op = getattr(packet, overload)
    except (AttributeError, RuntimeError):
        raise InvalidArgument(f"unknown op {name!r}") from None
    if not isinstance(op, torch._ops.OpOverload):
        raise InvalidArgument(f"unknown op {name!r}")
    if any(t in str(a.type) for a in op._schema.arguments for t in _DENIED_TYPES):
        raise PermissionDenied(f"op {name!r} denied: it takes raw storages or streams")
    return op


# ---- memory an op allocates, from its meta kernel ----
