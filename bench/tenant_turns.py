"""How long one tenant's work holds another tenant's round trips on the same device, this tree against another
checkout (round 45, hostile45: the front's turns seen by a neighbour).

For each daemon, tenant B (the neighbour) times its round trips (an `add` of 4 floats and a sync) while tenant A:
`first op` -- nothing (B's first round trip is the daemon's first elementwise op: under `--isolation thread` on
f47ac67 its meta kernel imported torch._dynamo on the device's thread, seconds); `graph op` -- runs a graph of one
`_foreach_norm` over a list of 16,384 entries (the longest a graph op takes: one op, one slice) `--runs` times, each
synced; `eager frames` -- sends `--frames` frames of 4,000 eager adds of one float, each synced; `graph frames` --
`--frames` frames of 4,000 RunGraphs of a one-op graph, each synced. Printed per daemon and phase: A's seconds, B's
round trips meanwhile, their median and longest.

    cd bench && nice -n 5 ../.venv/bin/python tenant_turns.py --isolation thread --against /work/wt/base \\
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_wire import print_table, this_and_other, times_while  # noqa: E402


def trips_while(action: Any, b: Any, x: Any) -> list[float]:
    """Run `action` in a thread and meanwhile time `b`'s round trips (add, sync) until it returns."""

    def trip() -> None:
        [y] = b.call("aten::add.Tensor", x, x)
        b.sync()
        b.free([y])

    return times_while(action, trip)


def turns(address: str, key: bytes, name: str, runs: int, frames: int) -> dict[str, float]:
    import torch
    from gpupool.client.session import Handle, Session

    from gpupool import tokens, wire
    from gpupool._proto import device_pb2, tensor_pb2

    def token(who: str) -> str:
        claims = tokens.TokenClaims(f"{name}-{who}", "bench", 0, 1 << 30, 1.0, time.time() + 3600, who)
        return tokens.mint(key, claims)

    out: dict[str, float] = {}
    with Session.attach(address, token("a")) as a, Session.attach(address, token("b")) as b:
        x = Handle(b.upload(torch.ones(4)))
        b.sync()
        t0 = time.perf_counter()
        [y] = b.call("aten::add.Tensor", x, x)
        b.sync()
        out["first_ms"] = (time.perf_counter() - t0) * 1e3
        b.free([y])
        one = Handle(a.upload(torch.ones(1)))
        three = Handle(a.upload(torch.full((3,), 2.0)))
        many = tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=[1] * 16_384))
        a.define_graph(device_pb2.DefineGraph(
            graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(3))], outputs=[2],
            ops=[device_pb2.Op(name="aten::_foreach_norm.Scalar", args=[many], outputs=[2])]))  # fmt: skip
        add = device_pb2.Op(name="aten::add.Tensor", args=[tensor_pb2.Arg(tensor=1)] * 2, outputs=[2])
        a.define_graph(device_pb2.DefineGraph(
            graph_id=2, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(1))], outputs=[2], ops=[add]))  # fmt: skip
        a.sync()
        run = device_pb2.RunGraph(graph_id=2, inputs=[0], outputs=[0], input_data=[torch.ones(1).numpy().tobytes()])
        body = run.SerializeToString()
        cmd = b"\xaa\x01" + bytes([len(body)]) + body
        frame = (b"\x0a" + bytes([len(cmd)]) + cmd) * 4000

        def graph_op() -> None:
            for _ in range(runs):
                got = a.new_handle()
                a.run_graph(1, [int(three)], [got])
                a.sync()
                a.free([got])

        def eager_frames() -> None:
            for _ in range(frames):
                got = [a.call("aten::add.Tensor", one, one)[0] for _ in range(4000)]
                a.sync()
                a.free(got)

        def graph_frames() -> None:
            for _ in range(frames):
                a.send_commands(frame)
                a.sync()

        for phase, action in (("graph_op", graph_op), ("eager", eager_frames), ("graph_frames", graph_frames)):
            t0 = time.perf_counter()
            waits = trips_while(action, b, x)
            out[f"{phase}_s"] = time.perf_counter() - t0
            out[f"{phase}_trips"] = len(waits)
            out[f"{phase}_median_ms"] = statistics.median(waits) * 1e3
            out[f"{phase}_max_ms"] = max(waits) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="graph op: runs of the 16,384-entry op")
    parser.add_argument("--frames", type=int, default=5, help="eager and graph frames: frames of 4,000 commands")
    parser.add_argument("--isolation", default="process", choices=["process", "thread"])
    parser.add_argument("--against", metavar="DIR", required=True, help="the other checkout (its daemon)")
    parser.add_argument("--against-python", default=sys.executable, help="the python that imports DIR's gpupool")
    args = parser.parse_args()
    args.repeat = 1  # (the first op is the daemon's first: one run a daemon)
    medians = this_and_other(
        args, ("--isolation", args.isolation), lambda address, key, name: turns(address, key, name, args.runs,
                                                                              args.frames)
    )  # fmt: skip
    print(f"--isolation {args.isolation}: B's round trips (add of 4 floats, sync) while A works")
    columns = [("first op ms", "first_ms", ".0f")]
    for phase in ("graph_op", "eager", "graph_frames"):
        columns += [(f"{phase} A s", f"{phase}_s", ".2f"), ("B trips", f"{phase}_trips", ".0f"),
                    ("B med ms", f"{phase}_median_ms", ".1f"), ("B max ms", f"{phase}_max_ms", ".0f")]  # fmt: skip
    print_table(medians, columns)


if __name__ == "__main__":
    main()
