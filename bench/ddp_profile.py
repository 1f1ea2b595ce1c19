"""Where a data-parallel step's time goes beyond the model: examples/ddp/train.py's step, timed per phase in each rank.

    nice -n 5 python bench/ddp_profile.py [--ranks 1 2] [--steps 12] [--client native] [--collectives secure]
                                          [--tflops 0.0002] [--gbps 0.5] [--link-gbps 0.05] [--against DIR]

One `gpupool up --fake-gpus MAX` (TLS, as bench/ddp_scaling.py) with the same speed model, then per rank count
`gpupool run -n N -- torchrun ... bench/ddp_profile.py --rank-side`: the sentiment CNN of examples/ddp/train.py
under DistributedDataParallel (N > 1), 32 samples per rank. Each step runs twice over:
- as a user runs it (rank 0 reads the loss; the others never wait): the client's own time per phase (the data
  and its upload, forward, backward with DDP's hooks and the allreduce's send, optimizer, the loss's read);
- synced (`gpupool.torch.synchronize()` after each phase): the daemon's time per phase, so that backward's time
  at N ranks against 1 is what the gradients' allreduce added (its wait for the peers, its agreement, its wire).
The collective's client side (ProcessGroupGpupool._send: the C++ client's flush and the command) is timed apart.
Medians over the steps after the first two, per rank, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))


def rank_side(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from gpupool.client import distributed
    from torch.nn.parallel import DistributedDataParallel

    import gpupool.torch  # noqa: F401 - the device and the backend
    from examples.ddp import train

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    send_seconds: list[float] = []
    plain_send = distributed.ProcessGroupGpupool._send

    def timed_send(self: Any, *a: Any, **k: Any) -> None:
        t0 = time.perf_counter()
        plain_send(self, *a, **k)
        send_seconds.append(time.perf_counter() - t0)

    distributed.ProcessGroupGpupool._send = timed_send  # type: ignore[method-assign]
    sync = gpupool.torch.synchronize  # type: ignore[attr-defined]
    device = torch.device("gpupool", 0)
    if world > 1:
        dist.init_process_group("gpupool")
    model: torch.nn.Module = train.build_model(0).to(device)
    if world > 1:
        model = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    local, gb = args.batch, args.batch * world
    phases: dict[str, dict[str, list[float]]] = {"user": {}, "synced": {}}
    for mode in ("user", "synced"):
        rows = phases[mode]
        sync()
        for step in range(args.steps):
            marks = [time.perf_counter()]

            def mark(synced: bool = mode == "synced", marks: list[float] = marks) -> None:
                if synced:
                    sync()
                marks.append(time.perf_counter())

            tokens, labels = train.batch(step, gb, 0)
            x = tokens[rank * local : (rank + 1) * local].to(device)
            y = labels[rank * local : (rank + 1) * local].to(device)
            mark()
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            mark()
            before = len(send_seconds)
            loss.backward()
            mark()
            opt.step()
            mark()
            if rank == 0 or mode == "synced":
                loss.item()
            mark(False)
            if step >= 2:
                names = ("data", "forward", "backward", "optimizer", "read", "step")
                spans = [b - a for a, b in zip(marks, marks[1:], strict=False)] + [marks[-1] - marks[0]]
                for name, span in zip(names, spans, strict=True):
                    rows.setdefault(name, []).append(span)
                rows.setdefault("collective send", []).append(sum(send_seconds[before:]))
    sync()
    out = {mode: {k: 1e3 * statistics.median(v) for k, v in rows.items()} for mode, rows in phases.items()}
    Path(args.out).with_suffix(f".{rank}.json").write_text(json.dumps(out))
    if world > 1:
        dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    p.add_argument("--client", default="native", choices=["native", "shim"])
    p.add_argument("--collectives", default="secure", choices=["secure", "gloo"])
    p.add_argument("--tflops", type=float, default=0.0002)
    p.add_argument("--gbps", type=float, default=0.5)
    p.add_argument("--link-gbps", type=float, default=0.05)
    p.add_argument("--against", type=Path, help="another checkout (with its .venv), run after this one")
    p.add_argument("--pool-log", type=Path, help="append each `gpupool up`'s output (its daemon's log) here")
    args = p.parse_args()
    if args.rank_side:
        rank_side(args)
        return 0
    from ddp_scaling import start_pool

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPUPOOL_FAKE_GPU_TFLOPS": str(args.tflops),
           "GPUPOOL_FAKE_GPU_GBPS": str(args.gbps), "GPUPOOL_FAKE_LINK_GBPS": str(args.link_gbps),
           "GPUPOOL_COLLECTIVES": args.collectives, "GPUPOOL_CLIENT": args.client,
           "GPUPOOL_GLOO_CONNECT_ANYWHERE": "on"}  # fmt: skip
    root = HERE.parents[1]
    trees = {"this": (sys.executable, root)}
    if args.against:
        trees["other"] = (str(args.against.resolve() / ".venv" / "bin" / "python"), args.against.resolve())
    print(f"load average at the start {os.getloadavg()[0]:.1f}; client {args.client}, --collectives "
          f"{args.collectives}; medians of {args.steps - 2} steps, ms", file=sys.stderr)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, (python, tree) in trees.items():
            (Path(tmp) / name).mkdir()
            tree_env = {**env, "PYTHONPATH": f"{tree}:{HERE.parent}"}
            proc, pool = start_pool(max(args.ranks), Path(tmp) / name, tree_env, python, args.pool_log)
            try:
                for n in args.ranks:
                    out = Path(tmp) / f"{name}{n}"
                    cmd = [python, "-m", "gpupool.cli", "run", "-n", str(n), "--", python, "-m",
                           "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), str(HERE),
                           "--rank-side", "--out", str(out), "--steps", str(args.steps),
                           "--batch", str(args.batch)]  # fmt: skip
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**tree_env, **pool})
                    if done.returncode != 0:
                        raise SystemExit(f"{name} {n} rank(s) failed:\n{done.stderr[-3000:]}")
                    for r in range(n):
                        got = json.loads(out.with_suffix(f".{r}.json").read_text())
                        for mode in ("user", "synced"):
                            cols = "  ".join(f"{k} {v:7.2f}" for k, v in got[mode].items())
                            print(f"{name:>5} N={n} rank {r} {mode:>6}: {cols}")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"load average at the end {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
