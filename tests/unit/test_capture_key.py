"""The guard key a captured step computes on every call (both clients: client/capture_step.py, capture_guard.py): its
cheap forms must key exactly what the plain ones key -- the argument structure (`CapturedStep._structure` against
`tree_flatten`), the modules' training flags (`capture_guard._training` against `Module.modules()`) and plain
Python values (`capture_guard.value_key`'s fast path against its general one). No daemon: these run before any."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

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


def _model() -> torch.nn.Module:
    shared = torch.nn.Linear(2, 2)
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU(), shared), shared)


def _changes(m: torch.nn.Module, opt: torch.optim.Optimizer) -> list[tuple[str, object]]:
    """What may change a step's watch key between two calls (each applied in turn, cumulatively)."""
    g = opt.param_groups[0]
    extra = torch.nn.Parameter(torch.ones(2))
    lrs = [torch.tensor(0.5, device="meta") for _ in range(2)]  # alive: a device tensor's key is its identity
    return [
        ("nothing", lambda: None),
        ("a submodule's flag", lambda: m[1][1].eval()),
        ("the flag back", lambda: m[1][1].train()),
        ("eval", lambda: m.eval()),
        ("a child added in train mode", lambda: m.add_module("late", torch.nn.Dropout())),
        ("a child replaced by one in the other mode", lambda: m.__setattr__("late", torch.nn.Linear(2, 2).eval())),
        ("a grandchild replaced", lambda: m[1].__setattr__("0", torch.nn.ReLU().train())),
        ("a child removed", lambda: m.__delattr__("late")),
        ("a child set to None", lambda: m.add_module("none", None)),
        ("train", lambda: m.train()),
        ("a new float lr", lambda: g.__setitem__("lr", 0.5)),
        ("an equal float lr, another object", lambda: g.__setitem__("lr", float("0.5"))),
        ("betas", lambda: g.__setitem__("betas", (0.8, 0.9))),
        ("a setting added", lambda: g.__setitem__("extra", 1)),
        ("a setting removed", lambda: g.pop("extra")),
        ("a parameter appended", lambda: g["params"].append(extra)),
        ("a parameter removed", lambda: g["params"].pop()),
        ("a group added", lambda: opt.add_param_group({"params": [extra], "lr": 0.1})),
        ("a CPU tensor lr", lambda: g.__setitem__("lr", torch.tensor(0.25))),
        ("that lr changed in place", lambda: g["lr"].fill_(0.125)),
        ("a list value, then changed in place", lambda: g.__setitem__("betas", [0.9, 0.99])),
        ("the list changed in place", lambda: g["betas"].append(1.0)),
        ("the param_groups list replaced", lambda: setattr(opt, "param_groups", list(opt.param_groups))),
        ("a device lr", lambda: g.__setitem__("lr", lrs[0])),
        ("another device lr", lambda: g.__setitem__("lr", lrs[1])),
    ]


@pytest.mark.parametrize("native", [True, False], ids=["c", "python"])
def test_the_kept_watch_key_is_watch_key_after_every_change(native: bool) -> None:
    """`Watch.key()` (what a captured step computes per call, its parts remade only when what they read may have
    changed, an optimizer's part as a number) is equal for two states exactly when `watch_key` of the same objects
    is, after every kind of change a step's modules and optimizers see: flags, children added, replaced, removed;
    settings assigned, added, removed; parameters and groups added; lr as a float, a CPU tensor changed in place,
    a device tensor; and states seen before come back to the key they had. Both ways of reading the kept parts:
    capture_guard.cpp's `read_watch` (the default) and the Python path alone."""
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    watch = guard.Watch([m, opt, "not watched"], native=native)
    assert (watch.c is not None) == native
    before = watch.key()
    seen = [(guard.watch_key([m, opt]), before)]
    for what, change in _changes(m, opt):
        change()  # type: ignore[operator]
        got, want = watch.key(), guard.watch_key([m, opt])
        assert watch.key() == got, what  # and again, from what the first call kept
        for was_want, was_got in seen:
            assert (was_got == got) == (was_want == want), what
        seen.append((want, got))
        if what not in (
            "nothing",
            "an equal float lr, another object",
            "a list value, then changed in place",
            "the list changed in place",
            "the param_groups list replaced",
            "a child set to None",
        ):
            assert got != before, what  # fmt: skip
        before = got
    assert any(a == b for i, (a, _) in enumerate(seen) for b, _ in seen[i + 1 :] if a is not b)  # states came back


