"""The guard key of a captured step: what must hold for a recorded graph to be replayed (client/torch/capture.py,
client/native/capture.py: both clients' step capture).

A key has four parts: the structure of the step's arguments; each argument's shape, dtype and strides (tensors)
or value (anything else); the `training` flag of every module and the hyperparameters and parameter set of
every optimizer the step uses (`discover`: found in its closure, the globals it names and its bound object, or
given as `watch=`); and the plain Python values (numbers, strings, bools, None) the step reads from its closure,
the module globals its code names and its bound object's attributes (`python_values`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import cbuild

log = logging.getLogger("gpupool.torch")
SOURCE = Path(__file__).with_name("capture_guard.cpp")

SCALARS = (bool, int, float, complex, str, type(None))


def watch_key(watched: list[Any]) -> tuple[Any, ...]:
    """Training flags of the watched modules; parameter sets and settings of the watched optimizers."""
    out: list[Any] = []
    for obj in watched:
        if isinstance(obj, torch.nn.Module):
            flags: list[bool] = []
            _training(obj, set(), flags)
            out.append(tuple(flags))
        elif isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                out.append(tuple(map(id, group["params"])))
                out.append(tuple([(k, value_key(v)) for k, v in group.items() if k != "params"]))
    return tuple(out)


def _training(m: torch.nn.Module, seen: set[int], out: list[bool]) -> None:
    """The `training` flags of `m.modules()`, in its order (each module once), without its generators' prefix
    strings: a guard key is computed on every call."""
    seen.add(id(m))
    out.append(m.training)
    for child in m._modules.values():
        if child is not None and id(child) not in seen:
            _training(child, seen, out)


_is = operator.is_
_training_of = operator.itemgetter("training")
_modules_of = operator.itemgetter("_modules")
_END = object()  # ends each run of objects in a snapshot: no object of the user's is it


class _ModulePart:
    """A watched module's part of `watch_key`: the training flags of `m.modules()`, read per call from the list
    of their `__dict__`s found when it was made (an itemgetter each, in C, where `_training` makes a call per
    module). `read()` is None unless that list is still `m.modules()`: every module's `_modules` equals the copy
    taken then (the same children, compared by identity in C: a child added, removed, replaced or moved to
    another module fails it). A tree with a module whose class reads `training` or `_modules` in its own way is
    walked per call, as `watch_key` walks it."""

    def __init__(self, m: torch.nn.Module) -> None:
        self.m = m
        mods: list[torch.nn.Module] = []
        _modules(m, set(), mods)
        plain = all(not hasattr(type(x), "training") and not hasattr(type(x), "_modules") for x in mods)
        self.dicts = [vars(x) for x in mods] if plain else None
        self.children = [dict(d["_modules"]) for d in self.dicts] if self.dicts is not None else []

    def same(self) -> bool:
        return self.dicts is None or list(map(_modules_of, self.dicts)) == self.children

    def spec(self) -> Any:
        """`read_watch`'s spec of this part (capture_guard.cpp), or None: a tree walked per call."""
        if self.dicts is None:
            return None
        children: list[Any] = []
        for kids in self.children:
            children += (*itertools.chain.from_iterable(kids.items()), _END)
        return (0, list(self.dicts), tuple(children))

    def read(self) -> Any:
        """This part of the key, or None where the module list may no longer be `m.modules()`."""
        if self.dicts is None:
            flags: list[bool] = []
            _training(self.m, set(), flags)
            return tuple(flags)
        return tuple(map(_training_of, self.dicts)) if self.same() else None


def _modules(m: torch.nn.Module, seen: set[int], out: list[torch.nn.Module]) -> None:
    """`m.modules()` in the order `_training` walks them."""
    seen.add(id(m))
    out.append(m)
    for child in m._modules.values():
        if child is not None and id(child) not in seen:
            _modules(child, seen, out)


