"""Out-of-bounds READS by the daemon's kernels: every allowlisted overload, each tensor argument in guarded memory.

A kernel that reads a strided, offset or expanded view as if it were contiguous (its data pointer and numel()
elements), or past the view's extent, reads bytes outside the view's storage: another session's under
`--isolation thread` or on a GPU shared by sessions, freed memory of the same worker otherwise. The daemon accepts
any view a client builds inside its storage (as_strided, expand, transpose, narrow, slicing), so this sweep places
each tensor argument of a valid call in memory where such a read faults:

- each tensor gets its own anonymous mapping, a PROT_NONE guard page on each side; its storage (exactly its view's
  extent, `untyped_storage().nbytes()`) ends at the upper guard page ("end": the view's last element is the storage's
  last byte) or starts at the lower one ("start": the view's first element is the storage's first byte);
- layouts (`LAYOUTS`): contiguous, transposed (last two dims), every other element (stride 2), an expanded first
  dim (stride 0), every element one (all strides 0: a one-element storage), and overlapping windows (strides 1);
  the values a layout cannot keep are the original's elements, cycled, so the arguments stay valid for most ops.

A read past either end faults (SIGSEGV/SIGBUS). The calls run in a forked child, many per child: the child
reports each case's start on a pipe, and a child killed by a signal names the case it was running; the parent
forks the next child from the case after it. Which call: `calls()` records torch's own (OpInfo samples forward and
backward, the nn losses and the models of scripts/gen_allowlist.py, each tensor copied at the call) and derives the
allowlisted overloads no trace reaches from a traced sibling (`out=` forms, in-place twins, Scalar forms), keeping
only calls that run on plain tensors.

The kernel each case runs is the daemon's (`checks.OpPlan(op, cpu).run`: guards' replacements, fallbacks, else
the op), after the daemon's shape-only checks (`check_enums`, `check_written`, `check_inputs`); a case they refuse
is "refused", not run. The fake GPU's kernels are torch's CPU kernels, so this is the daemon's behaviour there.

    python tests/integration/oob_sweep.py --full     # the full sweep: a summary and every faulting case
    python tests/integration/oob_sweep.py --raw      # torch's own kernels (no daemon guard, no replacement)

(A test runs it as a script: torch's OpInfo samples inspect the caller's stack, which under pytest took minutes.)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import signal
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parents[2]
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_NONE = 0

PLACEMENTS = ("end", "start")
LAYOUTS = ("contiguous", "transposed", "stepped", "expanded", "broadcast", "overlapping")


# ---- guarded memory ----


def guarded(values: torch.Tensor, layout: str, placement: str) -> torch.Tensor | None:
    """A tensor of `values`' shape and dtype in `layout`, its storage exactly the view's extent, placed against a
    PROT_NONE guard page (`placement`). None where the layout does not apply (a transpose of fewer than 2 dims, an
    expanded dim of a tensor with none of more than one element, an empty tensor)."""
    shape = list(values.shape)
    if values.numel() == 0:
        return None
    contiguous = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        contiguous[d] = contiguous[d + 1] * shape[d + 1]
    keeps = True  # the view shows values' elements where they are
    if layout == "contiguous":
        strides = contiguous
    elif layout == "transposed":
        if len(shape) < 2 or shape[-1] == 1 and shape[-2] == 1:
            return None
        t_shape = shape[:-2] + [shape[-1], shape[-2]]
        t_strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            t_strides[d] = t_strides[d + 1] * t_shape[d + 1]
        strides = t_strides[:-2] + [t_strides[-1], t_strides[-2]]
    elif layout == "stepped":
        if values.numel() == 1:
            return None
        strides = [2 * s for s in contiguous]
    elif layout == "expanded":
        big = [d for d, n in enumerate(shape) if n > 1]
        if not big:
            return None
        strides = list(contiguous)
        strides[big[0]] = 0
        keeps = False
    elif layout == "broadcast":
        if values.numel() == 1:
            return None
        strides = [0] * len(shape)
        keeps = False
    elif layout == "overlapping":
        if len([n for n in shape if n > 1]) < 2:
            return None
        strides = [1] * len(shape)
        keeps = False
    else:
        raise ValueError(layout)
    extent = 1 + sum(s * (n - 1) for s, n in zip(strides, shape, strict=True))
    item = values.element_size()
    nbytes = extent * item
    pages = -(-nbytes // PAGE)
    region = mmap.mmap(-1, (pages + 2) * PAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    base = whole.data_ptr()
    for at in (base, base + (pages + 1) * PAGE):
        if _libc.mprotect(ctypes.c_void_p(at), PAGE, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
    offset = PAGE if placement == "start" else (pages + 1) * PAGE - nbytes
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset).view(values.dtype)
    view = flat.as_strided(shape, strides, 0)
    if keeps:
        view.copy_(values)
    else:
        source = values.reshape(-1)
        flat.copy_(source[torch.arange(extent) % source.numel()])
    return view


# ---- the calls ----


@dataclass
class Call:
    name: str  # "aten::add.Tensor"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    source: str  # "traced" or "derived from <sibling>"


def _copy(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


class _Recorder(TorchDispatchMode):
    """Keeps up to `per_op` calls of each allowlisted overload, its tensors copied before the call runs."""

    def __init__(self, allowed: set[str], found: dict[str, list[Call]], per_op: int) -> None:
        super().__init__()
        self.allowed, self.found, self.per_op = allowed, found, per_op

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = f"{func._schema.name}.{func._overloadname or 'default'}"
        have = self.found.setdefault(name, []) if name in self.allowed else None
        if have is not None and len(have) < self.per_op:
            flat, _ = tree_flatten((args, kwargs))
            ok = all(t.device.type == "cpu" and t.layout == torch.strided for t in flat if isinstance(t, torch.Tensor))
            if ok and any(isinstance(t, torch.Tensor) for t in flat):
                have.append(Call(name, tree_map(_copy, tuple(args)), tree_map(_copy, dict(kwargs)), "traced"))
        return func(*args, **kwargs)


def _gen_allowlist() -> Any:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_allowlist
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return gen_allowlist


def traced(allowed: set[str], per_op: int, samples: int) -> dict[str, list[Call]]:
    """torch's own calls of allowlisted overloads: OpInfo's first `samples` samples of each op (forward and
    backward), the nn losses and scripts/gen_allowlist.py's models trained a step."""
    gen = _gen_allowlist()
    found: dict[str, list[Call]] = {}
    recorder = _Recorder(allowed, found, per_op)

    class Mode:  # gen_allowlist's Recorder(seen) is used as a context manager: ours, whatever `seen` is
        def __init__(self, seen: Any) -> None:
            pass

        def __enter__(self) -> None:
            recorder.__enter__()

        def __exit__(self, *exc: Any) -> None:
            recorder.__exit__(*exc)

    saved = gen.Recorder
    gen.Recorder = Mode
    try:
        # two of the five optimizers (the fused Adam, a foreach SGD with momentum): the others add calls of ops
        # traced here already
        gen.model_ops(set(), [gen.OPTIMIZERS[3], gen.OPTIMIZERS[0]])
        gen.loss_ops(set())
        gen.opinfo_ops(set(), samples, inplace=True)
    finally:
        gen.Recorder = saved
    return {k: v for k, v in found.items() if v}


