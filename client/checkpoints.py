"""torch.load of a checkpoint whose storages were saved on a gpupool device (location tags `gpupool` / `gpupool:N`).

The C++ client saves device tensors as torch saves any device's: each storage tagged with its device, `gpupool:0`.
The Python client's tensors have no storage of their own (wrapper subclasses): `torch.save` pickles the CPU copy
their `__reduce_ex__` downloads, whose storage `mark_saved` tags with the tensor's device, so its checkpoints carry
the same `gpupool:N` locations (until round 35 they said `cpu`: a whole model saved under the Python client came back
on the CPU under `gpupool run`, and word_language_model's reload failed there). Until round 34 torch restored such a
storage in one of two ways, and both failed:
- in a process with the `gpupool` device, through torch's PrivateUse1 entry, which moves the storage under
  `torch.gpupool.device(...)` -- a context manager that neither client's `torch.gpupool` has (the C++ client:
  "module 'torch.gpupool' has no attribute 'device'"; the Python client's `device()` is its lease attach: a
  TypeError). `torch.load(path)` and `torch.load(path, map_location="gpupool:0")` both failed that way (under
  `--cuda` client/cuda/patches.py's torch.load already moved them);
- in a process without it (a CPU-only edge machine, a script run outside `gpupool run`), with torch's "don't know how
  to restore data location of torch.storage.UntypedStorage (tagged with gpupool:0)", which says nothing of
  `map_location`.

Now:
- `register()` puts `restore` before torch's PrivateUse1 entry (torch.serialization.register_package, priority 19),
  at `import torch` wherever gpupool is installed (the `torch.backends` entry point, client/cuda's `autoload`) and
  when either client makes the device. Without the device it raises what torch says of a CUDA checkpoint on a
  CPU-only machine: use `map_location`. With it, it keeps the storage on the CPU (for the wrapper below to move).
- `install_load()` (either client, when it makes the device) wraps torch.load with `wrap_load`: storages restored on
  the CPU, then the loaded tensors (and a whole module's parameters and buffers) moved to their device -- the saved
  `gpupool:N`, or a gpupool `map_location` -- as torch.load on a GPU machine puts a CUDA checkpoint back on its GPU.
  A storage cannot be restored onto the device directly: torch makes it with `torch.UntypedStorage(n, device=...)`,
  a storage the C++ client's daemon never saw, and a byte tensor's storage under a float tensor is a view of another
  dtype, which it refuses. `--cuda` wraps torch.load the same way, with CUDA's locations mapped too (patches.py).
A machine without gpupool installed gets torch's own message (it knows no `gpupool`); `torch.load(path,
map_location="cpu")` loads such a checkpoint anywhere.
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Callable
from typing import Any

import torch
from torch.serialization import default_restore_location

NAME = "gpupool"
# torch's own entries: cpu 10, cuda 20, mps 21, meta 22, PrivateUse1 23 (lower runs first). Before cpu's: the tagger
# names the Python client's CPU copies (`mark_saved`), which cpu's would tag `cpu`; the restorer answers only gpupool's
# locations, so its place among the others changes nothing else.
PRIORITY = 9
_SAVED_AS = "_gpupool_saved_as"  # the attribute `mark_saved` puts on a CPU copy's storage: its device's location
_LOCATION = re.compile(r"gpupool(:[0-9]+)?\Z")
_registered: list[bool] = []
# (target_of, targets) of the torch.load calling a callable map_location now: what `_storage_to` records a move in
_MOVING: contextvars.ContextVar[tuple[Callable[[Any], torch.device | None], dict[int, torch.device]] | None]
_MOVING = contextvars.ContextVar("gpupool_storage_moves", default=None)
_STORAGE_TO = torch.storage._to  # torch's own: what `storage.cuda()`, `storage.to(device)` end in


def why(location: str) -> str:
    return (
        f"Attempting to deserialize object on {location} (a pooled GPU) but this process has no gpupool device. "
        "If you are running on a CPU-only machine, please use torch.load with map_location=torch.device('cpu') "
        "to map your storages to the CPU (under `gpupool run`, or after `import gpupool.torch`, they load onto the "
        "leased device)"
    )


def restore(storage: Any, location: str) -> Any:
    """torch.serialization's deserializer for `gpupool` locations (None for any other: torch's entries go on)."""
    if not _LOCATION.match(location):
        return None
    if torch._C._get_privateuse1_backend_name() != NAME:
        raise RuntimeError(why(location))
    return storage  # on the CPU: the torch.load of install_load moves its tensors


def saved_location(storage: Any) -> str | None:
    """torch.serialization's tagger: the location `mark_saved` gave a storage, None for any other (torch's go on)."""
    return getattr(storage, _SAVED_AS, None)


def mark_saved(local: torch.Tensor, device: torch.device) -> None:
    """Tag the storage of `local`, the CPU copy of a tensor on `device` that is being pickled, with that device, so that
    torch.save records its location as the C++ client's storages are recorded (`gpupool:N`) and torch.load brings it
    back there (or asks for `map_location` where there is no gpupool device). The copy is the pickler's alone."""
    setattr(local.untyped_storage(), _SAVED_AS, str(device))


