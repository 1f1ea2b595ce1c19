"""Bytes the fused attention ops take besides their outputs: what the daemon admits against the session's quota
(server/cost.py `temporary`, server/attention.py) beside what the call really takes (its process's peak resident
memory over the inputs', ru_maxrss), this checkout against another, side by side in one run.

Each case runs in a fresh process per side (that checkout's python and gpupool), one thread, on the CPU (fake GPUs'
path): the CPU flash kernel with a one-element bool mask expanded to the scores' shape, with a key and value of one
row expanded, with no mask, with a head size of 2^14 over 32 rows (the kernel's own per-thread blocks); the math
composition (value head size 4, query's 8) forward and backward; the dropout composition (dropout_p 0.1) forward and
backward ("-" where a checkout refuses the call: before round 23), and both in float64 (8-byte scores: round 24);
"wide heads": L = S = 128 and a head size of 2^14 (the math backward's value 2^13), where a composition's copies of
its inputs outweigh its scores (round 25); "flash ... 64 x 16384": 64 queries over 16,384 keys of head size 128 (64
for float32), the forward's packed key and value (bfloat16 on an AMX-BF16 CPU) and the backward's copies of its inputs
(round 26). "took": the peak's growth less the outputs' bytes (admitted apart): the process's resident memory
(ru_maxrss, glibc's heap and the kernel's code pages with it: the math forward's 2048 x 2048 reads 56-88 MiB run to
run) and "allocated": the peak of the tensors' allocator (torch's profiler, the bytes a quota models).

    python bench/attention_temporaries.py --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
    python bench/attention_temporaries.py --sweep --against ...   # every class of call over 1,620 shapes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = (
    "flash, expanded bool mask",
    "flash, expanded key/value",
    "flash, no mask",
    "flash, head size 2^14",
    "math forward",
    "math backward",
    "dropout forward",
    "dropout backward",
    "dropout forward, float64",
    "dropout backward, float64",
    "dropout forward, wide heads",
    "dropout backward, wide heads",
    "dropout forward, wide heads, bfloat16",
    "dropout backward, wide heads, bfloat16",
    "dropout backward, wide heads, float64",
    "math backward, wide heads",
    "flash forward 64 x 16384, bfloat16",
    "flash backward 64 x 16384, bfloat16",
    "flash backward 64 x 16384",
)

# The allocator's peak over a call (the profiler's memory events in order) less its outputs: a call of its own.
PEAK = """
import torch


