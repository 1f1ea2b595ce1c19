"""A device's generator state, read and loaded on its daemon (round 43, the daemon's "rng_state" feature): what
`torch.gpupool.get_rng_state`/`set_rng_state` (and their `_all` forms) answer on both clients, which
`torch.random.fork_rng(device_type="gpupool")` calls, and, under `--cuda`, `torch.cuda.get_rng_state` and
`torch.random.fork_rng()` (whose `"cuda"` is `gpupool` there) through client/cuda/facade.py.

The state is the daemon generator's own (a uint8 tensor: 5,056 bytes on a fake GPU, whose generator is the CPU's; 16
on a CUDA daemon), read after every op made so far and loaded in stream order (client/session.py `rng_state`,
`set_rng_state`; the daemon checks a loaded state: server/executor.py `_rng_state`). A captured step refuses both, as
it refuses `torch.manual_seed`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

NAME = "gpupool"
_FORK_RNG = torch.random.fork_rng  # torch's own, which `fork_rng` wraps
_GENERATOR = torch._C.Generator  # torch's own class (`torch.Generator` until `install`)


def index_of(device: Any) -> int | None:
    """The gpupool index a device argument names (None: the current device)."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    d = torch.device(device) if isinstance(device, str) else device
    if not isinstance(d, torch.device) or d.type != NAME:
        raise ValueError(f"expected a gpupool device, not {device!r}")
    return d.index


def session_in_order(index: int | None, call: str) -> tuple[Any, int]:
    """The session of gpupool:`index` (None: the current device; attached on first use), with every op made so far
    sent before what comes next (the C++ client buffers its records: they go out first), and a fresh handle of the
    client's (the C++ client hands out its own: a Python `Session.new_handle` would reuse one of its tensors'); a
    step being captured refuses `call`."""
    from . import native

    if native.active():
        import torch

        from .native import backend

        backend.refuse_in_recording(call)
        index = native.current_index() if index is None else index
        session = native.ensure_session(index)
        backend.flush()
        return session, int(torch.ops.gpupool_native.new_handle(index))
    from .torch import api, runtime

    dev = api.device(api.current_index() if index is None else index)  # attached on first use
    rt = runtime.get(int(dev.index or 0))
    assert rt is not None
    if (rec := rt.recording()) is not None:
        rec.refuse(call)
    return rt.session, rt.session.new_handle()


def get_rng_state(device: Any = NAME, call: str = "torch.gpupool.get_rng_state") -> torch.Tensor:
    session, handle = session_in_order(index_of(device), call)
    return session.rng_state(handle)  # type: ignore[no-any-return]


def set_rng_state(new_state: torch.Tensor, device: Any = NAME, call: str = "torch.gpupool.set_rng_state") -> None:
    session, handle = session_in_order(index_of(device), call)
    session.set_rng_state(new_state, handle)


def get_rng_state_all() -> list[torch.Tensor]:
    return [get_rng_state(i) for i in range(getattr(torch, NAME).device_count())]


def set_rng_state_all(new_states: Any) -> None:
    for i, state in enumerate(new_states):
        set_rng_state(state, i)


def module_functions() -> dict[str, Any]:
    """What `torch.gpupool` gets (client/torch/backend.py, client/native/backend.py). `_initialized`: what
    torch.utils.checkpoint asks (`getattr(device_module, "_initialized", False)`) before it saves the device's
    generator state in the forward, to load it for the recomputation (`preserve_rng_state=True`, the default): without
    it a dropout under checkpoint drew a second mask in the backward, and the gradients were silently another mask's
    (until round 56, both clients, with and without `--cuda`)."""
    return {
        "_initialized": True,
        "device": device_scope,
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "get_rng_state_all": get_rng_state_all,
        "set_rng_state_all": set_rng_state_all,
    }


class device_scope:  # noqa: N801 - torch.cuda.device's role, under the name `torch.gpupool.device`
    """`with torch.gpupool.device(i):` makes gpupool:i current inside (None or a negative index: no change), as
    `torch.cuda.device` does: torch.utils.checkpoint reads and loads each device's generator state under it. (The C++
    client's module had no `device`; the Python client's returned a `torch.device`, which as a context manager made
    every factory's default device gpupool, the CPU tensor a state is downloaded into too: a segfault.)"""

    def __init__(self, device: Any) -> None:
        index = index_of(device)
        self.index = -1 if index is None else index
        self.prev = -1

    def __enter__(self) -> None:
        module = getattr(torch, NAME)
        self.prev = int(module.current_device())
        if self.index >= 0:
            module.set_device(self.index)

    def __exit__(self, *exc: object) -> None:
        if self.index >= 0:
            getattr(torch, NAME).set_device(self.prev)


def usable_indices() -> list[int]:
    """The gpupool indices of the devices this process may use: every device of its lease but another torchrun rank's
    own (pool.rank_device refuses those: a device takes one process's session)."""
    from .pool import rank_device

    count = int(getattr(torch, NAME).device_count())
    usable = []
    for i in range(count):
        try:
            rank_device(i, count)
        except Exception:  # (InvalidArgument) another local rank's own device
            continue
        usable.append(i)
    return usable


