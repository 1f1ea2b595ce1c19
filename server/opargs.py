"""Reading an op's decoded arguments, for the modules that check them (guards.py) and size them (sizing.py):
an argument by position or name, the tensors among them, and a check that turns arguments that do not fit the
op's schema into the client's error (INVALID_ARGUMENT) rather than the daemon's.
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
