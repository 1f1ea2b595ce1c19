"""How long one tenant's eager op over a long tensor list holds another tenant's downloads on the same device, this
tree against another checkout (round 42, hostile42: such a list was sized for the quota by its meta kernel, torch's
Python entry by entry; now by its entries' layouts, server/sizing.py).

For each daemon and op: tenant A calls the op on a list naming one zero-element tensor `--entries` times and syncs;
tenant B, on the same fake GPU, downloads 4 KiB in a loop until A's sync returns. Printed per daemon and op: A's
call time and B's median and longest download wait. `--graph` (round 43, hostile43): A defines a graph of that one
op instead and runs it twice (the first run replays it, the second traces it: two dry runs on meta tensors besides
the definition's); A's time is the definition and both runs.

    nice -n 5 .venv/bin/python bench/list_op_stall.py --against /work/wt/base \\
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_wire import downloads_while, print_table, this_and_other  # noqa: E402

OPS = ("aten::block_diag.default", "aten::_foreach_neg.default", "aten::stack.default", "aten::cat.default")


def stall(address: str, key: bytes, entries: int, name: str, graph: bool = False) -> dict[str, float]:
    import torch
    from gpupool.client.session import Handle, Session

    from gpupool import tokens, wire
    from gpupool._proto import device_pb2, tensor_pb2

    def token(who: str) -> str:
        claims = tokens.TokenClaims(f"{name}-{who}", "bench", 0, 1 << 30, 1.0, time.time() + 3600, who)
        return tokens.mint(key, claims)

    out: dict[str, float] = {}
    with Session.attach(address, token("caller")) as a, Session.attach(address, token("other")) as b:
        h = b.upload(torch.arange(1024.0))
        b.download(h)
        x = Handle(a.upload(torch.ones(0)))
        a.sync()
        for op in OPS:
            took = [0.0]

            def call(op: str = op, took: list[float] = took) -> None:
                t0 = time.perf_counter()
                if graph:
                    many = tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=[1] * entries))
                    a.define_graph(
                        device_pb2.DefineGraph(
                            graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(0))], outputs=[2],
                            ops=[device_pb2.Op(name=op, args=[many], outputs=[2])],
                        )
                    )  # fmt: skip
                    got = [a.new_handle() for _ in range(2)]
                    for out in got:
                        a.run_graph(1, [int(x)], [out])
                else:
                    got = a.call(op, [x] * entries, outputs=entries if "foreach" in op else 1)
                a.sync()
                a.free(got)
                took[0] = time.perf_counter() - t0

            waits = downloads_while(call, b, h)
            short = op.split("::")[1].split(".")[0]
            out[f"{short}_s"] = took[0]
            out[f"{short}_median_ms"] = statistics.median(waits) * 1e3
            out[f"{short}_max_ms"] = max(waits) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=16_384, help="list entries (at most 65,536)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--isolation", default="process", choices=["process", "thread"])
    parser.add_argument("--graph", action="store_true", help="a graph of the op, defined and run twice (round 43)")
    parser.add_argument("--against", metavar="DIR", required=True, help="the other checkout (its daemon)")
    parser.add_argument("--against-python", default=sys.executable, help="the python that imports DIR's gpupool")
    args = parser.parse_args()
    medians = this_and_other(
        args,
        ("--isolation", args.isolation),
        lambda address, key, name: stall(address, key, args.entries, name, args.graph),
    )
    what = "graphs (defined, run twice)" if args.graph else "eager calls"
    print(f"{what}: lists of {args.entries} entries, {args.repeat} run(s) each; medians over runs")
    columns = []
    for op in OPS:
        short = op.split("::")[1].split(".")[0]
        columns += [(f"{short} s", f"{short}_s", ".2f"), ("B max ms", f"{short}_max_ms", ".0f")]
    print_table(medians, columns)


if __name__ == "__main__":
    main()