def peak(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        got = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = top = 0
    for e in events:
        now += e.nbytes()
        top = max(top, now)
    got = got if isinstance(got, (tuple, list)) else [got]
    return top - sum(t.numel() * t.element_size() for t in got if isinstance(t, torch.Tensor))
"""

CHILD = (
    PEAK
    + """
import gc, json, resource, sys
import torch
from gpupool.server import attention as A, cost
torch.set_num_threads(1)
case = sys.argv[1]
wide = "wide heads" in case  # few scores, a head size of 2^14: what a composition takes per element (round 25)
L = S = 128 if wide else 2048
head = 1 << 14 if wide else 8
g = torch.Generator().manual_seed(0)
dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(case.rsplit(", ", 1)[-1], torch.float32)
q, k, v = (torch.randn(1, 1, n, head, generator=g, dtype=dtype) for n in (L, S, S))
bias = None
if case == "flash, expanded bool mask":
    bias = torch.ones(1, 1, 1, 1, dtype=torch.bool).expand(1, 1, L, S)
elif case == "flash, expanded key/value":
    q = q[:, :, :16]
    k = v = torch.randn(1, 1, 1, 8, generator=g).expand(1, 1, 1 << 18, 8)
elif case == "flash, head size 2^14":  # 32 query rows, one key: the kernel's output block is the query's size
    q, k, v = (torch.randn(1, 1, n, 1 << 14, generator=g) for n in (32, 1, 1))
elif case.startswith("math"):
    v = torch.randn(1, 1, S, head // 2, generator=g)
elif "64 x 16384" in case:  # few queries over many keys: the packed key and value, the backward's copies
    q, k, v = (torch.randn(1, 1, n, 128 if dtype == torch.bfloat16 else 64, generator=g, dtype=dtype)
               for n in (64, 16384, 16384))
    L, S = 64, 16384
fwd = torch.ops.aten._scaled_dot_product_fused_attention_overrideable.default
bwd = torch.ops.aten._scaled_dot_product_fused_attention_overrideable_backward.default
p = 0.1 if case.startswith("dropout") else 0.0
if "backward" in case:
    e = v.shape[-1]
    out, lse = torch.randn(1, 1, L, e, generator=g, dtype=dtype), torch.randn(1, 1, L, generator=g)
    seed = torch.get_rng_state().view(torch.int64)[0]  # a forward's philox_seed: the generator state it drew from
    args = [torch.randn_like(out), q, k, v, bias, [True, True, True, False], out, lse, None, None, L, S, p, False,
            seed, torch.zeros((), dtype=torch.long)]
    op, run = bwd, A.fused_attention_backward
else:
    args = [q, k, v, bias, p]
    op, run = fwd, A.fused_attention
admitted = cost.temporary(op, args, {})
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    got = run(*args)
except Exception:  # a checkout that refuses the call (dropout before round 23)
    print(json.dumps({"admitted": -1, "took": -1, "allocated": -1}))
    sys.exit(0)
high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
got = got if isinstance(got, (tuple, list)) else [got]
outs = sum(t.numel() * t.element_size() for t in got if isinstance(t, torch.Tensor))  # counted apart from temporaries
took = (high - before) * 1024 - outs
print(json.dumps({"admitted": admitted, "took": took, "allocated": peak(lambda: run(*args))}))
"""
)


# --sweep: every kernel and mask kind over many shapes (L, S, head sizes, dtypes), forward, backward and expanded
# key/value; per class (call, kernel, mask, dtype) the largest excess of the allocator's peak over the admission
# (bytes; <= 0: admitted) and the largest ratio among calls taking more than 1 MiB.
SWEEP = (
    PEAK
    + """
import itertools, json, sys
import torch
from gpupool.server import attention as A, cost
torch.set_num_threads(1)



fwd = torch.ops.aten._scaled_dot_product_fused_attention_overrideable.default
bwd = torch.ops.aten._scaled_dot_product_fused_attention_overrideable_backward.default
g = torch.Generator().manual_seed(0)
worst = {}
for L, S, dt, mask, kind, hq, hv in itertools.product(
    (64, 512, 1024), (64, 1024), (torch.float32, torch.float64, torch.bfloat16),
    ("none", "bool", "float", "boolrow", "causal"), ("forward", "expanded k/v", "backward"), (8, 64), (4, 8, 64)
):
    q = torch.randn(1, 2, L, hq, generator=g, dtype=dt)
    k = torch.randn(1, 2, S, hq, generator=g, dtype=dt)
    v = torch.randn(1, 2, S, hv, generator=g, dtype=dt)
    if kind == "expanded k/v":
        k = torch.randn(1, 2, 1, hq, generator=g, dtype=dt).expand(1, 2, S, hq)
        v = k
    bias, causal = None, mask == "causal"
    if mask == "bool":
        bias = torch.rand(1, 2, L, S, generator=g) > 0.3
    elif mask == "float":
        bias = torch.randn(1, 2, L, S, generator=g, dtype=dt)
    elif mask == "boolrow":
        bias = (torch.rand(1, 1, 1, S, generator=g) > 0.3).expand(1, 2, L, S)
    try:
        if kind == "backward":
            o = A.fused_attention(q, k, v, bias, 0.0, causal)
            want_bias = mask == "float"
            args = [torch.randn_like(o[0]), q, k, v, bias, [True, True, True, want_bias], o[0], o[1], None,
                    None, L, S, 0.0, causal, o[6], o[7]]
            admitted, took = cost.temporary(bwd, args, {}), peak(lambda: A.fused_attention_backward(*args))
        else:
            args = [q, k, v, bias, 0.0, causal]
            admitted, took = cost.temporary(fwd, args, {}), peak(lambda: A.fused_attention(*args))
    except Exception:
        continue
    math_path = A._uses_math(q, k, None if kind == "backward" and mask == "float" else v, bias, q.device)
    key = f"{kind}, {'math' if math_path else 'flash'}, {mask}, {str(dt)[6:]}"
    w = worst.setdefault(key, [-(1 << 62), 0.0])
    w[0] = max(w[0], took - admitted)
    if took > (1 << 20):
        w[1] = max(w[1], took / max(admitted, 1))
print(json.dumps(worst))
"""
)


def _sweep(python: str, tree: Path) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([python, "-c", SWEEP], cwd=tree, env=env, capture_output=True, text=True, timeout=1800,
                          check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _side(python: str, tree: Path, case: str) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([python, "-c", CHILD, case], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=600, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", type=Path, required=True, help="the other checkout")
    p.add_argument("--against-python", default=sys.executable, help="its python (its venv's)")
    p.add_argument("--sweep", action="store_true", help="every kernel and mask kind over many shapes, per class")
    a = p.parse_args()
    mib = 1024 * 1024
    if a.sweep:
        mine, other = _sweep(sys.executable, ROOT), _sweep(a.against_python, a.against.resolve())
        head = ("class (allocated - admitted: worst)", "bytes", "ratio>1MiB", "(against)", "ratio")
        print(f"{head[0]:44} {head[1]:>10} {head[2]:>10} {head[3]:>10} {head[4]:>6}")
        for key in sorted(mine):
            o, t = mine[key], other.get(key, [0, 0.0])
            print(f"{key:44} {o[0]:10.0f} {o[1]:10.2f} {t[0]:10.0f} {t[1]:6.2f}")
        print(f"load average {os.getloadavg()[0]:.2f}")
        return
    print(f"{'case':40} {'took MiB':>9} {'allocated':>9} {'admitted MiB':>13} {'took (against)':>15} "
          f"{'allocated':>9} {'admitted (against)':>19}")  # fmt: skip

    def mb(n: int, width: int) -> str:
        return f"{n / mib:{width}.1f}" if n >= 0 else f"{'-':>{width}}"

    for case in CASES:
        ours, theirs = _side(sys.executable, ROOT, case), _side(a.against_python, a.against.resolve(), case)
        print(f"{case:40} {mb(ours['took'], 9)} {mb(ours['allocated'], 9)} {mb(ours['admitted'], 13)} "
              f"{mb(theirs['took'], 15)} {mb(theirs['allocated'], 9)} {mb(theirs['admitted'], 19)}")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
