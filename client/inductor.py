"""torch.compile of gpupool tensors: one clear refusal instead of Inductor's `KeyError: 'gpupool'`.

Dynamo traces a function of gpupool tensors (their fake tensors carry the device), and Inductor then looks up the
code generators of the device `gpupool`, which has none: until round 39 the user read `InductorError: KeyError:
'gpupool'` from deep in Inductor's wrapper code. Inductor asks a PrivateUse1 device's module (`torch.gpupool`) for
its generators (`GENERATORS`: torch._inductor.codegen.common.init_backend_registration); gpupool's are a class
whose first use raises `WHY`, and the device's op overrides, looked up before them, are registered as they are asked
for. Only a graph on gpupool
reaches them: torch.compile of CPU tensors in the same process compiles as before. `gpupool run --cuda` refuses
torch.compile itself, earlier (client/cuda/patches.py). Capture (`gpupool.torch.capture`) is what sends a step as
one command."""

from __future__ import annotations

from typing import Any, NoReturn

WHY = (
    "torch.compile cannot compile gpupool tensors: Dynamo/Inductor have no code generator for a remote device "
    "(docs/cuda.md); run the model eagerly, or record its step with @gpupool.torch.capture (one command a step: "
    "docs/wire.md#step-capture)"
)


def _refuse() -> NoReturn:
    raise RuntimeError(WHY)


class _Refusing(type):
    def __getattr__(cls, attr: str) -> NoReturn:  # whatever Inductor asks of the class first (supports_caching, ...)
        _refuse()


class Refused(metaclass=_Refusing):
    """Inductor's scheduling and wrapper code generator for the device gpupool: refuses when made or asked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse()


GENERATORS = ("Scheduling", "PythonWrapperCodegen", "CppWrapperCodegen", "WrapperFxCodegen")


def device_attribute(device: str, attr: str) -> type[Refused]:
    """A device module's `__getattr__` (what it does not define): Inductor's generators for `device`, read only by
    Inductor's backend registration (torch._inductor is imported by then), which also registers the device's op
    overrides, looked up before the generators (else Inductor's KeyError comes first); AttributeError for the rest."""
    if attr not in GENERATORS:
        raise AttributeError(f"module 'torch.{device}' has no attribute {attr!r}")
    from torch._inductor.codegen import common

    if device not in common.device_op_overrides_dict:
        common.register_device_op_overrides(device, common.DeviceOpOverrides())
    return Refused
