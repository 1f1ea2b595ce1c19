"""A waiting collective and the other sessions of its device, this tree against another checkout (round 18: a
collective waited for its peers on its device's thread, so a tenant holding both ranks of a lease and holding
back one stalled every other session of the other rank's device, up to the group's timeout per call; now it
waits in a thread of its own).

For each tree: two daemons (two hosts, one fake GPU each, `--worker-network on`, secure collectives), a lease
of both (sessions A0, A1) and another tenant B on A0's device.
- stall: A0 allreduces while A1 sleeps `--delay` seconds before it calls; B downloads 4 KiB in a loop until
  A0's collective returns. Printed: B's downloads meanwhile and B's longest wait.
- latency: A0 and A1 allreduce (sum) `--rounds` times with nobody else there, each call synced: the median time
  of one allreduce of 1 KiB and of 4 MiB (what the waiting thread and its looks cost a collective), and the CPU
  time both daemons' process trees (daemon, zygote, workers; /proc utime + stime) spent per allreduce.

    nice -n 10 .venv/bin/python bench/collective_wait.py --against /work/wt/base \\
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_wire import (  # noqa: E402
    alternate,
    downloads_while,
    loopback_keys,
    print_table,
    start_daemon,
    stop_all,
    tree_cpu,
)


def measure(addresses: list[str], pids: list[int], key: bytes, delay: float, rounds: int) -> dict[str, float]:
    import torch
    from gpupool.client.session import Session

    from gpupool import tokens
    from gpupool._proto import device_pb2

    lease = uuid.uuid4().hex

    def token(host: str, tenant: str, lease_id: str, network: bool) -> str:
        claims = tokens.TokenClaims(lease_id, host, 0, 1 << 28, 1.0, time.time() + 3600, tenant, network)
        return tokens.mint(key, claims)

    ranks = [token(f"bench-{i}", "pair", lease, True) for i in range(2)]
    a0, a1 = (Session.attach(addr, t) for addr, t in zip(addresses, ranks, strict=True))
    b = Session.attach(addresses[0], token("bench-0", "other", uuid.uuid4().hex, False))
    try:
        h = a0.new_handle()
        a0.command(device_pb2.Command(group_join=device_pb2.GroupJoin(
            rank=0, size=2, tokens=ranks, port_handle=h, timeout_seconds=60.0)))  # fmt: skip
        (port,) = a0.sync([h])
        a1.command(device_pb2.Command(group_join=device_pb2.GroupJoin(
            rank=1, size=2, tokens=ranks, store_address=f"127.0.0.1:{port}", timeout_seconds=60.0)))  # fmt: skip
        a1.sync()

        def allreduce(s: Any, handle: int) -> None:
            s.command(device_pb2.Command(collective=device_pb2.Collective(kind="allreduce", tensors=[handle],
                                                                           reduce_op="sum")))  # fmt: skip
            s.flush()

        out: dict[str, float] = {}
        for label, n in (("1KiB", 256), ("4MiB", 1 << 20)):
            x0, x1 = a0.upload(torch.ones(n)), a1.upload(torch.ones(n))
            times = []
            for k in range(rounds + 1):
                if k == 1:  # after the first (warm-up) call
                    cpu = sum(map(tree_cpu, pids))
                t0 = time.perf_counter()
                allreduce(a0, x0)
                allreduce(a1, x1)
                a0.sync()
                a1.sync()
                times.append(time.perf_counter() - t0)
            out[f"{label}_ms"] = statistics.median(times[1:]) * 1e3
            out[f"{label}_cpu_ms"] = (sum(map(tree_cpu, pids)) - cpu) / rounds * 1e3  # both daemons, per allreduce
        x0, x1 = a0.upload(torch.ones(4)), a1.upload(torch.ones(4))
        y = b.upload(torch.arange(1024.0))
        b.download(y)
        late = threading.Timer(delay, lambda: (allreduce(a1, x1), a1.sync()))

        def wait() -> None:
            late.start()
            allreduce(a0, x0)
            a0.sync()

        waits = downloads_while(wait, b, y)
        late.join()
        out["b_downloads"] = len(waits)
        out["b_max_ms"] = max(waits) * 1e3
        return out
    finally:
        for s in (a0, a1, b):
            s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=2.0, help="seconds rank 1 holds back its call")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--against", metavar="DIR", required=True, help="the other checkout (its daemon)")
    parser.add_argument("--against-python", default=sys.executable, help="the python that imports DIR's gpupool")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = loopback_keys(tmp)
        trees = {"other": (args.against_python, args.against), "this": (sys.executable, None)}
        daemons = {
            name: [
                start_daemon(key_file, "--host-id", f"bench-{i}", "--worker-network", "on", python=py, cwd=cwd)
                for i in range(2)
            ]
            for name, (py, cwd) in trees.items()
        }
        try:
            medians = alternate(
                list(daemons),
                args.repeat,
                lambda name, i: measure(
                    [a for _, a in daemons[name]], [p.pid for p, _ in daemons[name]], key, args.delay, args.rounds
                ),
            )
        finally:
            stop_all([proc for pair in daemons.values() for proc, _ in pair])
    print(f"rank 1 {args.delay:g} s late; {args.rounds} allreduces a size; {args.repeat} run(s) each; medians")
    print_table(
        medians,
        [("B downloads", "b_downloads", ".0f"), ("B max ms", "b_max_ms", ".0f"), ("1 KiB ms", "1KiB_ms", ".2f"),
         ("4 MiB ms", "4MiB_ms", ".2f"), ("1 KiB CPU ms", "1KiB_cpu_ms", ".2f"),
         ("4 MiB CPU ms", "4MiB_cpu_ms", ".2f")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