def test_the_c_check_never_answers_for_a_changed_part() -> None:
    """capture_guard.cpp's `read_watch` answers a watch's key from the specs its parts were made with, without
    Python: after each change of `_changes` (each a new watch, made before it), its answer is None (the Python path
    then remakes the parts) or the very key the Python path reads from the same parts. A check it skipped (a
    training flag, a child, a setting's value or key, a parameter, a group, the param_groups list) answers the key
    from before the change: another key. And a quiet call is answered in C, not by the Python path."""
    assert guard._native() is not None, "capture_guard.cpp did not build here (a C++ compiler is needed)"
    answered = checked = 0
    for k in range(len(_changes(_model(), torch.optim.Adam(_model().parameters())))):
        m = _model()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        changes = _changes(m, opt)
        what, change = changes[k]
        for _, before in changes[:k]:  # the state the change is made in
            before()  # type: ignore[operator]
        watch = guard.Watch([m, opt])
        specs = watch.specs
        if specs is None:  # a CPU tensor lr, a list value: the part is made per call, in Python
            continue
        checked += 1
        assert watch.c.read_watch(specs) == watch.key(), what  # quiet: the same key either way
        change()  # type: ignore[operator]
        got = watch.c.read_watch(specs)
        watch.specs = None  # the Python path alone, from the same parts (remade where they changed)
        want = watch.key()
        assert got is None or got == want, what
        if what != "nothing" and got is not None:
            answered += 1
            assert what in ("a submodule's flag", "the flag back", "eval", "train"), what  # flags are read afresh
    assert answered >= 3 and checked >= 16, (answered, checked)


def test_a_quiet_key_is_one_c_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call where nothing changed reads no part in Python: `read_watch` answers it (the fast path is taken)."""
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    watch = guard.Watch([m, opt])
    first = watch.key()
    for cls in (guard._ModulePart, guard._OptimizerPart):
        monkeypatch.setattr(cls, "read", lambda self: pytest.fail("a part read in Python"))
    assert watch.key() == first


def test_a_child_moved_between_modules_changes_the_key() -> None:
    """The module list a part keeps is checked per call against each module's children as they were: a child
    moved from one module to the next (all children, in order, still X) reorders `m.modules()` and so the
    flags, and the part is remade."""
    x = torch.nn.Dropout().eval()
    a, b = torch.nn.Sequential(x), torch.nn.Sequential()
    m = torch.nn.Sequential(a, b)
    watch = guard.Watch([m])
    assert watch.key() == ((True, True, False, True),)  # m, a, x, b
    del a._modules["0"]
    b.add_module("0", x)
    assert watch.key() == guard.watch_key([m]) == ((True, True, True, False),)  # m, a, b, x


def test_a_parameter_moved_between_groups_changes_the_key() -> None:
    """An optimizer's part is kept while one run of every object it was made of (groups, their keys, values and
    parameters) is the same; a parameter moved from one group's end to the next group's start changes the key."""
    p1, p2, p3 = (torch.nn.Parameter(torch.ones(1)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [p1, p2]}, {"params": [p3], "lr": 0.5}], lr=0.1)
    watch = guard.Watch([opt])
    before = watch.key()
    opt.param_groups[1]["params"].insert(0, opt.param_groups[0]["params"].pop())
    assert watch.key() != before
    opt.param_groups[0]["params"].append(opt.param_groups[1]["params"].pop(0))
    assert watch.key() == before  # back as it was: the same number


def test_an_optimizer_kept_again_after_a_cpu_tensor_lr_keys_as_before() -> None:
    """A part with a CPU tensor lr is made per call (its values may change in place); when the lr is the float it
    was again, the part is kept again and the key is the one that float had (its graph replays)."""
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.5)
    lr = opt.param_groups[0]["lr"]
    watch = guard.Watch([opt])
    first = watch.key()
    opt.param_groups[0]["lr"] = torch.tensor(0.25)
    cpu = watch.key()
    opt.param_groups[0]["lr"].fill_(0.125)
    assert cpu != first and watch.key() != cpu  # changed in place: the part is made per call
    opt.param_groups[0]["lr"] = lr
    assert watch.key() == first and watch.parts[0].kept


def test_kept_parts_are_read_again_not_recomputed() -> None:
    """A quiet call keeps an optimizer's part (the same tuple) and reads the flags afresh."""
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    watch = guard.Watch([m, opt])
    parts = list(watch.parts)
    first = watch.key()
    m[0].eval()
    second = watch.key()
    assert watch.parts == parts  # nothing remade: a flag is read, not a structure
    assert (
        second[0] != first[0]
        and second[1:] == first[1:]
        and all(a is b for a, b in zip(second[1:], first[1:], strict=True))
    )


