"""Forward-mode AD's zero tangents on gpupool, on either client.

`torch.func.jvp`, `jacfwd` and `hessian` (forward over reverse), and `torch.autograd.functional.hessian` with
`outer_jacobian_strategy="forward-mode"`, make `aten::_efficientzerotensor(size)` wherever a primal has no tangent
(a model's weights in `jacfwd` of its input): on CPU and CUDA a ZeroTensor, a tensor of that size with no storage
that torch's ZeroTensor kernels never read. The daemon refuses the op (scripts/gen_allowlist.py REVIEWED_OUT): a
storage-less tensor of a size the client names is what a kernel would read past. Both clients give the device a
kernel of its own for it: ordinary zeros of that size and dtype (`torch.zeros`: an `empty` and a `zero_` the daemon
allows, counted in the session's quota like any tensor). The tangents' values are the same; what differs is cost
(the zeros are real memory and their ops are computed) and one corner of IEEE arithmetic: a ZeroTensor times an
infinite or NaN primal is 0, zeros times it NaN."""

from __future__ import annotations

from typing import Any

import torch

_library: list[torch.library.Library] = []


def _efficientzerotensor(
    size: list[int], *, dtype: Any = None, layout: Any = None, device: Any = None, pin_memory: Any = None
) -> torch.Tensor:
    return torch.zeros(size, dtype=dtype, layout=layout, device=device)


def install() -> None:
    """Idempotent: `aten::_efficientzerotensor` on PrivateUse1 (the gpupool device) makes ordinary zeros."""
    if _library:
        return
    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - a kernel for an existing aten op
    lib.impl("_efficientzerotensor", _efficientzerotensor, "PrivateUse1")
    _library.append(lib)