def _bind(op: torch._ops.OpOverload, call: Call) -> dict[str, Any] | None:
    """The call's arguments by schema name (defaults left out)."""
    values: dict[str, Any] = {}
    specs = op._schema.arguments
    for i, v in enumerate(call.args):
        if i >= len(specs):
            return None
        values[specs[i].name] = v
    values.update(call.kwargs)
    return values


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.reshape(-1)[0].item() if v.numel() else 1
    return v


def _derive(op: torch._ops.OpOverload, given: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Arguments for `op` from a sibling's (by name); out= arguments are filled in later (`_with_outs`)."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for spec in op._schema.arguments:
        if spec.is_out:
            continue
        if spec.name in given:
            v = given[spec.name]
            if str(spec.type) == "number" and isinstance(v, torch.Tensor):
                v = _scalar(v)
            elif str(spec.type) == "Tensor" and not isinstance(v, torch.Tensor) and isinstance(v, int | float | bool):
                v = torch.tensor(v)
        elif spec.has_default_value():
            continue
        elif spec.name == "other" and "self" in given:
            v = given["self"] if "Tensor" in str(spec.type) else 2
        else:
            return None
        if spec.kwarg_only:
            kwargs[spec.name] = v
        elif kwargs:
            return None
        else:
            args.append(v)
    return tuple(args), kwargs


def _with_outs(op: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """kwargs plus out= tensors of the results' shapes (from the functional sibling this op's name gives)."""
    outs = [a for a in op._schema.arguments if a.is_out]
    if not outs:
        return kwargs
    packet = getattr(torch.ops.aten, op._schema.name.removeprefix("aten::"))
    for overload in packet.overloads():
        functional = getattr(packet, overload)
        if any(a.is_out for a in functional._schema.arguments):
            continue
        try:
            result = functional(*tree_map(_copy, args), **tree_map(_copy, kwargs))
        except Exception:
            continue
        if (
            len(outs) == 1
            and isinstance(outs[0].type, torch.ListType)
            and isinstance(result, list | tuple)
            and all(isinstance(r, torch.Tensor) for r in result)
        ):
            return {**kwargs, outs[0].name: [torch.empty_like(r) for r in result]}  # the foreach ops' out=
        results = [r for r in (result if isinstance(result, tuple | list) else [result])]
        if len(results) != len(outs) or not all(isinstance(r, torch.Tensor) for r in results):
            continue
        return {**kwargs, **{a.name: torch.empty_like(r) for a, r in zip(outs, results, strict=True)}}
    return None


def _runs(op: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the daemon's kernel for op (a fake GPU's fallback where torch has no CPU kernel) runs the call."""
    from gpupool.server import checks

    try:
        checks.OpPlan(op, torch.device("cpu")).run(*tree_map(_copy, args), **tree_map(_copy, kwargs))
    except Exception:
        return False
    return True


def derived(allowed: set[str], found: dict[str, list[Call]]) -> dict[str, list[Call]]:
    """Calls of allowlisted overloads no trace reached, from a traced sibling (same op or its in-place twin)."""
    from gpupool.server import ops

    made: dict[str, list[Call]] = {}
    by_base: dict[str, list[str]] = {}
    for name in found:
        by_base.setdefault(name.removeprefix("aten::").split(".")[0].rstrip("_"), []).append(name)
    for name in sorted(allowed - set(found)):
        op = ops._resolve(name)
        base = name.removeprefix("aten::").split(".")[0].rstrip("_")
        for sibling in by_base.get(base, []):
            sop = ops._resolve(sibling)
            for call in found[sibling]:
                given = _bind(sop, call)
                got = _derive(op, given) if given is not None else None
                if got is None:
                    continue
                args, kwargs = got
                full = _with_outs(op, args, kwargs)
                if full is not None and _runs(op, args, full):
                    made[name] = [Call(name, args, full, f"derived from {sibling}")]
                    break
            if name in made:
                break
    return made


def _made(spec: Any, floats: bool) -> Any:
    kind = str(spec.type)
    if kind.startswith("Optional["):
        kind = kind.removeprefix("Optional[").removesuffix("]")
    tensor = (lambda *s: torch.rand(*s) + 0.5) if floats else (lambda *s: torch.randint(0, 3, s))
    made: dict[str, Callable[[], Any]] = {
        "Tensor": lambda: tensor(3, 4),
        "List[Tensor]": lambda: [tensor(3, 4), tensor(5)],
        "List[Optional[Tensor]]": lambda: [tensor(3, 4), tensor(5)],
        "number": lambda: 2,
        "List[number]": lambda: [2, 3],
        "float": lambda: 0.5,
        "int": lambda: 1,
        "bool": lambda: False,
        "List[int]": lambda: [2],
    }
    return made[kind]() if kind in made else None


def synthesized(op: torch._ops.OpOverload) -> Call | None:
    """A call made from the schema alone (a few shapes of float, then integer tensors, lists of two tensors of two
    shapes, small numbers): what the foreach family and others no trace reaches take."""
    for floats in (True, False):
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for spec in op._schema.arguments:
            if spec.is_out:
                continue
            if spec.has_default_value():
                continue
            v = _made(spec, floats)
            if v is None and not str(spec.type).startswith("Optional"):
                break
            if spec.kwarg_only:
                kwargs[spec.name] = v
            else:
                args.append(v)
        else:
            full = _with_outs(op, tuple(args), kwargs)
            if full is not None and _runs(op, tuple(args), full):
                return Call(f"{op._schema.name}.{op._overloadname}", tuple(args), full, "made from the schema")
    return None


def _hand() -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Calls of overloads that neither a trace nor the schema reaches with valid arguments: the accelerator-only ops a
    fake GPU runs through server/fallbacks.py, the embedding bag's forward-only and dense backward, the fused
    optimizers other than Adam, GradScaler's ops."""
    r = torch.rand
    params = [r(3, 4), r(5)]

    def lists(n: int) -> list[list[torch.Tensor]]:
        return [[torch.rand_like(p) for p in params] for _ in range(n)]

    steps = [torch.tensor(1.0), torch.tensor(1.0)]
    adam = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "eps": 1e-8, "amsgrad": False,
            "maximize": False}  # fmt: skip
    bag = (r(10, 3), torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 4]))
    return {
        "aten::_thnn_fused_lstm_cell.default": ((r(3, 8), r(3, 8), r(3, 2), r(8), r(8)), {}),
        "aten::_thnn_fused_lstm_cell_backward_impl.default": (
            (r(3, 2), r(3, 2), r(3, 2), r(3, 2), r(3, 8), True),
            {},
        ),  # fmt: skip
        "aten::_thnn_fused_gru_cell.default": ((r(3, 6), r(3, 6), r(3, 2), r(6), r(6)), {}),
        "aten::_thnn_fused_gru_cell_backward.default": ((r(3, 2), r(3, 10), True), {}),
        "aten::_conv_depthwise2d.default": ((r(1, 4, 6, 6), r(4, 1, 3, 3), [3, 3], r(4), [1, 1], [1, 1], [1, 1]), {}),
        "aten::conv_depthwise3d.default": (
            (r(1, 2, 4, 4, 4), r(2, 1, 3, 3, 3), [3, 3, 3], r(2), [1, 1, 1], [1, 1, 1], [1, 1, 1]),
            {},
        ),  # fmt: skip
        "aten::_masked_scale.default": ((r(3, 4), r(3, 4) > 0.5, 2.0), {}),
        "aten::_fused_dropout.default": ((r(3, 4), 0.5), {}),
        "aten::_embedding_bag_forward_only.default": (bag, {}),
        "aten::_embedding_bag_dense_backward.default": (
            (
                r(2, 3),
                bag[1],
                torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
                torch.tensor([4, 4]),
                torch.zeros(2, 3, dtype=torch.long),
                10,
                False,
                0,
                None,
            ),
            {},
        ),  # fmt: skip
        "aten::_fused_adamw_.default": ((params, *lists(3), [], steps), adam),
        "aten::_fused_adagrad_.default": (
            (params, *lists(2), steps),
            {"lr": 0.1, "lr_decay": 0.0, "weight_decay": 0.0, "eps": 1e-10, "maximize": False},
        ),  # fmt: skip
        "aten::_fused_sgd_.tensor_lr": (
            (params, *lists(2)),
            {
                "weight_decay": 0.0,
                "momentum": 0.9,
                "lr": torch.tensor(0.1),
                "dampening": 0.0,
                "nesterov": False,
                "maximize": False,
                "is_first_step": False,
            },
        ),  # fmt: skip
        "aten::_amp_foreach_non_finite_check_and_unscale_.default": ((lists(1)[0], torch.zeros(1), torch.ones(1)), {}),
        "aten::_amp_update_scale_.default": (
            (torch.ones(1), torch.zeros(1, dtype=torch.int32), torch.zeros(1), 2.0, 0.5, 100),
            {},
        ),  # fmt: skip
        "aten::_histogramdd_from_bin_tensors.default": ((r(5, 2), [torch.linspace(0, 1, 4)] * 2), {}),
        "aten::adaptive_avg_pool2d.default": ((r(1, 2, 5, 5), [2, 2]), {}),
        "aten::adaptive_avg_pool3d.default": ((r(1, 2, 5, 5, 5), [2, 2, 2]), {}),
        "aten::upsample_bilinear2d.vec": ((r(1, 2, 4, 4), [8, 8], False, None), {}),
        "aten::upsample_bicubic2d.vec": ((r(1, 2, 4, 4), [8, 8], False, None), {}),
        "aten::upsample_trilinear3d.vec": ((r(1, 2, 4, 4, 4), [8, 8, 8], False, None), {}),
        "aten::upsample_linear1d.vec": ((r(1, 2, 4), [8], False, None), {}),
        "aten::upsample_nearest1d.vec": ((r(1, 2, 4), [8], None), {}),
        "aten::_upsample_nearest_exact1d.vec": ((r(1, 2, 4), [8], None), {}),
        "aten::_upsample_bilinear2d_aa.vec": ((r(1, 2, 4, 4), [8, 8], False, None), {}),
        "aten::var.dim": ((r(3, 4), [1]), {}),
        "aten::std.dim": ((r(3, 4), [1]), {}),
        "aten::var_mean.dim": ((r(3, 4), [1]), {}),
        "aten::std_mean.dim": ((r(3, 4), [1]), {}),
        "aten::repeat_interleave.self_Tensor": ((r(3, 4), torch.tensor([1, 2, 3]), 0), {}),
        "aten::repeat_interleave.Tensor": ((torch.tensor([1, 2, 3]),), {}),
        "aten::count_nonzero.dim_IntList": ((r(3, 4) > 0.5, [1]), {}),
        "aten::scatter.reduce": ((r(3, 4), 1, torch.tensor([[0, 1], [2, 3], [1, 1]]), r(3, 2), "add"), {}),
        "aten::scatter.value_reduce": ((r(3, 4), 1, torch.tensor([[0, 1], [2, 3], [1, 1]]), 2.0, "add"), {}),
        "aten::nll_loss2d_forward.default": (
            (r(2, 3, 4, 4).log_softmax(1), torch.randint(0, 3, (2, 4, 4)), None, 1, -100),
            {},
        ),  # fmt: skip
        "aten::histogram.bins_tensor": ((r(10), torch.linspace(0, 1, 5)), {}),
        "aten::mm.dtype": ((r(3, 4).half(), r(4, 2).half(), torch.float32), {}),
        "aten::bmm.dtype": ((r(2, 3, 4).half(), r(2, 4, 2).half(), torch.float32), {}),
        "aten::addmm.dtype": ((r(3, 2), r(3, 4).half(), r(4, 2).half(), torch.float32), {}),
        "aten::baddbmm.dtype": ((r(2, 3, 2), r(2, 3, 4).half(), r(2, 4, 2).half(), torch.float32), {}),
        "aten::_ctc_loss.Tensor": (
            (r(6, 2, 4).log_softmax(2), torch.tensor([[1, 2], [1, 1]]), torch.tensor([6, 6]), torch.tensor([2, 2])),
            {},
        ),  # fmt: skip
    }


