"""Small collectives' latency through real daemons, this tree against another checkout (round 40: each collective's
agreement check was an all-gather of the ranks' signatures, a round trip through the hub of its own before the
transfer; now each rank's signature travels in its first frame of the transfer).

For each tree: one daemon (`--fake-gpus N`, `--worker-network on`, the default secure transport, TLS), a lease of its
N devices, one session a rank, joined in one group. Each round every rank sends the same collective (allreduce, sum,
of a float32 tensor; or a barrier) and then every rank syncs (the client's round trip to its daemon included, as a
user's `.item()` after an allreduce). Printed per rank count: the median wall time of a round and the CPU time the
daemon's process tree (daemon, zygote, workers; /proc utime + stime) spent per collective of all ranks together.
Trees run alternately (`--repeat` runs each); the medians of the runs' medians.

`--subgroup` (round 45) compares, in this tree alone, each rank count N's collectives on a job's own group of N ranks
("group") with the same collectives on a subgroup of N ranks (`dist.new_group(range(N))`) of a job of 2N ranks, whose
other N ranks stay idle ("subgroup"): what a subgroup's collectives cost beside its group's.

`--churn K` (round 46) makes, uses and drops subgroups in a row, as a script that calls `new_group`, one allreduce
on it and `destroy_process_group` in a loop: each of K cycles, every rank of the job joins a subgroup of all its
ranks, runs one allreduce (1 KiB) on it and syncs; on this tree each rank then leaves it (`GroupLeave`), on the
other tree (before round 46: no leave, its daemons were never told) it stays. Printed per tree: the median ms of a
cycle, the daemon tree's CPU ms a cycle, and the sockets and threads its process tree holds after the K cycles
beyond what it held before them. K at most 30 where the other tree is older than round 46 (32 subgroups a session).

`--path link` leaves out the daemons, the clients and gRPC: N processes, each as a session worker holds its group
(rank 0's TCPStore, the signed keys, `seclink.form`), call the daemon's collective path (`Collectives._call`: the
agreement and the transfer) back to back, `--rounds` calls of each kind after 3 warm-up calls: the median wall time
of rank 0's call, and the CPU time of all ranks (all threads) per call.

    nice -n 5 .venv/bin/python bench/collective_latency.py --ranks 2 4 --against /work/wt/base \\
        --against-python /work/wt/base/.venv/bin/python [--path link]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_wire import alternate, loopback_keys, print_table, start_daemon, stop_all, tree_cpu  # noqa: E402

CALLS = (("allreduce 1KiB", 256), ("allreduce 256KiB", 1 << 16), ("barrier", 0))


def tree_held(pid: int) -> tuple[int, int]:
    """The open sockets and the threads of process `pid` and its live descendants (a daemon, its zygote, workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                children.setdefault(int(f.read().rsplit(b")", 1)[1].split()[1]), []).append(int(entry))
        except (OSError, ValueError):
            continue
    sockets = threads = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            fds = os.listdir(f"/proc/{p}/fd")
            threads += len(os.listdir(f"/proc/{p}/task"))
        except OSError:
            continue
        for fd in fds:
            try:
                sockets += os.readlink(f"/proc/{p}/fd/{fd}").startswith("socket:")
            except OSError:
                continue
    return sockets, threads


def churn(address: str, pid: int, key: bytes, ranks: int, cycles: int, leave: bool) -> dict[str, float]:
    """`--churn`: `cycles` subgroups of all `ranks` made, used (one allreduce) and, where `leave`, left."""
    import torch

    from gpupool._proto import device_pb2

    sessions = joined(address, key, ranks)
    try:
        handles = [s.upload(torch.ones(256)) for s in sessions]
        for s, x in zip(sessions, handles, strict=True):  # the group's own links first: not counted
            s.command(device_pb2.Command(collective=device_pb2.Collective(kind="allreduce", tensors=[x])))
            s.flush()
        for s in sessions:
            s.sync()
        time.sleep(0.5)
        held, cpu, times = tree_held(pid), tree_cpu(pid), []
        for k in range(1, cycles + 1):
            t0 = time.perf_counter()
            for s in sessions:
                s.command(device_pb2.Command(group_join=device_pb2.GroupJoin(
                    subgroup=k, members=list(range(ranks)), timeout_seconds=60.0)))  # fmt: skip
                s.flush()
            for s, x in zip(sessions, handles, strict=True):
                s.command(device_pb2.Command(collective=device_pb2.Collective(
                    kind="allreduce", tensors=[x], reduce_op="max", subgroup=k)))  # fmt: skip
                if leave:
                    s.command(device_pb2.Command(group_leave=device_pb2.GroupLeave(subgroup=k)))
                s.flush()
            for s in sessions:
                s.sync()
            times.append(time.perf_counter() - t0)
        cpu = tree_cpu(pid) - cpu
        time.sleep(0.5)  # (closed links' threads end at their next poll)
        after = tree_held(pid)
        return {
            "cycle ms": statistics.median(times) * 1e3,
            "cpu ms": cpu / cycles * 1e3,
            "sockets": after[0] - held[0],
            "threads": after[1] - held[1],
        }
    finally:
        for s in sessions:
            s.close()


def joined(address: str, key: bytes, size: int) -> list[Any]:
    """Sessions of a fresh lease of `size` devices, each sent its join of the lease's group (rank 0's synced)."""
    from gpupool.client.session import Session

    from gpupool import tokens
    from gpupool._proto import device_pb2

    lease = uuid.uuid4().hex
    toks = [
        tokens.mint(key, tokens.TokenClaims(lease, "bench", d, 1 << 28, 1.0, time.time() + 3600, "pair", True))
        for d in range(size)
    ]
    every = [Session.attach(address, t) for t in toks]
    h = every[0].new_handle()
    every[0].command(device_pb2.Command(group_join=device_pb2.GroupJoin(
        rank=0, size=size, tokens=toks, port_handle=h, timeout_seconds=60.0)))  # fmt: skip
    (port,) = every[0].sync([h])
    for r, s in enumerate(every[1:], 1):
        s.command(device_pb2.Command(group_join=device_pb2.GroupJoin(
            rank=r, size=size, tokens=toks, store_address=f"127.0.0.1:{port}", timeout_seconds=60.0)))  # fmt: skip
        s.flush()
    return every


def measure(address: str, pid: int, key: bytes, ranks: int, rounds: int, subgroup: bool = False) -> dict[str, float]:
    import torch

    from gpupool._proto import device_pb2

    every = joined(address, key, 2 * ranks if subgroup else ranks)  # a subgroup's job: as many idle ranks again
    sessions = every[:ranks]
    try:
        for s in every:
            s.sync()
        number = 1 if subgroup else 0
        if subgroup:
            for s in sessions:
                s.command(device_pb2.Command(group_join=device_pb2.GroupJoin(
                    subgroup=1, members=list(range(ranks)), timeout_seconds=60.0)))  # fmt: skip
                s.flush()
            for s in sessions:
                s.sync()
        out: dict[str, float] = {}
        for label, n in CALLS:
            handles = [s.upload(torch.ones(n)) if n else 0 for s in sessions]
            if n:
                call = [
                    device_pb2.Collective(kind="allreduce", tensors=[x], reduce_op="sum", subgroup=number)
                    for x in handles
                ]
            else:
                call = [device_pb2.Collective(kind="barrier", subgroup=number) for _ in sessions]
            times = []
            cpu = 0.0
            for k in range(rounds + 1):
                if k == 1:  # after the first (warm-up) round
                    cpu = tree_cpu(pid)
                t0 = time.perf_counter()
                for s, c in zip(sessions, call, strict=True):
                    s.command(device_pb2.Command(collective=c))
                    s.flush()
                for s in sessions:
                    s.sync()
                times.append(time.perf_counter() - t0)
            out[f"{label} ms"] = statistics.median(times[1:]) * 1e3
            out[f"{label} cpu"] = (tree_cpu(pid) - cpu) / rounds * 1e3
            if n:  # every round multiplied the ones on every rank by `ranks`, summed in float32 in rank order (the
                # hub's): 3 ** 21 is no float32, so `float(ranks ** (rounds + 1))` failed at 3 ranks (round 41)
                w = torch.ones(1)
                for _ in range(rounds + 1):
                    acc = w.clone()
                    for _ in range(ranks - 1):
                        acc = acc + w
                    w = acc
                want = float(w[0])
                assert all(float(s.download(x)[0]) == want for s, x in zip(sessions, handles, strict=True))
        return out
    finally:
        for s in every:
            s.close()


def link_worker(args: argparse.Namespace) -> None:
    """One rank of `--path link` (this file run by a tree's python in its checkout: that tree's gpupool)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from gpupool.server import collectives, seclink

    from gpupool._proto import device_pb2

    torch.set_num_threads(1)
    rank, size = args.rank, args.size
    store = dist.TCPStore("127.0.0.1", args.port, size, is_master=rank == 0, timeout=timedelta(seconds=600))
    secret = b"bench-secret"
    keys = collectives._SignedStore(dist.PrefixStore("bench/", store), secret)
    group = collectives.Group("bench", rank, size, 600.0)
    group.pg = seclink.form(keys, secret, "bench", rank, size, 600.0, "127.0.0.1")
    group.ready.set()
    runner = collectives.Collectives()
    out: dict[str, float] = {}
    for label, n in CALLS:
        t = torch.ones(n)
        if n:
            msg, tensors = device_pb2.Collective(kind="allreduce", tensors=[1], reduce_op="sum"), [t]
        else:
            msg, tensors = device_pb2.Collective(kind="barrier"), []
        walls = []
        for k in range(3 + args.rounds):
            if k == 3:
                cpu = time.process_time()
            w = time.perf_counter()
            runner._call(group, msg, tensors, [], torch.device("cpu"))
            walls.append(time.perf_counter() - w)
        out[f"{label} cpu"] = (time.process_time() - cpu) / args.rounds * 1e3
        out[f"{label} ms"] = statistics.median(walls[3:]) * 1e3
        if n:
            t.fill_(1.0)
    runner._call(group, device_pb2.Collective(kind="barrier"), [], [], torch.device("cpu"))
    print("RESULT " + json.dumps(out), flush=True)


def link_measure(python: str, cwd: str | None, ranks: int, rounds: int) -> dict[str, float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                python,
                os.path.abspath(__file__),
                "--link-worker",
                "--rank",
                str(r),
                "--size",
                str(ranks),
                "--port",
                str(port),
                "--rounds",
                str(rounds),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )  # fmt: skip
        for r in range(ranks)
    ]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=600)
        if proc.returncode:
            raise SystemExit(f"a rank failed ({proc.returncode})")
        results.append(json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[7:]))
    out = {k: v for k, v in results[0].items() if k.endswith(" ms")}  # rank 0's wall time
    for label, _ in CALLS:
        out[f"{label} cpu"] = sum(r[f"{label} cpu"] for r in results)  # all ranks' CPU
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--against", metavar="DIR", help="the other checkout (required)")
    parser.add_argument("--against-python", default=sys.executable, help="the python that imports DIR's gpupool")
    parser.add_argument("--path", choices=("daemon", "link"), default="daemon")
    parser.add_argument(
        "--subgroup", action="store_true", help="this tree alone: a job's group of N ranks against a subgroup of N"
    )
    parser.add_argument("--churn", type=int, metavar="K", help="subgroups made, used and dropped K times in a row")
    parser.add_argument("--link-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.link_worker:
        link_worker(args)
        return
    if args.subgroup:
        subgroups(args)
        return
    if args.against is None:
        parser.error("--against DIR is required")
    if args.churn:
        churns(args)
        return
    if args.path == "link":
        trees = {"other": (args.against_python, args.against), "this": (sys.executable, None)}
        results = {
            n: alternate(list(trees), args.repeat, lambda name, i, n=n: link_measure(*trees[name], n, args.rounds))
            for n in args.ranks
        }
        print(f"{args.rounds} calls of each, back to back; {args.repeat} run(s) a tree; medians; rank 0's ms a call,")
        print("all ranks' CPU ms a call")
        report(results)
        return
    results = both_trees(args, lambda name, address, pid, key, n: measure(address, pid, key, n, args.rounds))
    print(f"{args.rounds} rounds a call; {args.repeat} run(s) each tree; medians; ms per round (all ranks synced),")
    print("daemon CPU ms per collective of all ranks")
    report(results)


def subgroups(args: argparse.Namespace) -> None:
    """`--subgroup`: this tree's daemon, each rank count's collectives on a group, then on a subgroup, alternately."""
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = loopback_keys(tmp)
        proc, address = start_daemon(key_file, "--worker-network", "on", "--fake-gpus", str(2 * max(args.ranks)))
        try:
            results = {
                n: alternate(
                    ["group", "subgroup"],
                    args.repeat,
                    lambda name, i, n=n: measure(address, proc.pid, key, n, args.rounds, name == "subgroup"),
                )
                for n in args.ranks
            }
        finally:
            stop_all([proc])
    print(f"{args.rounds} rounds a call; {args.repeat} run(s) each; medians; ms per round (all ranks synced),")
    print("daemon CPU ms per collective of all ranks (a subgroup's job: its idle ranks' sessions included)")
    report(results)


def both_trees(
    args: argparse.Namespace, measure: Callable[[str, str, int, bytes, int], dict[str, float]]
) -> dict[int, dict[str, dict[str, Any]]]:
    """This tree's daemon and `--against`'s, `measure(tree, address, pid, key, ranks)` for each rank count on both,
    alternately (`alternate`); each rank count's medians by tree."""
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = loopback_keys(tmp)
        trees = {"other": (args.against_python, args.against), "this": (sys.executable, None)}
        most = str(max(args.ranks))
        daemons = {
            name: start_daemon(key_file, "--worker-network", "on", "--fake-gpus", most, python=py, cwd=cwd)
            for name, (py, cwd) in trees.items()
        }
        try:
            return {
                n: alternate(
                    list(daemons),
                    args.repeat,
                    lambda name, i, n=n: measure(name, daemons[name][1], daemons[name][0].pid, key, n),
                )
                for n in args.ranks
            }
        finally:
            stop_all([proc for proc, _ in daemons.values()])


def churns(args: argparse.Namespace) -> None:
    """`--churn K`: both trees' daemons, each rank count's K cycles, alternately; the other tree never leaves."""
    results = both_trees(
        args, lambda name, address, pid, key, n: churn(address, pid, key, n, args.churn, name == "this")
    )
    print(f"{args.churn} subgroups made, used (one allreduce) and left (this tree; the other never leaves) in a row;")
    print(f"{args.repeat} run(s) each tree; medians; ms a cycle, daemon CPU ms a cycle, sockets and threads held after")
    for n, medians in results.items():
        print(f"-- {n} ranks")
        print_table(
            medians,
            [("cycle ms", "cycle ms", ".2f"), ("cpu ms", "cpu ms", ".2f"), ("sockets", "sockets", ".0f"),
             ("threads", "threads", ".0f")],
        )  # fmt: skip


def report(results: dict[int, dict[str, dict[str, Any]]]) -> None:
    for n, medians in results.items():
        print(f"-- {n} ranks")
        columns: list[tuple[str, str, Any]] = []
        for label, _ in CALLS:
            columns += [(f"{label} ms", f"{label} ms", ".2f"), ("cpu", f"{label} cpu", ".2f")]
        print_table(medians, columns)


if __name__ == "__main__":
    main()