def register() -> None:
    """Idempotent; cheap enough for every `import torch`."""
    if _registered:
        return
    _registered.append(True)
    torch.serialization.register_package(PRIORITY, saved_location, restore)


def device_target(location: Any) -> torch.device | None:
    """The gpupool device a saved location (`gpupool`, `gpupool:N`) or a map_location value names, else None."""
    if isinstance(location, str) and _LOCATION.match(location):
        return torch.device(location)
    return location if isinstance(location, torch.device) and location.type == NAME else None


def unwrapped(load: Callable[..., Any]) -> Callable[..., Any]:
    """torch's own load under a wrapper of wrap_load."""
    return getattr(load, "_gpupool_load_of", load)


def install_load() -> None:
    """torch.load (and torch.serialization.load) wrapped for gpupool locations; a wrapper already there (`--cuda`'s,
    which also maps CUDA locations) stays."""
    register()
    if unwrapped(torch.load) is torch.load:
        torch.load = wrap_load(torch.load, device_target)
        torch.serialization.load = torch.load


def wrap_load(
    load: Callable[..., Any],
    target_of: Callable[[Any], torch.device | None],
    location_of: Callable[[str], str] | None = None,
) -> Callable[..., Any]:
    """torch.load that lands the storages whose location (or map_location) `target_of` names a gpupool device for
    (gpupool's own; under `--cuda` CUDA's too: client/cuda/patches.py) on that device. `location_of`: the saved
    location a key of a dict map_location also stands for (under `--cuda` a `"cuda:N"` key is `"gpupool:N"` too, where
    this process saved its device tensors; a key the dict names itself wins).

    Storages are restored on the CPU and the loaded tensors then moved (torch restores a storage onto a
    device through `torch.<device>.device(...)`/untyped storages, which the gpupool shim has no use for).
    A callable map_location, or one naming the CPU, goes to torch unchanged."""

    @functools.wraps(load)
    def wrapped(f: Any, map_location_: Any = None, *args: Any, **kwargs: Any) -> Any:
        if "map_location" in kwargs:
            map_location_ = kwargs.pop("map_location")
        if callable(map_location_):
            return load_calling(f, map_location_, *args, **kwargs)
        fixed = None if map_location_ is None or isinstance(map_location_, dict) else target_of(map_location_)
        if map_location_ is not None and not isinstance(map_location_, dict) and fixed is None:
            return load(f, map_location_, *args, **kwargs)  # e.g. "cpu"
        table = map_location_ if isinstance(map_location_, dict) else {}
        if table and location_of is not None:
            table = {**{location_of(k): v for k, v in table.items() if isinstance(k, str)}, **table}
        targets: dict[int, torch.device] = {}

        def restore(storage: Any, location: str) -> Any:
            location = table.get(location, location)
            target = fixed or target_of(location)
            if target is None:
                return default_restore_location(storage, location)
            targets[storage.data_ptr()] = target
            return storage

        return placed(load(f, restore, *args, **kwargs), targets)

    def load_calling(f: Any, user: Callable[[Any, str], Any], *args: Any, **kwargs: Any) -> Any:
        """torch.load with a callable map_location, which may move a storage itself (`lambda storage, loc:
        storage.cuda()`, older scripts' idiom): such a move (`_storage_to`) leaves the storage on the CPU and the
        tensors on it are moved after, as above. Until round 56 torch made the storage on the device: "torch.
        UntypedStorage(): Storage device not recognized: cuda" (`gpupool:0`: a storage the daemon never saw)."""
        targets: dict[int, torch.device] = {}

        def restore(storage: Any, location: str) -> Any:
            token = _MOVING.set((target_of, targets))
            try:
                return user(storage, location)
            finally:
                _MOVING.reset(token)

        return placed(load(f, restore, *args, **kwargs), targets)

    torch.storage._to = _storage_to  # type: ignore[attr-defined]
    wrapped._gpupool_load_of = load  # type: ignore[attr-defined]
    return wrapped