class _Graph:
    """What `StepCache` asks of a graph: `valid`, `key` (and `built`, unread here); `watching`, `writes`, `rt` for the
    Python client's `_release` (nothing watched or written)."""

    def __init__(self, key: object) -> None:
        self.key, self.valid, self.built, self.watching, self.writes, self.rt = key, True, None, [], [], None


_SCALE = 1.0  # a plain Python value the step below reads (a global its code names)


def _lookup_step() -> tuple[CapturedStep, torch.nn.Module]:
    model = torch.nn.Linear(4, 2)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x * _SCALE) - y

    return CapturedStep(step), model


def _define(cs: CapturedStep, *args: torch.Tensor) -> tuple[object, _Graph]:
    leaves, _, structure = cs._structure(args, {})
    key = cs._key(structure, leaves)
    g = cs.graphs[key] = _Graph(key)
    return key, g


def _found(cs: CapturedStep, *args: torch.Tensor) -> object:
    leaves, _, structure = cs._structure(args, {})
    key, g = cs._lookup(structure, leaves)
    assert key == cs._key(structure, leaves)  # the short way's key is the full one's
    return g


def test_the_short_lookup_finds_what_the_key_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 47: a call whose plain CPU batches pass the last call's check (`guard.tensors_check`) skips the leaf keys,
    and finds exactly the graph the full key finds: a batch of another shape, dtype or requires_grad, a module's
    training flag, a Python value the step reads, a graph made invalid or forgotten all take the full key again."""
    if guard._TENSOR_GUARDS is None:
        pytest.skip("no TensorGuards in this torch: the full key every call")
    global _SCALE
    cs, model = _lookup_step()
    x, y = torch.ones(3, 4), torch.zeros(3, 2)
    key, g = _define(cs, x, y)
    assert _found(cs, x, y) is g  # the full way, which keeps the check
    keys = []
    monkeypatch.setattr(guard, "leaf_key", lambda v: keys.append(v) or ("leaf", id(v)))
    leaves, _, structure = cs._structure((torch.randn(3, 4), torch.randn(3, 2)), {})
    assert cs._lookup(structure, leaves) == (key, g) and not keys  # the short way: no leaf key made
    monkeypatch.undo()
    assert _found(cs, torch.ones(5, 4), torch.zeros(5, 2)) is None  # another shape: another key, no graph
    assert _found(cs, x, y) is g
    assert _found(cs, x.double(), y) is None
    assert _found(cs, x.t().contiguous().t(), y) is g  # other strides, the same CPU key: the full way finds it
    assert _found(cs, x, y) is g
    model.eval()
    assert _found(cs, x, y) is None
    model.train()
    assert _found(cs, x, y) is g
    _SCALE = 2.0
    try:
        assert _found(cs, x, y) is None
    finally:
        _SCALE = 1.0
    assert _found(cs, x, y) is g
    g.valid = False
    assert _found(cs, x, y) is None
    g.valid = True
    assert _found(cs, x, y) is g
    cs._forget(key)  # (gone from `graphs` first: no client's `_release` of this stand-in)
    assert _found(cs, x, y) is None


def test_the_short_lookup_is_for_plain_cpu_batches_only() -> None:
    """A device tensor's key holds its storage offset, which the check does not read; a subclass, a number among the
    arguments: no check, the full key every call."""
    assert guard.tensors_check([torch.nn.Parameter(torch.ones(2))]) is None
    assert guard.tensors_check([torch.ones(2), 3]) is None
    assert guard.tensors_check([torch.ones(2, device="meta")]) is None
    assert guard.tensors_check([]) is None
    if guard._TENSOR_GUARDS is not None:
        check = guard.tensors_check([torch.ones(2, 3), torch.zeros(4, dtype=torch.int64)])
        assert check is not None
        assert check(torch.randn(2, 3), torch.ones(4, dtype=torch.int64))
        assert not check(torch.randn(3, 2), torch.ones(4, dtype=torch.int64))
        assert not check(torch.randn(2, 3), torch.ones(4, dtype=torch.int32))
        assert not check(torch.randn(2, 3).requires_grad_(), torch.ones(4, dtype=torch.int64))
        assert not check(torch.randn(2, 3), torch.nn.Parameter(torch.ones(4)))


def test_the_guards_build_is_one_for_a_pythons_every_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A venv's `python` and `python3` (links to one interpreter) find one build of the capture guard: until round 53
    each had its own (sys.executable in the key), and the README's `python train.py --capture` built it again after
    scripts/setup.sh's `python3` had."""
    from gpupool.client import cbuild

    built = cbuild.extension_path(guard.SOURCE, "capture-guard")
    link = tmp_path / "python3"
    link.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(link))
    assert cbuild.extension_path(guard.SOURCE, "capture-guard") == built
