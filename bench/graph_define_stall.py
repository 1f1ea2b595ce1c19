"""How long one tenant's DefineGraph holds another tenant's downloads on the same device, this tree against another
checkout (round 17: a 100,000-op definition was one command on the device's turn; now it goes in pieces).

For each daemon: tenant A defines a graph of `--ops` trivial ops (aten::neg on 4 elements) and syncs; tenant B,
on the same fake GPU, downloads 4 KiB in a loop until A's sync returns. Printed per daemon: A's definition time,
B's downloads meanwhile, and B's median and longest download wait.

    nice -n 10 .venv/bin/python bench/graph_define_stall.py --against /work/wt/base \\
        --against-python /work/wt/base/.venv/bin/python

`--inputs N` defines a graph of one op and N inputs instead (round 36: their meta tensors were built before the
definition's first piece ended). `--runs N` then runs the graph N times, each timed with B's downloads meanwhile
(round 38: a graph's second run traces it to TorchScript on a fake GPU under process isolation, one command; the
first is the Python replay, the third on the traced graph's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_wire import downloads_while, print_table, this_and_other  # noqa: E402


def stall(address: str, key: bytes, ops: int, name: str, inputs: int = 0, runs: int = 0) -> dict[str, float]:
    import torch
    from gpupool.client.session import Session

    from gpupool import tokens, wire
    from gpupool._proto import device_pb2, tensor_pb2

    x = torch.ones(4)
    body = [
        device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=i + 1)], outputs=[i + 2])
        for i in range(ops)
    ]
    big = device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(x)], ops=body, outputs=[ops + 1])
    if inputs:  # one op, `inputs` inputs of 4 dimensions (round 36: their meta tensors were one piece)
        meta = wire.meta_to_proto(torch.ones(1, 1, 1, 4))
        op = device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[inputs + 1])
        big = device_pb2.DefineGraph(
            graph_id=1, inputs=inputs, input_meta=[meta] * inputs, ops=[op], outputs=[inputs + 1]
        )

    def token(who: str) -> str:
        claims = tokens.TokenClaims(f"{name}-{who}", "bench", 0, 1 << 30, 1.0, time.time() + 3600, who)
        return tokens.mint(key, claims)

    with Session.attach(address, token("definer")) as a, Session.attach(address, token("other")) as b:
        h = b.upload(torch.arange(1024.0))
        b.download(h)
        took = [0.0]

        def define() -> None:
            t0 = time.perf_counter()
            a.define_graph(big)
            a.sync()
            took[0] = time.perf_counter() - t0

        waits = downloads_while(define, b, h)
        out = {"define_s": took[0], "downloads": len(waits), "median_ms": statistics.median(waits) * 1e3,
               "max_ms": max(waits) * 1e3}  # fmt: skip
        x_h = a.upload(torch.ones(1, 1, 1, 4) if inputs else x) if runs else 0
        for k in range(1, runs + 1):

            def run() -> None:
                t0 = time.perf_counter()
                y = a.new_handle()
                a.run_graph(1, [x_h] * big.inputs, [y])
                a.sync()
                a.free([y])
                took[0] = time.perf_counter() - t0

            waits = downloads_while(run, b, h)
            out[f"run{k}_s"] = took[0]
            out[f"run{k}_max_ms"] = max(waits) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--inputs", type=int, default=0, help="instead: a graph of one op and this many inputs")
    parser.add_argument("--runs", type=int, default=0, help="then run the graph this many times, each timed")
    parser.add_argument("--isolation", default="process", choices=["process", "thread"])
    parser.add_argument("--serve-args", default="", help="more `gpupool serve` flags for both daemons")
    parser.add_argument("--against", metavar="DIR", required=True, help="the other checkout (its daemon)")
    parser.add_argument("--against-python", default=sys.executable, help="the python that imports DIR's gpupool")
    args = parser.parse_args()
    iso = ("--isolation", args.isolation, *args.serve_args.split())
    medians = this_and_other(
        args, iso, lambda address, key, name: stall(address, key, args.ops, name, args.inputs, args.runs)
    )
    what = f"1 op and {args.inputs} inputs" if args.inputs else f"{args.ops} ops"
    print(f"{what}, {args.repeat} run(s) each; medians over runs")
    print_table(
        medians,
        [("define s", "define_s", ".2f"), ("B downloads", "downloads", ".0f"), ("B median ms", "median_ms", ".1f"),
         ("B max ms", "max_ms", ".0f")]
        + [(f"run {k} {what}", f"run{k}_{key}", fmt) for k in range(1, args.runs + 1)
           for what, key, fmt in (("s", "s", ".2f"), ("B max ms", "max_ms", ".0f"))],
    )  # fmt: skip


if __name__ == "__main__":
    main()
