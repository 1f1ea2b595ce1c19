"""What the collectives built on others cost (round 38: client/distributed.py runs `reduce` as an allreduce,
`gather` as an allgather, send/recv in a group of two as a broadcast, and torch's object collectives over them; round
39: `all_to_all_single` as an allgather, after an allgather of the split sizes and a read of them where it has split
sizes, and the `isend`+`irecv` exchange of both ranks as two broadcasts):
each next to the collective it is built on, in one torchrun job of two ranks under `gpupool run --cuda -n 2` on a
`gpupool up --fake-gpus 2` this bench starts (split_devices.start_pool; the C++ client, then the Python client), and
the same script under torchrun on the CPU with gloo. Printed: rank 0's median milliseconds per call, each call synced
(rank 0 reads a result element; the ranks meet at a barrier, untimed, before each call), and the ratio of each to the
collective it is built on.

    cd bench && nice -n 5 ../.venv/bin/python rooted_collectives.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

from split_devices import start_pool  # noqa: E402

# (name, the collective it is built on or None)
PAIRS = [("all_reduce", None), ("reduce", "all_reduce"), ("all_gather", None), ("gather", "all_gather"),
         ("broadcast", None), ("send_recv", "broadcast"), ("broadcast_object_list", "broadcast"),
         ("all_gather_object", "all_gather"), ("gather_object", "all_gather"), ("all_to_all_single", "all_gather"),
         ("all_to_all_splits", "all_gather"), ("isend_irecv_exchange", "broadcast")]  # fmt: skip
SIZES = {"4KiB": 1024, "4MiB": 1 << 20}


def worker(rounds: int) -> None:
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dev = torch.device("cuda") if use_cuda else torch.device("cpu")
    metrics = {"rank": rank, "loss": 0.25, "tokens": list(range(32))}

    def calls(n: int) -> dict[str, object]:
        t = torch.ones(n, device=dev)
        outs = [torch.empty(n, device=dev) for _ in range(2)]

        def send_recv() -> object:
            if rank == 1:
                dist.send(t, 0)
            else:
                dist.recv(t, 1)
            return t

        def exchange() -> object:
            ops = [dist.P2POp(dist.isend, t, 1 - rank), dist.P2POp(dist.irecv, outs[0], 1 - rank)]
            for request in dist.batch_isend_irecv(ops):
                request.wait()
            return outs[0]

        splits = [n // 4, n - n // 4]  # uneven: rank r sends a quarter of its rows to rank 0, the rest to rank 1
        gets = [n // 4, n // 4] if rank == 0 else [n - n // 4, n - n // 4]
        got = torch.empty(sum(gets), device=dev)

        return {
            "all_reduce": lambda: (dist.all_reduce(t), t)[1],
            "reduce": lambda: (dist.reduce(t, dst=0), t)[1],
            "all_gather": lambda: (dist.all_gather(outs, t), outs[1])[1],
            "gather": lambda: (dist.gather(t, outs if rank == 0 else None, dst=0), outs[1])[1],
            "broadcast": lambda: (dist.broadcast(t, src=1), t)[1],
            "send_recv": send_recv,
            "broadcast_object_list": lambda: dist.broadcast_object_list([metrics], src=1),
            "all_gather_object": lambda: dist.all_gather_object([None, None], metrics),
            "gather_object": lambda: dist.gather_object(metrics, [None, None] if rank == 0 else None, dst=0),
            "all_to_all_single": lambda: (dist.all_to_all_single(outs[0], t), outs[0])[1],
            "all_to_all_splits": lambda: (dist.all_to_all_single(got, t, gets, splits), got)[1],
            "isend_irecv_exchange": exchange,
        }

    for size, n in SIZES.items():
        for name, call in calls(n).items():
            if "object" in name and size != "4KiB":  # a small dict: its pickle's size is its own
                continue
            times = []
            for i in range(rounds + 2):
                dist.barrier()
                start = time.perf_counter()
                result = call()
                if rank == 0 and isinstance(result, torch.Tensor):
                    result[-1].item()
                if i >= 2:  # two warm-up calls
                    times.append(time.perf_counter() - start)
            if rank == 0:
                print(f"result {name} {size} {statistics.median(times) * 1e3:.3f}", flush=True)
    dist.destroy_process_group()


def job(prefix: list[str], env: dict[str, str], rounds: int) -> dict[tuple[str, str], float]:
    cmd = [*prefix, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HERE),
           "--worker", "--rounds", str(rounds)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return {(n, s): float(v) for n, s, v in re.findall(r"^result (\S+) (\S+) (\S+)$", done.stdout, re.M)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.rounds)
        return
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    base.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    columns: dict[str, dict[tuple[str, str], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, pool = start_pool(Path(tmp), base)
        try:
            run = [sys.executable, "-m", "gpupool.cli", "run", "--cuda", "-n", "2", "-p", "0.5"]
            columns["native"] = job([*run, "--"], {**base, **pool}, args.rounds)
            columns["shim"] = job([*run, "--client", "shim", "--"], {**base, **pool}, args.rounds)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    columns["gloo-cpu"] = job([], {**base, "CUDA_VISIBLE_DEVICES": ""}, args.rounds)
    print(f"rank 0's median ms per synced call, {args.rounds} rounds; ratio = the call / the one it is built on")
    print(f"{'collective':<24}{'size':>6}" + "".join(f"{c:>12}{'ratio':>7}" for c in columns))
    for name, built_on in PAIRS:
        for size in SIZES:
            if (name, size) not in columns["native"]:
                continue
            row = f"{name:<24}{size:>6}"
            for col in columns.values():
                v = col[(name, size)]
                ratio = f"{v / col[(built_on, size)]:.2f}" if built_on else ""
                row += f"{v:>12.3f}{ratio:>7}"
            print(row)
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