def placed(loaded: Any, targets: dict[int, torch.device]) -> Any:
    """What torch.load returned, each tensor on a storage `targets` names (by its data_ptr) moved to that device."""
    if not targets:
        return loaded
    moved: dict[int, torch.Tensor] = {}
    return in_place(loaded, lambda x: place(x, targets, moved), set())


def _storage_to(storage: Any, device: Any, non_blocking: bool = False) -> Any:
    """torch's `_to` of a storage (`storage.cuda()`, `storage.to(device)`): inside a callable map_location
    (`load_calling`) a move to a gpupool device is recorded and the storage stays on the CPU; elsewhere torch's."""
    moving = _MOVING.get()
    target = None if moving is None else moving[0](device)
    if moving is None or target is None:
        return _STORAGE_TO(storage, device, non_blocking)
    moving[1][storage.data_ptr()] = target
    return storage


def in_place(x: Any, fn: Callable[[Any], Any], seen: set[int]) -> Any:
    """`x` with `fn` applied to each tensor and module it holds, its dicts and lists changed in place (their type and
    attributes kept, as torch.load returns them: a state_dict's `_metadata`, the modules' versions that
    `load_state_dict` reads) and its tuples (named ones too) remade where something in them changed. Until round 34's
    review a pytree map remade every container: the loaded state_dict came back without its `_metadata`."""
    if isinstance(x, torch.Tensor | torch.nn.Module):
        return fn(x)
    if isinstance(x, dict | list):
        if id(x) not in seen:  # (a container held twice, or holding itself, is walked once)
            seen.add(id(x))
            for k, v in list(x.items()) if isinstance(x, dict) else list(enumerate(x)):
                new = in_place(v, fn, seen)
                if new is not v:
                    x[k] = new
        return x
    if isinstance(x, tuple):
        items = [in_place(v, fn, seen) for v in x]
        if all(a is b for a, b in zip(items, x, strict=True)):
            return x
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def place(x: Any, targets: dict[int, torch.device], moved: dict[int, torch.Tensor]) -> Any:
    """A loaded tensor on its target device, or a loaded module (`torch.save(model)`) with its parameters and buffers
    moved in place, as torch.load on the GPU that saved it gives. `moved` keeps one result per tensor object, so a
    tensor the checkpoint holds twice (tied weights: `decoder.weight = encoder.weight`) stays one tensor."""
    if isinstance(x, torch.Tensor):
        return _move(x, targets, moved)
    for module in x.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    table[name] = _move(t, targets, moved)
    refresh_flat_weights(x)
    return x


def refresh_flat_weights(module: torch.nn.Module) -> None:
    """nn.LSTM/GRU/RNN's `_flat_weights` (what their forward passes to the kernel) pointed again at the Parameters
    their tables now hold: a Parameter put into a table directly (not by setattr) leaves the list on the old object
    -- after torch.load's `place` the CPU copy, which the forward then used (and trained, where the optimizer held
    the moved ones)."""
    for m in module.modules():
        if isinstance(m, torch.nn.RNNBase):
            m._init_flat_weights()


def _move(t: torch.Tensor, targets: dict[int, torch.device], moved: dict[int, torch.Tensor]) -> torch.Tensor:
    if id(t) in moved:
        return moved[id(t)]
    target = targets.get(t.untyped_storage().data_ptr()) if t.device.type == "cpu" else None
    if target is None:
        return t
    out = t.to(target)
    if isinstance(t, torch.nn.Parameter):
        out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
    moved[id(t)] = out
    return out
