"""Client CPU per eager op, without the network: the shim against the floor of any Python tensor subclass.

`launch_bound.py`'s "client us/op" column counts everything the client process does per op: torch's
autograd and dispatcher, the shim's Python (dispatch, cache key, record, wrapper) and gRPC's threads. This
benchmark takes the network away to see what the shim itself costs, and what torch costs any Python device.
Three ways of running one training step (Adam, foreach), interleaved in one process, one torch thread:

- `local`: plain CPU tensors (autograd, dispatcher and the kernels; the issue's stand-in for local CUDA);
- `floor`: a wrapper subclass on the same `gpupool` device whose `__torch_dispatch__` only looks its output
  metadata up in a dict and makes wrappers (no handles, no records, no checks): what torch charges any pure
  Python device per op (its Python dispatch entry and argument boxing, wrapper creation, the Python device
  guard, autograd). Going below it needs a C++ PrivateUse1 backend;
- `shim`: gpupool's own device over a session that drops what it is sent (no gRPC, no daemon).

Columns: CPU microseconds per aten op the shim sends (the same op count for all three), best and median of the
rounds. On a shared box compare the three within one run.

    nice python bench/client_overhead.py --models tiny-mlp,encoder

CPU time on a loaded box varies 30-50% between runs; instructions do not. `--callgrind` runs one way only and
switches valgrind's instrumentation on just around its timed steps, so instructions per op come out exact:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=cg.out \
        python bench/client_overhead.py --callgrind shim --models tiny-mlp --steps 5
    grep ^totals: cg.out      # instructions; divide by the "ops" the script prints
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cgtools  # noqa: E402
from gpupool.client.torch import runtime  # noqa: E402
from launch_bound import workload  # noqa: E402

import gpupool.torch as gt  # noqa: E402,F401 - registers the gpupool device

DEVICE = torch.device("gpupool", 0)


class NullSession:
    """A session that accepts every command and sends nothing (handles as a real session hands them out)."""

    quota_bytes = 0
    device = None
    handle_base = 1 << 32

    def __init__(self) -> None:
        self._handles = itertools.count(1)

    def new_handle(self) -> int:
        return self.handle_base + next(self._handles)

    def eager_op(self, record: bytes) -> None: ...
    def op(self, *args: Any) -> None: ...
    def upload(self, tensor: Any, handle: int) -> None: ...
    def free(self, handles: Any) -> None: ...
    def seed(self, seed: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...

    def sync(self, handles: Any) -> list[float]:
        return [0.5 for _ in handles]


class Floor(torch.Tensor):
    """The cheapest wrapper subclass that can train: outputs from a metadata cache, nothing else."""

    _fk: tuple[Any, ...]
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]
    _cache: dict[Any, Any] = {}

    @staticmethod
    def make(shape: Any, stride: Any, dtype: torch.dtype) -> Floor:
        t = torch.Tensor._make_wrapper_subclass(Floor, shape, strides=stride, dtype=dtype, device=DEVICE)
        t._fk = (tuple(shape), tuple(stride), dtype)
        return t  # type: ignore[no-any-return]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        kwargs = kwargs or {}
        key = (func, *[_key(a) for a in args], *[(k, _key(v)) for k, v in kwargs.items()])
        hit = Floor._cache.get(key)
        if hit is None:
            hit = Floor._cache[key] = _infer(func, args, kwargs)
        plan, spec = hit
        out = [args[p] if type(p) is int else (None if p is None else Floor.make(*p)) for p in plan]
        return out[0] if spec is None else tree_unflatten(out, spec)


def _key(a: Any) -> Any:
    if type(a) is Floor or type(a) is torch.nn.Parameter:
        return a._fk  # type: ignore[union-attr]
    if isinstance(a, list | tuple):
        return tuple(_key(x) for x in a)
    if isinstance(a, float):
        return float  # Adam's changing step sizes: type promotion only, as the shim keys them
    return a


def _infer(func: Any, args: Any, kwargs: Any) -> tuple[list[Any], Any]:
    def to_meta(a: Any) -> Any:
        if isinstance(a, Floor):
            return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
        if isinstance(a, torch.device):
            return torch.device("meta")
        return a

    margs = tree_map(to_meta, args)
    out = func(*margs, **tree_map(to_meta, kwargs))
    written = {id(m): i for i, m in enumerate(margs) if isinstance(m, torch.Tensor)}
    leaves, spec = tree_flatten(out)
    plan: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            i = written.get(id(leaf))  # an in-place op returns its argument
            plan.append(i if i is not None else (tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype))
        else:
            plan.append(None)
    return plan, (None if isinstance(out, torch.Tensor) else spec)


def _floor_like(t: torch.Tensor) -> Floor:
    return Floor.make(t.shape, t.stride(), t.dtype)


def setup(model_name: str, how: str) -> tuple[Any, Any]:
    """(step function, counter of ops the shim sends) for one way of running."""
    model, data, loss_fn = workload(model_name)
    batches: list[Any]
    if how == "floor":
        for mod in model.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, name, torch.nn.Parameter(_floor_like(p.detach())))
        batches = [(_floor_like(x), _floor_like(y)) for x, y in data]
    elif how == "shim":
        rt = runtime.get(0)
        if rt is None:
            rt = runtime.DeviceRuntime(0, NullSession())
            runtime.add(rt)
        model = model.to(DEVICE)
        batches = data  # uploaded in the step, as launch_bound does
    else:
        batches = data
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    dev = DEVICE if how == "shim" else None

    def step(i: int) -> None:
        x, y = batches[i % 4]
        if dev is not None:
            x, y = x.to(dev), y.to(dev)  # type: ignore[assignment]
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return step, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mlp,encoder", help="comma-separated: tiny-mlp,encoder,classifier")
    p.add_argument("--steps", type=int, default=20, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=7, help="interleaved measurements of each way")
    p.add_argument("--callgrind", choices=("local", "floor", "shim"), help="under callgrind: count one way's steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.callgrind:
        return callgrind(args.models.split(",")[0], args.callgrind, args.steps)
    print(f"{'model':>10} {'way':>6} {'us/op best':>11} {'median':>8} {'ratio to local':>15}")
    for name in args.models.split(","):
        steps = {how: setup(name, how)[0] for how in ("local", "floor", "shim")}
        rt = runtime.get(0)
        assert rt is not None
        for step in steps.values():  # warm up: caches, optimizer state
            for i in range(3):
                step(i)
        before = rt.ops_sent
        steps["shim"](0)
        ops = rt.ops_sent - before  # aten ops the shim sends per step
        times: dict[str, list[float]] = {how: [] for how in steps}
        for _ in range(args.rounds):
            for how, step in steps.items():
                c0 = time.process_time()
                for i in range(args.steps):
                    step(i)
                times[how].append((time.process_time() - c0) / (args.steps * ops) * 1e6)
        local = statistics.median(times["local"])
        for how, ts in times.items():
            med = statistics.median(ts)
            print(f"{name:>10} {how:>6} {min(ts):11.1f} {med:8.1f} {med / local:15.2f}")
    return 0


def callgrind(name: str, how: str, steps: int) -> int:
    """Run `steps` steps of one way with callgrind's instrumentation on (`callgrind_control`), then print the
    aten ops the shim sends in as many steps."""
    shim = setup(name, "shim")[0]
    rt = runtime.get(0)
    assert rt is not None
    for i in range(3):
        shim(i)
    before = rt.ops_sent
    shim(0)
    ops = rt.ops_sent - before
    step = shim if how == "shim" else setup(name, how)[0]
    for i in range(3):
        step(i)
    with cgtools.instrumented():
        for i in range(steps):
            step(i)
    print(f"{name} {how}: ops {ops * steps} (divide callgrind's totals by this)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