def _settled(v: Any) -> bool:
    """Whether `value_key(v)` stays what it is while `v` is the same object: a CPU tensor's is its values."""
    if type(v) in _PLAIN:
        return True
    if type(v) is tuple:
        return all(type(x) in _PLAIN for x in v)
    return isinstance(v, torch.Tensor) and v.device.type != "cpu"


def _snapshot(groups: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """What an optimizer's part of `watch_key` is made of, in order: (its param_groups list and per group the
    dict, its values and its parameters; its keys), each group's runs ended by `_END` (so that no object can pass
    from one run to the next unseen). The first is compared by identity, the keys (str) by equality."""
    objects: list[Any] = [groups]
    keys: list[Any] = []
    for g in groups:
        objects += (g, *g.values(), _END, *g.get("params", ()), _END)
        keys += (*g, _END)
    return objects, keys


class _OptimizerPart:
    """A watched optimizer's part of `watch_key`, kept while `unchanged()`: its param_groups the same list of the
    same dicts, each with the same keys and the very same values and parameters (`_snapshot`, compared in C: a
    number assigned anew, an added group or parameter fails it). `read()` gives the part as a number
    (`number`: equal parts, equal numbers), so that a guard key is hashed and compared without it. An optimizer
    with a value whose key is not its identity (a CPU tensor, a list) is never kept: its part is made per call."""

    def __init__(self, opt: torch.optim.Optimizer, number: Callable[[Any], int]) -> None:
        self.opt = opt
        self.groups = opt.param_groups
        self.objects, self.keys = _snapshot(self.groups)
        self.part = watch_key([opt])
        self.kept = all(_settled(v) for g in self.groups for k, v in g.items() if k != "params")
        self.number = number(self.part)

    def spec(self) -> Any:
        """`read_watch`'s spec of this part (capture_guard.cpp), or None: a part not kept (made per call)."""
        if not self.kept:
            return None
        objects: list[Any] = []
        for g in self.groups:
            objects += (g, *itertools.chain.from_iterable(g.items()), _END, *g.get("params", ()), _END)
        return (1, self.opt, self.groups, tuple(objects), self.number)

    def unchanged(self) -> bool:
        """The param_groups hold what they held when the part was made (a CPU tensor's values aside)."""
        groups = self.opt.param_groups
        if groups is not self.groups:
            return False
        objects, keys = _snapshot(groups)
        return keys == self.keys and len(objects) == len(self.objects) and all(map(_is, objects, self.objects))

    def read(self) -> Any:
        """This part of the key, or None where the part is to be made anew (a part not kept is made per call
        while its objects stay: a CPU tensor's values may change in place)."""
        if not self.unchanged():
            return None
        return self.number if self.kept else watch_key([self.opt])


class Watch:
    """The watched objects' part of a guard key on every call, cheaply: each part is remade only when what it
    read may have changed; otherwise a module's flags are read off the module list it found, and an optimizer's
    part (its parameters and settings: ~11 values keyed one by one) is the number of the one made before.
    `key()` equals `key()` of another call exactly when `watch_key(watched)` does (a module whose `__dict__` is
    replaced wholesale aside).

    Where every part is a plain module tree or a kept optimizer part, `key()` is one C call (capture_guard.cpp
    `read_watch`: the same comparisons by identity, ~20k instructions of Python a tiny-MLP step less); anything it
    finds changed, or cannot read, goes to the parts' Python `read()` as before, which remakes them. `native=False`
    (or no C++ compiler: `native()`) keeps the Python path alone."""

    def __init__(self, watched: list[Any], native: bool = True) -> None:
        self.watched = watched
        self.parts: list[Any] = []
        self.numbers: dict[Any, int] = {}  # an optimizer's part -> its number
        self.c = _native() if native else None  # the C module (read_watch), or None
        self.specs: tuple[Any, ...] | None = None  # read_watch's argument, None where a part is Python's alone
        self._remake()

    def _number(self, part: Any) -> int:
        found = self.numbers.get(part)
        if found is None:
            if len(self.numbers) >= 64:  # parts that never repeat (a new device lr per step): numbers never reused
                self.numbers.clear()
            found = self.numbers[part] = next(_part_numbers)
        return found

    def _remake(self) -> None:
        self.parts = [
            _ModulePart(obj) if isinstance(obj, torch.nn.Module) else _OptimizerPart(obj, self._number)
            for obj in self.watched
            if isinstance(obj, torch.nn.Module | torch.optim.Optimizer)
        ]
        specs = [part.spec() for part in self.parts] if self.c is not None else [None]
        self.specs = None if None in specs else tuple(specs)

    def key(self) -> tuple[Any, ...]:
        if self.specs is not None:
            found = self.c.read_watch(self.specs)  # type: ignore[union-attr]
            if found is not None:
                return found  # type: ignore[no-any-return]
        out = [part.read() for part in self.parts]
        if None in out:
            self._remake()
            out = [part.read() for part in self.parts]
        return tuple(out)


_part_numbers = itertools.count(1)
_c_module: list[Any] = []  # capture_guard.cpp's module once built and imported; [None] once that failed


def build() -> Path:
    """capture_guard.cpp built (at first use: client/cbuild.py's cache), its path (scripts/setup.sh builds it)."""
    return cbuild.build_cached(cbuild.extension_path(SOURCE, _PREFIX), cbuild.extension_command(SOURCE), _WHAT)


_PREFIX, _WHAT = "capture-guard", "the capture guard's check"


def _native() -> Any:
    """capture_guard.cpp's module (`read_watch`), built at first use into the clients' native cache
    (client/cbuild.py), or None where it cannot be (no compiler, not CPython: one log line; `Watch` then reads every
    part in Python). Once a process."""
    if not _c_module:
        module = None
        try:
            module = cbuild.python_extension(SOURCE, "gpupool_capture_guard", _PREFIX, _WHAT)
            module.setup(_END)
        except Exception as exc:  # noqa: BLE001 - BuildError, a broken cache file: the Python path still works
            log.warning("gpupool: the captured step's guard check in C is unavailable (Python's is used): %s", exc)
            module = None
        _c_module.append(module)
    return _c_module[0]


def values_key(values: dict[str, Callable[[], Any]]) -> tuple[Any, ...]:
    if not values:  # the usual step reads none (a generator costs more than the rest of this)
        return ()
    return tuple([(name, value_key(read())) for name, read in values.items()])


def difference(graphs: dict[Any, Any], new: Any) -> str:
    """Why `new` is not the key of the most recently used graph, in words."""
    old = list(graphs)[-1]
    if old[0] != new[0]:
        return "the structure of its arguments changed"
    if old[1] != new[1]:
        return "an argument's shape, dtype, stride or value changed"
    if old[2] != new[2]:
        return "a module's training flag or an optimizer's settings or parameters changed"
    changed = [name for (name, a), (_, b) in zip(old[3], new[3], strict=False) if a != b]
    return f"a Python value it reads changed ({', '.join(changed)})"


def tensors_check(leaves: list[Any]) -> Callable[..., bool] | None:
    """A check of a later call's leaves against these (all plain CPU tensors), in one C call: torch's own guard of
    compiled code (`torch._C._dynamo.guards.TensorGuards`: each leaf's Python type, dispatch keys, dtype, device,
    requires_grad, sizes and strides, all static). Where it passes, every leaf's `leaf_key` is the one it has now
    (a CPU tensor's is its shape and dtype): `StepCache._lookup` then skips making and hashing the key (round 47,
    ~2.6k instructions against ~8.5k for two batches). None where there is no such check: a leaf that is not a plain
    CPU tensor (a device tensor's key holds its storage offset, which the check does not read), no leaves, or no
    TensorGuards in this torch."""
    if not leaves or _TENSOR_GUARDS is None:
        return None
    for x in leaves:
        if type(x) is not torch.Tensor or not x.is_cpu:
            return None
    try:
        sizes = [list(x.shape) for x in leaves]
        strides = [list(x.stride()) for x in leaves]
        return _TENSOR_GUARDS(*leaves, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides).check  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - a torch whose TensorGuards takes other arguments: the key every call
        return None


def _tensor_guards() -> Any:
    try:
        from torch._C._dynamo.guards import TensorGuards
    except Exception:  # noqa: BLE001 - a torch without it (or without dynamo): no `tensors_check`
        return None
    return TensorGuards


_TENSOR_GUARDS = _tensor_guards()


def leaf_key(x: Any) -> Any:
    if type(x) is torch.Tensor:  # a CPU batch, the C++ client's tensors: no `_gp_key` to look for (a miss raises)
        if x.is_cpu:  # (a torch.Size hashes and compares as the tuple of its sizes: no copy into one)
            return ("cpu", x.shape, x.dtype)
        return (x.device, x.shape, x.stride(), x.storage_offset(), x.dtype)
    key = getattr(x, "_gp_key", None)  # the Python client's tensors carry theirs
    if key is not None:
        return key
    if isinstance(x, torch.Tensor):
        if x.device.type == "cpu":  # a CPU argument: uploaded (or sent by value) contiguous
            return ("cpu", tuple(x.shape), x.dtype)
        return (x.device, tuple(x.shape), x.stride(), x.storage_offset(), x.dtype)  # the C++ client's
    return ("value", value_key(x))


_PLAIN = frozenset({bool, int, float, str, type(None)})


def value_key(v: Any) -> Any:
    if type(v) in _PLAIN:  # the common case, first
        return (type(v), v)
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu":  # a device tensor: by identity (its values would be a sync)
            return ("tensor", id(v))
        return ("cpu", v.tolist()) if v.numel() <= 16 else ("cpu", id(v))
    try:
        hash(v)
    except TypeError:
        return ("id", id(v))
    return (type(v), v)


def _code_names(code: Any) -> set[str]:
    """Global names a function's code (and the code of functions and lambdas defined inside it) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


def python_values(fn: Callable[..., Any]) -> dict[str, Callable[[], Any]]:
    """Readers of the plain Python values (numbers, strings, bools, None) a step reads directly: its closure
    cells, the module globals its code names and its bound object's attributes, as they are at capture()."""
    target = getattr(fn, "__func__", fn)
    code = getattr(target, "__code__", None)
    found: dict[str, Callable[[], Any]] = {}
    if code is not None:
        for name, cell in zip(code.co_freevars, getattr(target, "__closure__", None) or (), strict=False):
            if isinstance(_cell_value(cell), SCALARS):
                found[name] = functools.partial(_cell_value, cell)
        globs = getattr(target, "__globals__", {})
        for name in sorted(_code_names(code)):
            if name in globs and isinstance(globs[name], SCALARS) and not name.startswith("__"):
                found[name] = functools.partial(globs.get, name)
    owner = getattr(fn, "__self__", None)
    if owner is not None and hasattr(owner, "__dict__"):
        for name, v in vars(owner).items():
            if isinstance(v, SCALARS):
                found[f"self.{name}"] = functools.partial(getattr, owner, name, None)
    return found


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def discover(fn: Callable[..., Any]) -> list[Any]:
    """Modules and optimizers a step function reaches: its closure, the globals it names, its bound object."""
    found: list[Any] = []
    candidates: list[Any] = []
    target = getattr(fn, "__func__", fn)
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        candidates.append(owner)
        candidates.extend(vars(owner).values() if hasattr(owner, "__dict__") else [])
    for cell in getattr(target, "__closure__", None) or ():
        try:
            candidates.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    code = getattr(target, "__code__", None)
    globs = getattr(target, "__globals__", {})
    if code is not None:
        candidates.extend(globs[n] for n in code.co_names if n in globs)
    for c in candidates:
        if isinstance(c, torch.nn.Module | torch.optim.Optimizer) and not any(c is f for f in found):
            found.append(c)
    return found
