"""client/torch/errors.py `clear_grads` (round 51): a daemon's error at a sync names its session's handles without a
value, and the `.grad`s on them are set back to None before the script sees the error, as CUDA (which raises at the
allocation) never sets them. The real clients run it in tests/integration/test_cuda_scripts.py (oom_skip.py)."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from types import ModuleType

import torch

from gpupool import errors
from gpupool._proto import tensor_pb2

ROOT = Path(__file__).resolve().parents[2]


def fresh_errors() -> ModuleType:
    """A module of client/torch/errors.py of this test's own, loaded from its file as the C++ client loads it
    (client/native/backend.py `errors`): importing gpupool.client.torch would register the device."""
    spec = importlib.util.spec_from_file_location("clear_grads_errors", ROOT / "client" / "torch" / "errors.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_grads_a_sync_names_are_set_back_to_none_and_no_others() -> None:
    mod = fresh_errors()
    session, other = object(), object()
    handles = {}  # id of a gradient tensor -> (its session, its handle)
    leaves = [torch.zeros(2, requires_grad=True) for _ in range(4)]
    for i, leaf in enumerate(leaves):
        leaf.grad = torch.ones(2)
        handles[id(leaf.grad)] = (other if i == 3 else session, 100 + i)
    mod.tensor_handle = lambda t: handles.get(id(t))
    kept = leaves[2].grad
    wire = tensor_pb2.Error(
        code="RESOURCE_EXHAUSTED", op="aten::randn", message="device 0 full", poisoned=[100, 101, 103]
    )
    exc = errors.from_failure(wire)
    exc.session = session
    out = mod.translate(exc)
    assert isinstance(out, mod.OutOfMemoryError) and str(out) == "aten::randn: device 0 full"
    # 100 and 101 are named; 102 is not (a gradient with a value keeps it); 103 is another session's handle
    assert [leaf.grad is None for leaf in leaves] == [True, True, False, False] and leaves[2].grad is kept
    assert exc.session is None and pickle.loads(pickle.dumps(exc)).poisoned == frozenset({100, 101, 103})
    leaves[0].grad = torch.ones(2)
    handles[id(leaves[0].grad)] = (session, 100)
    assert mod.clear_grads(exc) == 0 and leaves[0].grad is not None  # translated twice: cleared once


def test_an_error_naming_no_handles_or_no_session_clears_nothing() -> None:
    mod = fresh_errors()
    leaf = torch.zeros(2, requires_grad=True)
    leaf.grad = torch.ones(2)
    mod.tensor_handle = lambda t: ("s", 5)
    old = errors.from_failure(tensor_pb2.Error(code="RESOURCE_EXHAUSTED", message="quota"))  # a daemon before round 51
    assert old.poisoned == frozenset() and mod.clear_grads(old) == 0
    unnamed = errors.from_failure(tensor_pb2.Error(code="INVALID_ARGUMENT", message="bad", poisoned=[5]))
    assert mod.clear_grads(unnamed) == 0 and leaf.grad is not None  # no session said whose handles they are
