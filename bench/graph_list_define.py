"""How long a graph definition of one op over long tensor lists takes in-process (the dry run and the checks a worker
runs before the graph exists: graph_build), this tree and another side by side (round 44, hostile44).

Each op names one input slot `--entries` times in every list argument: `_chunk_cat` (one list), `_fused_adam_` (five
lists and the steps), `_foreach_lerp.List` (three), `_foreach_norm` (one); each is defined twice in one process and
the second time is printed (the first imports what torch's meta kernels need). A refusal is printed with its time.

    cd bench && nice -n 5 ../.venv/bin/python graph_list_define.py --entries 16384 \\
        --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def measure(n: int) -> dict[str, tuple[float, str]]:
    import torch
    from gpupool.server import slices
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    from gpupool import wire
    from gpupool._proto import device_pb2, tensor_pb2

    def many(slot: int) -> tensor_pb2.Arg:
        return tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=[slot] * n))

    z, s0, four = (wire.meta_to_proto(t) for t in (torch.ones(0), torch.zeros(()), torch.ones(4)))
    f = {k: tensor_pb2.Arg(f=v) for k, v in dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8).items()}
    adam = [many(1)] * 4 + [tensor_pb2.Arg(tensors=tensor_pb2.TensorList()), many(2)]
    i = tensor_pb2.Arg
    cases = {
        "_chunk_cat": ([four], device_pb2.Op(name="aten::_chunk_cat.default", args=[many(1), i(i=0), i(i=2)],
                                             outputs=[2]), [2]),
        "_fused_adam_": ([z, s0], device_pb2.Op(name="aten::_fused_adam_.default", args=adam,
                                                kwargs={**f, "amsgrad": i(b=False), "maximize": i(b=False)}), []),
        "_foreach_lerp": ([z], device_pb2.Op(name="aten::_foreach_lerp.List", args=[many(1)] * 3, outputs=[2]), [2]),
        "_foreach_norm": ([z], device_pb2.Op(name="aten::_foreach_norm.Scalar", args=[many(1)], outputs=[2]), [2]),
    }  # fmt: skip

    def no_reply(item: object) -> None:
        raise AssertionError(item)

    out: dict[str, tuple[float, str]] = {}
    for name, (metas, op, outs) in [*cases.items(), *cases.items()]:
        dev = FakeDevice(0, "h", 1 << 30)
        s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
        ex = CommandExecutor(slices.SliceLedger())
        msg = device_pb2.DefineGraph(graph_id=1, inputs=len(metas), input_meta=metas, ops=[op], outputs=outs)
        cmd = device_pb2.Command(define_graph=msg)
        t0 = time.perf_counter()
        ex.execute(s, cmd, no_reply)
        while s.defining is not None:  # (its pieces)
            ex.execute(s, cmd, no_reply)
        out[name] = (time.perf_counter() - t0, "" if s.error is None else f"refused: {s.error.message[:70]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=16_384)
    ap.add_argument("--against", metavar="DIR", help="the other checkout (its gpupool)")
    ap.add_argument("--against-python", default=sys.executable)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.json:
        print(json.dumps(measure(args.entries)))
        return
    rows = {"this tree": measure(args.entries)}
    if args.against:
        cmd = [args.against_python, str(Path(__file__).resolve()), "--json", "--entries", str(args.entries)]
        got = subprocess.run(cmd, cwd=args.against, check=True, capture_output=True, text=True).stdout
        rows["other"] = json.loads(got.splitlines()[-1])
    print(f"a graph of one op naming one slot {args.entries} times in each list: definition seconds")
    for name in rows["this tree"]:
        line = [f"{name:14}"] + [f"{k}: {v[name][0]:.3f} s {v[name][1]}" for k, v in rows.items()]
        if "other" in rows:
            line.append(f"ratio {rows['this tree'][name][0] / rows['other'][name][0]:.2f}")
        print("  ".join(line))


if __name__ == "__main__":
    main()