@contextlib.contextmanager
def fork_rng(
    devices: Any = None,
    enabled: bool = True,
    _caller: str = "fork_rng",
    _devices_kw: str = "devices",
    device_type: str | None = None,
) -> Iterator[None]:
    """`torch.random.fork_rng` where the accelerator is gpupool (round 44). torch's asks `torch.accelerator` for the
    device type, and torch's own code is answered `gpupool` (under `--cuda` too: client/cuda/devices.py), so it read a
    script's devices in gpupool's numbers and forked every device of `device_count()` by default. In a torchrun rank
    of a lease of several devices that failed: `fork_rng()` (every device, so another rank's own among them), and
    under `--cuda` `fork_rng(devices=[local_rank])`, `devices=[torch.cuda.current_device()]` or `[torch.device(
    "cuda", local_rank)]` in every rank but 0 ("gpupool:1 is lease device 0 here, local rank 0's own device ...", or
    "expected a gpupool device"). Here a script's devices under `--cuda` are CUDA's numbers (the lease's), mapped to
    gpupool's; without devices it forks the devices this process may use (`usable_indices`: a rank's own and its
    spares; on a GPU machine a rank could touch the other ranks' GPUs, here their generators live in their sessions).
    A device type or accelerator other than gpupool goes to torch's as it is."""
    kind = device_type
    if kind is None:
        acc = torch.accelerator.current_accelerator()  # (gpupool's own code is answered `gpupool`)
        kind = acc.type if acc is not None else "cuda"
    cuda = sys.modules.get(f"{__package__}.cuda")
    mapped = cuda is not None and cuda.enabled() and kind in ("cuda", NAME) and device_type != NAME
    if kind != NAME and not mapped:
        with _FORK_RNG(devices, enabled, _caller, _devices_kw, device_type):
            yield
        return
    if devices is None:
        devices = usable_indices()
    elif mapped:
        from .cuda.devices import to_gpupool

        devices = [index_of(to_gpupool(d)) for d in devices]
    with _FORK_RNG(devices, enabled, _caller, _devices_kw, NAME):
        yield


class _GeneratorMeta(type(_GENERATOR)):  # type: ignore[misc]
    """`isinstance(g, torch.Generator)` and `issubclass` stay torch's: every generator is one (torch's own
    `default_generator`, a DataLoader's), not only those made here."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _GENERATOR)

    def __subclasscheck__(cls, sub: Any) -> bool:
        return issubclass(sub, _GENERATOR)


def generator_device(device: Any) -> torch.device | None:
    """The gpupool device a `torch.Generator(device=...)` names (`gpupool`, `gpupool:N`, and under `--cuda` `cuda`,
    `cuda:N`; an index-less one is the current device), or None for any other (the CPU's, torch's own)."""
    if not isinstance(device, str | torch.device):
        return None
    d = torch.device(device)
    cuda = sys.modules.get(f"{__package__}.cuda")
    if d.type == "cuda" and cuda is not None and cuda.enabled():
        from .cuda.devices import to_gpupool

        d = to_gpupool(d)
    if d.type != NAME:
        return None
    return d if d.index is not None else torch.device(NAME, int(getattr(torch, NAME).current_device()))


class Generator(_GENERATOR, metaclass=_GeneratorMeta):
    """`torch.Generator(device="gpupool")` (and `device="cuda"` under `--cuda`), both clients (round 50; until then
    torch's "register `PrivateUse1HooksInterface` ... `getNewGenerator`", and for `cuda` "Cannot get CUDA generator
    without ATen_cuda library"). The generator is the client's own: a CPU generator whose `device` says the gpupool
    device, seeded by its `manual_seed`/`seed` and nothing else (the daemon's generator, which `torch.manual_seed`
    seeds, is another). An op given it (`torch.randn(..., device=, generator=g)`, `x.bernoulli_(p, generator=g)`,
    `nn.init.normal_(w, generator=g)`, `torch.randperm`, `multinomial`) draws on the CPU from it and uploads what it
    drew (the clients' CPU path: one upload an op): reproducible from its seed, the numbers a CPU generator of that
    seed draws, not a CUDA GPU's (Philox). `get_state` is the CPU generator's 5,056 bytes. Any other device goes to
    torch's own class."""

    _gp_device: torch.device

    def __new__(cls, device: Any = None) -> Any:
        where = generator_device(device)
        if where is None:
            return _GENERATOR() if device is None else _GENERATOR(device)
        g = super().__new__(cls, "cpu")  # type: ignore[call-arg]
        g._gp_device = where
        return g

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._gp_device

    def __reduce__(self) -> Any:  # deepcopy, pickle: this class again, on the same device, with the same state
        _, _, state = super().__reduce__()
        return (Generator, (self._gp_device,), state)


def install() -> None:
    """Put `fork_rng` in torch.random and `Generator` in torch (idempotent): both clients, when they make
    `torch.gpupool`."""
    torch.random.fork_rng = fork_rng  # type: ignore[assignment]
    torch.Generator = Generator  # type: ignore[misc]