def handmade(allowed: set[str], found: dict[str, list[Call]]) -> dict[str, list[Call]]:
    """`_hand`'s calls (and their out= forms) of allowlisted overloads not found already, where they run."""
    from gpupool.server import ops

    made: dict[str, list[Call]] = {}
    for name, (args, kwargs) in _hand().items():
        if name not in allowed or name in found:
            continue
        op = ops._resolve(name)
        if _runs(op, args, kwargs):
            made[name] = [Call(name, args, kwargs, "made by hand")]
    for name in sorted(allowed - set(found) - set(made)):  # out= forms of the hand-made calls
        base = name.rsplit(".", 1)[0]
        for sibling in [n for n in made if n.rsplit(".", 1)[0] == base]:
            op, call = ops._resolve(name), made[sibling][0]
            given = _bind(ops._resolve(sibling), call)
            got = _derive(op, given) if given is not None else None
            full = _with_outs(op, *got) if got is not None else None
            if got is not None and full is not None and _runs(op, got[0], full):
                made[name] = [Call(name, got[0], full, f"derived from {sibling}")]
                break
    return made


def calls(per_op: int = 2, samples: int = 3) -> dict[str, list[Call]]:
    """Valid calls of the allowlisted overloads that take tensors: traced, then derived."""
    from gpupool.server import ops

    allowed = set(ops.load_allowlist())
    found = traced(allowed, per_op, samples)
    found.update(handmade(allowed, found))
    found.update(derived(allowed, found))
    for name in sorted(allowed - set(found)):
        call = synthesized(ops._resolve(name))
        if call is not None:
            found[name] = [call]
    return found


