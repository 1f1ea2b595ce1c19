"""A 2-rank allreduce over the secure links (server/seclink.py, `--collectives secure`) against plaintext gloo.

Two processes on loopback, each as a daemon's session worker holds its group: a TCPStore of rank 0, the signed
keys (`_SignedStore`), then either `seclink.form` or the gloo group `_process_group` builds. Each rank
allreduces (sum) float32 tensors of each size, `--rounds` times after one warm-up, a barrier before each.
Reports per size and transport the median wall time of rank 0's allreduce and the CPU time both ranks spent
(all threads: gloo's included). `--measure instr` runs each rank under callgrind instead, instrumented around
the measured allreduces only, and reports the instructions of both ranks together (the figures of record).

    cd bench && nice -n 10 python collectives_link.py --sizes 4,64 --rounds 5
    cd bench && nice -n 10 python collectives_link.py --sizes 4,64 --rounds 2 --measure instr
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import cgtools

MiB = 1 << 20


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from gpupool.server import seclink
    from gpupool.server.collectives import _process_group, _SignedStore

    torch.set_num_threads(1)
    timeout = 600.0
    store = dist.TCPStore("127.0.0.1", args.port, 2, is_master=args.rank == 0, timeout=timedelta(seconds=timeout))
    secret = b"bench-secret"
    keys = _SignedStore(dist.PrefixStore("bench/", store), secret)
    if args.transport == "secure":
        pg = seclink.form(keys, secret, "bench", args.rank, 2, timeout, "127.0.0.1")
    else:
        pg = _process_group(keys, args.rank, 2, timeout, "127.0.0.1", torch.device("cpu"))
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM  # type: ignore[assignment]
    out: dict[str, dict[str, list[float]]] = {}
    for i, mib in enumerate(args.sizes):
        t = torch.ones(int(mib * MiB) // 4)
        pg.allreduce([t], opts).wait()  # warm-up: first-touch of buffers, connections
        walls, cpus = [], []
        if args.instr:
            pg.barrier().wait()
            cgtools.control("--instr=on")
        for _ in range(args.rounds):
            if not args.instr:
                pg.barrier().wait()
            w, c = time.perf_counter(), time.process_time()
            pg.allreduce([t], opts).wait()
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        if args.instr:
            cgtools.control(f"--dump=d{i}", "--instr=off")
        assert float(t[0]) == 2.0 ** (args.rounds + 1), float(t[0])  # each round doubled the ones
        out[str(mib)] = {"wall": walls, "cpu": cpus}
    pg.barrier().wait()
    print("RESULT " + json.dumps(out), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pair(transport: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, dict[str, list[float]]]]:
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, __file__, "--worker", "--rank", str(rank), "--port", str(port), "--transport",
               transport, "--sizes", ",".join(map(str, args.sizes)), "--rounds", str(args.rounds)]  # fmt: skip
        if args.measure == "instr":
            cmd = [*cgtools.valgrind(tmp / f"{transport}.{rank}.out"), *cmd, "--instr"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, _ = p.communicate(timeout=3600)
        if p.returncode:
            raise SystemExit(f"a {transport} rank failed ({p.returncode})")
        results.append(json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[7:]))
    return results


def instructions(tmp: Path, transport: str, index: int) -> int:
    """Both ranks' instructions in their callgrind dump d<index>."""
    total = 0
    for f in tmp.glob(f"{transport}.*.out.*"):
        lines = f.read_text(errors="replace").splitlines()
        trigger = next((x for x in lines if x.startswith("desc: Trigger:")), "")
        if re.search(rf"\bd{index}\s*$", trigger):
            total += int([x for x in lines if x.startswith(("totals:", "summary:"))][-1].split()[1])
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4,64", help="MiB per allreduce, comma-separated (0.27: a 70k-float gradient)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--measure", choices=("time", "instr"), default="time")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--instr", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--transport", default="secure", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.sizes = [float(x) if "." in x else int(x) for x in str(args.sizes).split(",")]
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        rows = {t: pair(t, args, tmp) for t in ("gloo", "secure")}
        print(f"2-rank allreduce (sum, float32), {args.rounds} rounds, loopback; medians")
        if args.measure == "instr":
            print("| MiB | gloo M instr (both ranks) | secure M instr | secure/gloo |")
            print("|---|---|---|---|")
            for i, mib in enumerate(args.sizes):
                g, s = instructions(tmp, "gloo", i) / 1e6, instructions(tmp, "secure", i) / 1e6
                print(f"| {mib} | {g / args.rounds:.2f} | {s / args.rounds:.2f} | {s / g:.2f}x |")
            return 0
        print(
            "| MiB | gloo wall ms | secure wall ms | secure/gloo | gloo CPU ms (both ranks) | secure CPU ms (both) "
            "| secure GB/s |"
        )
        print("|---|---|---|---|---|---|---|")
        for mib in args.sizes:
            k = str(mib)
            gw, sw = (statistics.median(rows[t][0][k]["wall"]) * 1e3 for t in ("gloo", "secure"))
            gc, sc = (statistics.median(a + b for a, b in zip(rows[t][0][k]["cpu"], rows[t][1][k]["cpu"], strict=True))
                      * 1e3 for t in ("gloo", "secure"))  # fmt: skip
            print(
                f"| {mib} | {gw:.1f} | {sw:.1f} | {sw / gw:.2f}x | {gc:.1f} | {sc:.1f} | {mib * MiB / sw / 1e6:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
