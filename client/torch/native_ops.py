"""The steady path of an eager op in C: `native_ops.cpp`, compiled at first use, becomes
`RemoteTensor.__torch_dispatch__` (and the tensor's finalizer).

A warm plain op (its meta-cache entry made, its arguments and keyword arguments remote tensors, lazy views, tensor
lists and plain values - numbers, int and bool lists, dtypes, layouts, memory formats -, on a device nobody records a
step on and with no held-back empty; also one with a `device` argument left out, `meta.Schema.device_plain`: the
ones_like of every backward), detach and the view ops run there: the cache key, the compact record, the handles
and the wrappers as `remote.run_remote` and `transfer` make them, with the runtime's usual `eager_op` and the session's
(`Session.eager_op`: the record joins the batch) inline; ~300 Python bytecodes an op less. A dying tensor's finalizer
too, a shared handle's (a detach, a view) included. And torch's lookup of a `__torch_dispatch__` rule, which it makes
before every dispatch to a tensor subclass (`_install_rule_finder`). Everything else goes to the Python
dispatcher (`dispatch.torch_dispatch`), the reference, which the tests compare it with (tests/integration/
test_shim_native_ops.py: the same keys, record bytes, wrappers and training bits). It uses CPython's C API only (no
torch headers): `-I` Python's include directory, ~2 s once per Python build and source, cached beside the native guard
(native.py: `$GPUPOOL_NATIVE_CACHE`, the same lock and atomic rename). Optional: without a compiler or Python's
headers the Python dispatcher does every op and one log line says why; `GPUPOOL_NATIVE_OPS=0` keeps it without trying.

    python -c 'from gpupool.client.torch import native_ops; print(native_ops.build())'   # build now (scripts/setup.sh)
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch._library.simple_registry as simple_registry

from gpupool import compact, config

from .. import cbuild, session
from . import dispatch, meta, native, runtime, tensor, transfer
from .tensor import RemoteTensor

log = logging.getLogger("gpupool.torch")

SOURCE = Path(__file__).with_name("native_ops.cpp")
_ops: list[Any] = []  # the extension module once imported and set up; [None] once it failed (tried once)


def enabled() -> bool:
    """False when `GPUPOOL_NATIVE_OPS=0` keeps every op on the Python dispatcher (`dispatch.torch_dispatch`)."""
    return os.environ.get("GPUPOOL_NATIVE_OPS", "1").strip() != "0"


def library_path() -> Path:
    """Where the built extension lives: one file per (Python build, machine, source). It uses CPython's C API only."""
    return cbuild.extension_path(SOURCE, "ops")


def compile_command(out: Path) -> list[str]:
    return cbuild.extension_command(SOURCE)(out)  # type: ignore[no-any-return]


def build() -> Path:
    return cbuild.build_cached(library_path(), compile_command, "the native op path")


def load() -> Any:
    """The set-up extension module (native_ops.cpp), or None: `GPUPOOL_NATIVE_OPS=0`, not CPython, or the build or
    import failed (one log line; the Python dispatcher then does every op). Built and imported once a process."""
    if _ops:
        return _ops[0]
    module = None
    if not enabled():
        log.info("gpupool: GPUPOOL_NATIVE_OPS=0: every op takes the Python dispatcher (slower per op)")
    elif sys.implementation.name != "cpython":
        log.info("gpupool: the native op path needs CPython; every op takes the Python dispatcher")
    else:
        try:
            path = build()
            module = config.import_private_extension("gpupool_native_ops", path)  # checked and imported as opened
            remote_del = module.setup(  # returns RemoteTensor.__del__ in C (a method descriptor)
                         tensor.RemoteTensor, torch.Tensor._make_wrapper_subclass, torch.strided,
                         dispatch.torch_dispatch, torch.compiler, meta.CACHE, tensor.RemoteView, transfer._alias,
                         transfer._view, transfer._GEOMETRY, compact.MAX_OP_IDS, compact.MAX_OUTPUTS,
                         dispatch._PLAIN, dispatch._SPECIAL, runtime)  # fmt: skip
            setattr(module, "remote_del", remote_del)  # noqa: B010 - a module attribute mypy cannot know
            # Session.eager_op's usual case inline (a short record joining a batch that holds some)
            module.setup_session(session.Session, session.Session.__dict__["eager_op"], session,
                                 tuple(session._EAGER_SHORT))  # fmt: skip
            consts = (compact.DTYPE_CODES, compact.LAYOUT_CODES, compact.MEMORY_FORMAT_CODES)
            module.setup_values((torch.dtype, torch.layout, torch.memory_format),
                                {v: compact.encode_value(v) for codes in consts for v in codes})  # fmt: skip
            module.setup_inference(torch.is_inference_mode_enabled)  # view ops under inference mode: Python's
            _install_rule_finder(module)
            # torch's `__torch_function__`/`__torch_dispatch__` lookups by C string through interned names
            module.setup_getattr(tensor.RemoteTensor, tensor.RemoteView, type(torch.Tensor))
        except Exception as exc:  # BuildError, a broken cache file: the Python dispatcher still works
            log.warning("gpupool: native op path unavailable, every op takes the Python dispatcher (slower per op; "
                        "GPUPOOL_NATIVE_OPS=0 skips this): %s", exc)  # fmt: skip
            module = None
    _ops.append(module)
    return module


