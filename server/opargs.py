"""Reading an op's decoded arguments, for the modules that check them (guards.py) and size them (sizing.py):
an argument by position or name, the tensors among them, and a check that turns arguments that do not fit the
op's schema into the client's error (INVALID_ARGUMENT) rather than the daemon's; and the mark a kernel of gpupool's
own puts on a result whose whole storage it wrote (`written_whole`, for server/sessions.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from gpupool.errors import InvalidArgument

Args = Sequence[Any]
Kwargs = Mapping[str, Any]


def arg(args: Args, kwargs: Kwargs, i: int, name: str, default: Any = None) -> Any:
    """The argument at position `i` or named `name`."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def tensors(values: list[Any]) -> list[torch.Tensor]:
    """The tensors among `values`, and those inside list or tuple values."""
    found: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, list | tuple):
            found.extend(t for t in v if isinstance(t, torch.Tensor))
    return found


def checked(what: str, fn: Callable[[Args, Kwargs], Any], args: Args, kwargs: Kwargs) -> Any:
    """Run a guard; arguments that do not even fit the op's schema are the client's error, not the daemon's."""
    try:
        return fn(args, kwargs)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError, RuntimeError, OverflowError) as exc:
        reason = str(exc).split("\n")[0][:200]
        raise InvalidArgument(f"bad arguments for {what}: {type(exc).__name__}: {reason}") from None


WHOLE = "_gpupool_whole"
"""An attribute gpupool's own kernels set on a view whose storage they wrote in full, beyond the view: fused
attention's `philox_seed`, a 0-d view of the generator state and the softmax and mask kept for the backward
(server/attention.py). Binding it must not zero those bytes (round 35: rev35's zeroing in `bind` wiped them, and
the backward read a zero state). Only server code sets it; a client names handles, never Python attributes."""


def written_whole(t: torch.Tensor) -> torch.Tensor:
    """Mark `t` (`WHOLE`): every byte of its storage was written by the kernel that made it."""
    setattr(t, WHOLE, True)
    return t
