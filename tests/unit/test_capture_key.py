"""The guard key a captured step computes on every call (both clients: client/capture_step.py, capture_guard.py): its
cheap forms must key exactly what the plain ones key -- the argument structure (`CapturedStep._structure` against
`tree_flatten`), the modules' training flags (`capture_guard._training` against `Module.modules()`) and plain
Python values (`capture_guard.value_key`'s fast path against its general one). No daemon: these run before any."""

from __future__ import annotations

import collections

import pytest
import torch
from gpupool.client import capture_guard as guard
from gpupool.client.torch.capture import CapturedStep
from torch.utils._pytree import tree_flatten

Pair = collections.namedtuple("Pair", "a b")


def _step(*args: object, **kwargs: object) -> None:
    return None


CALLS: list[tuple[tuple[object, ...], dict[str, object]]] = [
    ((torch.ones(2), torch.ones(3)), {}),
    ((torch.ones(2), torch.ones(2), torch.ones(2)), {}),
    ((torch.ones(2),), {}),
    ((), {}),
    ((torch.ones(2), 3), {}),  # a number among tensors: the same spec as two tensors, another leaf key
    ((torch.ones(2), [torch.ones(2)]), {}),
    ((torch.ones(2), (torch.ones(2),)), {}),
    ((Pair(torch.ones(2), torch.ones(2)),), {}),  # a namedtuple is a node, not a leaf
    ((torch.ones(2),), {"y": torch.ones(2)}),
    ((torch.ones(2), torch.nn.Parameter(torch.ones(2))), {}),  # a Tensor subclass: a leaf
]


@pytest.mark.parametrize("k", range(len(CALLS)))
def test_the_structure_of_a_call_is_what_tree_flatten_says(k: int) -> None:
    step = CapturedStep(_step)
    args, kwargs = CALLS[k]
    for _ in range(2):  # the second call takes the cached spec of its arity
        leaves, spec, number = step._structure(args, kwargs)
        want_leaves, want_spec = tree_flatten((args, kwargs))
        assert spec == want_spec
        assert len(leaves) == len(want_leaves) and all(a is b for a, b in zip(leaves, want_leaves, strict=True))
        assert number == step._spec_id(want_spec)


def test_one_number_per_structure_whichever_path_found_it() -> None:
    """Equal specs get one number, the fast path's and the general one's alike; different specs never share."""
    step = CapturedStep(_step)
    numbers = {}
    for args, kwargs in CALLS + CALLS[::-1]:
        _, spec, number = step._structure(args, kwargs)
        numbers.setdefault(number, spec)
        assert numbers[number] == spec
        assert number == step._spec_id(spec)
    specs = list(numbers.values())
    assert all(a != b for i, a in enumerate(specs) for b in specs[i + 1 :])
    # (t, t) on the fast path and (t, 3) on the general one: the same structure, the same number
    two = step._structure((torch.ones(2), torch.ones(2)), {})[2]
    assert step._structure((torch.ones(2), 3), {})[2] == two


def test_training_flags_are_those_of_modules_in_its_order() -> None:
    shared = torch.nn.Linear(2, 2)
    inner = torch.nn.Sequential(torch.nn.ReLU(), shared, torch.nn.Dropout())
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), inner, shared, torch.nn.Sequential(inner))
    m.add_module("gone", None)
    for k, sub in enumerate(m.modules()):  # a pattern a reordering or a dropped/duplicated module would break
        sub.train(k % 3 == 0)
    flags: list[bool] = []
    guard._training(m, set(), flags)
    assert flags == [sub.training for sub in m.modules()]
    assert guard.watch_key([m]) == (tuple(sub.training for sub in m.modules()),)
    before = guard.watch_key([m])
    shared.train(not shared.training)  # one module seen twice in the tree: its flag once, and it counts
    assert guard.watch_key([m]) != before


@pytest.mark.parametrize("v", [0, 1, True, False, 2.5, float("nan"), "adam", None, (0.9, 0.999), 1j, [1, 2], ([1], 2)])
def test_plain_values_key_as_before(v: object) -> None:
    """The fast path for bool/int/float/str/None gives what the general path gives; True and 1 stay apart."""
    got = guard.value_key(v)
    try:
        hash(v)
        want: object = (type(v), v)
    except TypeError:
        want = ("id", id(v))
    assert got == want or (v != v and got[0] is float)  # nan is not equal to itself
    assert guard.value_key(True) != guard.value_key(1)