# The names each function of torch's lookup reads (its code's co_names), as torch 2.x writes them: `find_rule` is
# `singleton._data[op.__qualname__].torch_dispatch_rules._data.get(cls)`, exactly these three functions' work.
_RULE_LOOKUP = {
    "find_torch_dispatch_rule": ("singleton", "find", "__qualname__", "torch_dispatch_rules"),
    "SimpleLibraryRegistry.find": ("_data", "get", "SimpleOperatorEntry"),
    "GenericTorchDispatchRuleHolder.find": ("_data", "get"),
}


def _is_the_lookup_find_rule_copies(current: Any) -> bool:
    functions = {
        "find_torch_dispatch_rule": current,
        "SimpleLibraryRegistry.find": getattr(getattr(simple_registry, "SimpleLibraryRegistry", None), "find", None),
        "GenericTorchDispatchRuleHolder.find": getattr(
            getattr(simple_registry, "GenericTorchDispatchRuleHolder", None), "find", None
        ),
    }
    return all(
        getattr(getattr(functions[name], "__code__", None), "co_names", None) == names
        for name, names in _RULE_LOOKUP.items()
    ) and type(simple_registry.singleton) is getattr(simple_registry, "SimpleLibraryRegistry", None)


def _install_rule_finder(module: Any) -> None:
    """torch calls `torch._library.simple_registry.find_torch_dispatch_rule(op, cls)` (three Python functions) before
    every `__torch_dispatch__` of a tensor subclass, ours included: two of them for a remote op that sends nothing
    (a view, a detach). `native_ops.cpp`'s `find_rule` is the same lookup in C (the original for anything else). torch
    reads the function once, at the first such dispatch of the process: before it (gpupool's import, as usual) this
    takes effect for every subclass; after it, it changes nothing. Idempotent. Only over the lookup `find_rule` copies
    (`_RULE_LOOKUP`): a torch that looks rules up otherwise, or a lookup somebody wrapped first, keeps its own."""
    current = simple_registry.find_torch_dispatch_rule
    if current is module.find_rule:
        return
    if not _is_the_lookup_find_rule_copies(current):
        log.info("gpupool: torch's __torch_dispatch__ rule lookup is not the one native_ops.cpp copies: left as is")
        return
    module.setup_rules(simple_registry, current)
    simple_registry.find_torch_dispatch_rule = module.find_rule


def link_current_device() -> bool:
    """`native.current_device` (api.current_index) as one C call of native_ops.cpp into the native guard's own
    `gpupool_current_device`, where ctypes' call cost ~11k instructions (a captured step with CPU arguments only asks
    every replay); True if linked. Needs both the guard (native.install) and this module; else it leaves ctypes's
    (or the Python fallback's)."""
    module = _ops[0] if _ops else None
    lib = native.library()
    if module is None or lib is None:
        return False
    if native.current_device is not module.current_device:
        module.setup_current_device(ctypes.cast(lib.gpupool_current_device, ctypes.c_void_p).value)
        native.current_device = module.current_device
        # a tensor's `.grad` in ~20 instructions (`grads_off`, a captured step's replay), checked on a probe first
        probe, bare = torch.zeros(1, requires_grad=True), torch.zeros(1)
        probe.grad = torch.ones(1)
        module.setup_grad_object(ctypes.cast(lib.gpupool_grad_object, ctypes.c_void_p).value, probe, probe.grad, bare)
    return True


def use(on: bool) -> bool:
    """Route `RemoteTensor.__torch_dispatch__` through the C path (native_ops.cpp: its steady ops in C, the rest to
    `dispatch.torch_dispatch`) or straight to the Python dispatcher; True if the C path is in place now. `on` with no
    module (`load`) leaves the Python dispatcher."""
    module = load() if on else None
    fn = module.torch_dispatch if module is not None else dispatch.torch_dispatch
    RemoteTensor.__torch_dispatch__ = classmethod(fn)  # type: ignore[assignment]
    RemoteTensor.__del__ = module.remote_del if module is not None else tensor.python_del  # type: ignore[method-assign]
    return module is not None


def active() -> bool:
    """True while `RemoteTensor.__torch_dispatch__` is the C path."""
    fn = RemoteTensor.__dict__["__torch_dispatch__"].__func__
    return bool(_ops) and _ops[0] is not None and fn is _ops[0].torch_dispatch
