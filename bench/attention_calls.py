"""Instructions a call of the fused attention's eager compositions (server/attention.py), Python against C++.

The encoders' attention runs `_scaled_dot_product_fused_attention_overrideable` and its backward as compositions on
every device (no kernel of the overrideable backend on the daemon): in Python (`attention.fused_attention`,
`fused_attention_backward`, ~40 aten calls a call through torch's Python bindings) and, since round 45, for the
eager calls with dropout inside a learned run, in the native runner's C++ (native_runner.cpp `attn::run`: the same
aten ops, the same bits). This counts each alone, in-process under callgrind (its instrumentation on only around
--calls calls, one dump each): the forward that keeps its softmax and mask, and the backward from them, at the
encoder's shapes by default (batch 4, 4 heads, 16 tokens, head size 8: query, key and value as views of one packed
projection, as the encoders make them), dropout 0.1, one torch thread. `--p 0`: the calls without dropout (eval
mode, encoder-nodrop: the CPU flash kernels' path, in C++ since round 46). `python` is the Python composition's call;
`native` the C++ one's through its test binding (`attention_forward`/`attention_backward`: a pybind call's
argument conversion on top of what the runner's own call takes, which reads its arguments off its stack).
`--against DIR` counts DIR's Python composition too (its python: --against-python).

    cd bench && nice -n 5 ../.venv/bin/python attention_calls.py --against /work/wt/base \\
        --against-python /work/wt/base/.venv/bin/python        # ~3 min
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cgtools

HERE = Path(__file__).resolve().parent


def _inputs(shape: list[int], p: float) -> dict[str, object]:
    import torch

    b, h, length, e = shape
    torch.manual_seed(0)
    packed = torch.randn(b, length, 3, h, e)
    q, k, v = (t.transpose(1, 2) for t in packed.unbind(2))
    return {"q": q, "k": k, "v": v, "p": p, "grad": torch.randn(b, h, length, e)}


def child(path: str, calls: int, shape: list[int], p: float) -> None:
    """Run under callgrind: `calls` forwards, a dump, `calls` backwards, a dump."""
    import torch
    from gpupool.server import attention

    torch.set_num_threads(1)
    x = _inputs(shape, p)
    q, k, v, grad = x["q"], x["k"], x["v"], x["grad"]
    mask = [True, True, True, False]
    if path == "native":
        from gpupool.server import native_runner

        mod = native_runner.load()
        assert mod is not None and hasattr(mod, "attention_forward"), "no native runner with the attention here"

        def fwd() -> tuple:
            return mod.attention_forward(q, k, v, None, p, False, False, None)  # type: ignore[no-any-return]

        def bwd(f: tuple) -> tuple:
            return mod.attention_backward(grad, q, k, v, None, mask, f[0], f[1], p, False, f[6], None)  # type: ignore[no-any-return]
    else:

        def fwd() -> tuple:
            return attention.fused_attention(q, k, v, None, p, False, False, scale=None)

        def bwd(f: tuple) -> tuple:
            return attention.fused_attention_backward(grad, q, k, v, None, mask, f[0], f[1], None, None, f[4], f[5],
                                                      p, False, f[6], f[7], scale=None)  # fmt: skip

    made = [fwd() for _ in range(calls)]
    assert all(f is not None for f in made), "the C++ composition declined the call"
    for f in made[:3]:
        assert bwd(f) is not None
    with torch.no_grad():
        cgtools.control("--instr=on")
        for _ in range(calls):
            fwd()
        cgtools.control("--instr=off", "--dump=forward")
        cgtools.control("--instr=on")
        for f in made:
            bwd(f)
        cgtools.control("--instr=off", "--dump=backward")
    print(json.dumps({"ok": True}))


def measure(python: str, where: Path, path: str, calls: int, shape: list[int], p: float) -> dict[str, float]:
    exe = subprocess.check_output([python, "-c", "import sys; print(sys.executable)"], text=True).strip()
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "cg.out"
        cmd = [*cgtools.valgrind(out_file), exe, str(HERE / "attention_calls.py"), "--child", path, "--calls",
               str(calls), "--shape", ",".join(map(str, shape)), "--p", str(p)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=where)
        counts: dict[str, float] = {}
        for dump in Path(tmp).glob("cg.out.*"):
            text = dump.read_text()
            trigger = next(line for line in text.splitlines() if line.startswith("desc: Trigger:"))
            totals = [line for line in text.splitlines() if line.startswith(("totals:", "summary:"))]
            for what in ("forward", "backward"):
                if what in trigger:
                    counts[what] = int(totals[-1].split()[1]) / calls
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=("python", "native"), help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--shape", default="4,4,16,8", help="batch,heads,length,head size")
    parser.add_argument("--p", type=float, default=0.1, help="dropout_p")
    cgtools.add_against_flags(parser, "another checkout: its Python composition counted too", measure=False)
    a = parser.parse_args()
    shape = [int(n) for n in a.shape.split(",")]
    if a.child:
        child(a.child, a.calls, shape, a.p)
        return
    rows = [("this, python", sys.executable, HERE, "python"), ("this, native", sys.executable, HERE, "native")]
    if a.against:
        rows.insert(0, ("base, python", a.against_python, Path(a.against) / "bench", "python"))
    print(f"fused attention, eager with dropout {a.p}, shape {shape}, {a.calls} calls each: instructions a call")
    for name, python, where, path in rows:
        c = measure(python, where, path, a.calls, shape, a.p)
        print(f"{name:<14} forward {c['forward'] / 1e3:8.1f} k   backward {c['backward'] / 1e3:8.1f} k", flush=True)


if __name__ == "__main__":
    main()