# ---- the sweep ----


@dataclass(frozen=True)
class Case:
    name: str
    call: int  # index into the overload's calls
    layout: str
    placement: str
    only: int | None = None  # guard only this tensor argument (flat index); None: all of them


@dataclass
class Result:
    ran: int = 0
    refused: int = 0  # by the daemon's guards
    failed: int = 0  # torch raised (e.g. a layout the kernel rejects)
    faults: dict[Case, str] = field(default_factory=dict)  # case -> signal name


def _tensor_slots(call: Call) -> list[torch.Tensor]:
    flat, _ = tree_flatten((call.args, call.kwargs))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _placed(call: Call, case: Case) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The call with its tensors (or the one `case.only` names) in guarded memory, in the case's layout; the tensors
    it writes contiguous (guarded too): their layouts are `guards.check_written`'s (tests/integration/
    test_daemon_written_overlap.py), and its refusal would hide the reads of the others. None if no tensor changed."""
    written = _written_slots(call)
    index = iter(range(1 << 30))
    changed = False

    def place(v: Any) -> Any:
        nonlocal changed
        if not isinstance(v, torch.Tensor):
            return v
        k = next(index)
        if case.only is not None and k != case.only:
            return v.clone()
        g = guarded(v, "contiguous" if k in written else case.layout, case.placement)
        if g is None:
            return v.clone()
        changed = True
        return g

    args, kwargs = tree_map(place, (call.args, call.kwargs))
    return (args, kwargs) if changed else None


def _written_slots(call: Call) -> set[int]:
    """The flat indices (`_tensor_slots`' order) of the tensors the call writes (`guards.written_params`)."""
    from gpupool.server import guards, ops

    names = {name for _, name in guards.written_params(ops._resolve(call.name))}
    return {k for k, name in enumerate(argument_names(call)) if name.removesuffix("[]") in names}


def _runner(raw: bool) -> Callable[[torch._ops.OpOverload, tuple[Any, ...], dict[str, Any]], str]:
    from gpupool.server import checks, guards

    from gpupool.errors import GpupoolError

    cpu = torch.device("cpu")
    plans: dict[str, Any] = {}

    def run(op: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if raw:
            kernel: Callable[..., Any] = op
        else:
            plan = plans.get(op.name()) or plans.setdefault(op.name(), checks.OpPlan(op, cpu))
            try:
                guards.check_enums(op, list(args), kwargs)
                guards.check_written(op, list(args), kwargs)
                guards.check_reads(op, list(args), kwargs)
                guards.check_inputs(list(args), kwargs, 1 << 40)
                if plan.validate:
                    guards.validate(op, list(args), kwargs, 1 << 62)
            except GpupoolError:  # a guard's refusal (anything else it raises ends the child: a finding)
                return "refused"
            kernel = plan.run
        try:
            kernel(*args, **kwargs)
        except Exception:
            return "failed"
        return "ran"

    return run


def _child(cases: list[Case], start: int, table: dict[str, list[Call]], raw: bool, fd: int) -> None:
    from gpupool.server import ops

    run = _runner(raw)
    for i in range(start, len(cases)):
        case = cases[i]
        call = table[case.name][case.call]
        os.write(fd, struct.pack("<iB", i, 0))
        placed = _placed(call, case)
        outcome = "skipped" if placed is None else run(ops._resolve(case.name), *placed)
        os.write(fd, struct.pack("<iB", i, 1 + ("ran", "refused", "failed", "skipped").index(outcome)))
        del placed


def sweep(cases: list[Case], table: dict[str, list[Call]], raw: bool = False) -> Result:
    """Run `cases` in forked children; a child killed by a signal names the case it was in."""
    torch.set_num_threads(1)  # a forked child's OpenMP pool starts clean
    result = Result()
    start = 0
    while start < len(cases):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            code = 0
            try:
                _child(cases, start, table, raw, w)
            except BaseException:
                code = 3
            os._exit(code)
        os.close(w)
        current = None
        buf = b""
        with os.fdopen(r, "rb") as pipe:
            while chunk := pipe.read1(4096):
                buf += chunk
                while len(buf) >= 5:
                    i, what = struct.unpack("<iB", buf[:5])
                    buf = buf[5:]
                    if what == 0:
                        current = i
                        continue
                    current = None
                    outcome = ("ran", "refused", "failed", "skipped")[what - 1]
                    if outcome == "ran":
                        result.ran += 1
                    elif outcome == "refused":
                        result.refused += 1
                    elif outcome == "failed":
                        result.failed += 1
                    start = i + 1
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and current is not None:
            result.faults[cases[current]] = signal.Signals(os.WTERMSIG(status)).name
            start = current + 1
        elif current is not None:  # died otherwise (exit code) mid-case
            result.faults[cases[current]] = f"exit {os.WEXITSTATUS(status)}"
            start = current + 1
        elif start < len(cases) and os.WEXITSTATUS(status) != 0:
            raise RuntimeError(f"sweep child exited {status} between cases")
    return result


def all_cases(table: dict[str, list[Call]]) -> list[Case]:
    return [
        Case(name, k, layout, placement)
        for name in sorted(table)
        for k in range(len(table[name]))
        for layout in LAYOUTS
        for placement in PLACEMENTS
    ]


def culprits(faults: dict[Case, str], table: dict[str, list[Call]], raw: bool = False) -> dict[Case, str]:
    """For each faulting case, the same case with one tensor argument guarded at a time: the ones that fault alone."""
    single = [
        Case(c.name, c.call, c.layout, c.placement, k)
        for c in faults
        for k in range(len(_tensor_slots(table[c.name][c.call])))
    ]
    return sweep(single, table, raw).faults if single else {}


def argument_names(call: Call) -> list[str]:
    """The schema name of each tensor slot (flat order of `_tensor_slots`)."""
    from gpupool.server import ops

    specs = ops._resolve(call.name)._schema.arguments
    names: list[str] = []
    for i, v in enumerate(call.args):
        names += [f"{specs[i].name}" + ("[]" if isinstance(v, list | tuple) else "")] * len(
            [t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
        )
    for k, v in call.kwargs.items():
        names += [k] * len([t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)])
    return names


def _same(a: Case, b: Case) -> bool:
    return (a.name, a.call, a.layout, a.placement) == (b.name, b.call, b.layout, b.placement)


def _faults(result: Result, table: dict[str, list[Call]], raw: bool) -> list[dict[str, Any]]:
    """Each faulting case with the arguments that fault alone (`culprits`)."""
    alone = culprits(result.faults, table, raw)
    found = []
    for case, sig in sorted(result.faults.items(), key=lambda kv: str(kv[0])):
        names = argument_names(table[case.name][case.call])
        who = sorted({names[c.only] for c in alone if c.only is not None and _same(c, case)})
        found.append({"op": case.name, "source": table[case.name][case.call].source, "layout": case.layout,
                      "placement": case.placement, "signal": sig, "arguments": who})  # fmt: skip
    return found


def detector(table: dict[str, list[Call]]) -> dict[str, Any]:
    """Each argument `guards.READ_DENSE` names, alone in guarded memory in the overlapping layouts at a storage's end:
    which (op, argument) pairs fault with torch's own kernels, and whether any case faults with the daemon's."""
    from gpupool.server import guards, ops

    cases, by = [], {}
    for name, made in table.items():
        op = ops._resolve(name)
        wanted = {n for _, n in guards.read_params(op)}
        for k, call in enumerate(made):
            for slot, arg in enumerate(argument_names(call)):
                if arg in wanted:
                    for layout in ("expanded", "broadcast", "overlapping"):
                        case = Case(name, k, layout, "end", slot)
                        cases.append(case)
                        by[case] = [op._schema.name, arg]
    raw = sweep(cases, table, raw=True)
    checked = sweep(cases, table)
    return {"cases": len(cases), "ops": sorted({n for n, _ in by.values()}),
            "raw_faults": sorted({tuple(by[c]) for c in raw.faults}), "raw_fault_cases": len(raw.faults),
            "checked_faults": len(checked.faults), "checked_refused": checked.refused}  # fmt: skip


def report(full: bool, raw: bool = False, only: str | None = None) -> dict[str, Any]:
    """The sweep (CI size, or `full`: three calls per overload from four OpInfo samples each), as JSON-able data."""
    table = calls(3, 4) if full else calls(1, 1)
    if only:
        table = {k: v for k, v in table.items() if only in k}
    cases = all_cases(table)
    result = sweep(cases, table, raw)
    return {
        "overloads": len(table),
        "calls": sum(map(len, table.values())),
        "sources": {
            k: sum(1 for v in table.values() if v[0].source.split(" ")[0] == k) for k in ("traced", "derived", "made")
        },  # fmt: skip
        "cases": len(cases),
        "ran": result.ran,
        "refused": result.refused,
        "failed": result.failed,
        "faults": _faults(result, table, raw),
        "detector": detector(table) if not only else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="three calls per overload from four OpInfo samples each")
    parser.add_argument("--raw", action="store_true", help="torch's kernels, no daemon guard or replacement")
    parser.add_argument("--only", help="overloads whose name contains this")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (the test reads it)")
    opts = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.simplefilter("ignore")  # OpInfo's samples warn of deprecated ops
    found = report(opts.full, opts.raw, opts.only)
    if opts.json:
        print(json.dumps(found))
        return 0
    print(f"{found['overloads']} overloads ({found['sources']}), {found['calls']} calls, {found['cases']} cases: "
          f"ran {found['ran']}, refused {found['refused']}, failed {found['failed']}, "
          f"faults {len(found['faults'])}")  # fmt: skip
    for f in found["faults"]:
        print(f"FAULT {f['signal']}: {f['op']} ({f['source']}) {f['layout']}/{f['placement']}: {f['arguments']}")
    if found["detector"]:
        print("detector:", json.dumps(found["detector"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
