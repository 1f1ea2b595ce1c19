"""Op coverage of the gpupool device against PyTorch's own test data.

For every OpInfo of `torch.testing._internal.common_methods_invocations.op_db` that supports float32 on
the CPU, the first SAMPLES sample inputs are made on `gpupool` (a real daemon with a fake GPU), run there
and, copied, on the CPU, and the results must match (`torch.testing.assert_close`, NaNs equal; random
ops are seeded alike, and a fake GPU draws what the CPU draws). An op passes when all its samples do.

The test holds the pass count at or above PASSING; `opinfo_failures.txt` lists the ops that do not pass
yet and why. Regenerate that list with:

    GPUPOOL_OPINFO_WRITE=1 pytest tests/integration/test_shim_opinfo.py
"""

from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import shim_fixtures
import torch
from gpupool.client.torch import runtime
from torch.utils._pytree import tree_flatten, tree_map

import gpupool.torch as gt

SAMPLES = 3  # first samples per op: bounds the test to a few minutes on 2 cores
PASSING = 634  # the figure reached; the test fails if coverage drops below it
FAILURES = Path(__file__).with_name("opinfo_failures.txt")
NOT_ON_CPU = "no sample runs on the CPU"
# Why the remaining failures are expected, written next to them in opinfo_failures.txt.
NOTES = {
    "as_strided.partial_views": "test artefact: the CPU reference copies the view (its storage starts at the "
    "view) while on gpupool, as on CUDA, the view keeps its base's storage, which as_strided then addresses",
    "chalf": "complex32 is not a wire dtype (tensor.proto DType)",
    "hash_tensor": "uint64 is not a wire dtype (tensor.proto DType)",
    "sparse.mm.reduce": "sparse layouts: gpupool tensors are strided only",
    "sparse.sampled_addmm": "sparse layouts: gpupool tensors are strided only",
    "to_sparse": "sparse layouts: gpupool tensors are strided only",
}
UNINITIALIZED = {"empty", "empty_like", "empty_permuted", "empty_strided", "new_empty", "new_empty_strided"}


def _to_cpu(x: Any) -> Any:
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


def check_op(op: Any, device: torch.device) -> str | None:
    """None if every sample matches the CPU, else why not.

    Samples are made on the gpupool device, as PyTorch's own device tests make them (views of device
    tensors stay views; arguments a sample keeps on the CPU stay there), and copied to the CPU for
    the reference run.
    """
    try:
        samples = list(itertools.islice(op.sample_inputs(device, torch.float32, requires_grad=False), SAMPLES))
        gt.synchronize()
    except Exception as exc:
        _clear(device)
        return "making samples on gpupool: " + _reason(exc)
    ran = 0
    for sample in samples:
        try:
            local = sample.transform(_to_cpu)
            _seed()
            expected = tree_map(_to_cpu, op(local.input, *local.args, **local.kwargs))  # factories: device=gpupool
        except Exception:
            continue  # the sample fails on the CPU too: nothing to compare
        ran += 1
        try:
            _seed()
            out = op(sample.input, *sample.args, **sample.kwargs)
            actual = tree_map(_to_cpu, out)
            if not any(_on_gpupool(x) for x in tree_flatten(out)[0]):
                # No read-back above: sync. A read-back waits for every op before it and raises the first error
                # since the last sync, as a sync does (Session.download), so after one a sync is a round trip more.
                gt.synchronize()
        except Exception as exc:
            _clear(device)
            return _reason(exc)
        try:
            if op.name in UNINITIALIZED:  # values are whatever memory held: compare shapes and dtypes
                assert tree_map(_shape, actual) == tree_map(_shape, expected), "shapes or dtypes differ"
            else:
                torch.testing.assert_close(actual, expected, equal_nan=True)
        except Exception as exc:
            return "mismatch: " + _reason(exc)
    return None if ran else NOT_ON_CPU


def _seed() -> None:
    """torch.manual_seed(0) for the generators compared here, the CPU's and the gpupool devices' (what
    torch.manual_seed does for them), without torch's lazy CUDA/XPU/MTIA seeding: each queues the seed with a
    formatted stack trace, ~0.4 ms a call on 2 cores, two calls per sample."""
    torch.random.default_generator.manual_seed(0)
    runtime.manual_seed_all(0)


def _on_gpupool(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "gpupool"


def _shape(x: Any) -> Any:
    return (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x


def _clear(device: torch.device) -> None:
    try:
        gt.synchronize(device)
    except Exception:  # the error of the failed op itself, already reported
        pass


def float32_ops() -> list[Any]:
    from torch.testing._internal.common_methods_invocations import op_db

    return [op for op in op_db if torch.float32 in op.supported_dtypes("cpu")]


def run_coverage(device: torch.device, reattach: Any) -> tuple[int, dict[str, str]]:
    """(ops passing, {op: why not}); ops whose samples all fail on the CPU too are left out."""
    passed, failures = 0, {}
    for op in float32_ops():
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        why = check_op(op, device)
        if why is None:
            passed += 1
        elif why != NOT_ON_CPU:
            failures[name] = why
        if why is not None and "DeviceLost" in why:
            gt.detach_all()  # an op that kills the session must not fail every op after it
            device = reattach()
    return passed, failures


@pytest.mark.slow
def test_op_db_float32_coverage(attach: shim_fixtures.Attach) -> None:
    start = time.monotonic()
    # In a thread of its own: each op's sample_inputs looks for the calling unittest test by inspect.stack()
    # (torch.testing's extract_test_fn), which reads every frame's source; under pytest (and xdist) ~75 ms a call at
    # load 25, on a thread's few frames ~1.5 ms. The ops, samples and comparisons are the same.
    with ThreadPoolExecutor(1) as shallow:
        passed, failures = shallow.submit(run_coverage, attach(), attach).result()
    total = passed + len(failures)
    if os.environ.get("GPUPOOL_OPINFO_WRITE"):
        lines = [f"# op_db float32 ops that do not pass on gpupool yet: {len(failures)} of {total}", ""]
        for name, why in sorted(failures.items()):
            lines += [f"{name}: {why}"] + ([f"    why: {NOTES[name]}"] if name in NOTES else [])
        FAILURES.write_text("\n".join(lines) + "\n")
    print(f"op_db float32: {passed}/{total} ops pass in {time.monotonic() - start:.0f} s")
    assert passed >= PASSING, f"{passed} ops pass, fewer than {PASSING}; failing: {sorted(failures)}"
