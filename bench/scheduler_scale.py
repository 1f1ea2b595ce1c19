"""Scheduler at scale: 10,000 simulated devices (1,250 hosts x 8), 100,000 mixed allocate/release requests.

Prints one table: decisions per second, p50/p99 decision latency, granted/exhausted counts and the
allocated fraction of the pool's compute at the end, for
- in-process, memory store, binpack and spread (placement + bookkeeping + token minting),
- in-process, SQLite WAL store, binpack (one transaction per decision),
- in-process, PostgreSQL store (the HA store), binpack, against a throwaway server this script starts with
  initdb/pg_ctl on a Unix socket (fsync off: the figures are the round trips, not a disk); --pg-requests N,
- through gRPC against a real `gpupool scheduler` process (SQLite), binpack and spread; by default on
  all of the requests by default (--grpc-requests N runs the first N only, for a quick look).

The request stream is seeded and the same for every row: 1/2/4/8 GPUs (85/8/5/2 %), fractions
0.1-1.0 or memory 4-40 GiB of an 80 GiB device, releases of a random live lease 40 % of the time, so the
pool fills up about two thirds of the way through and policies then differ in what still fits.

    nice python bench/scheduler_scale.py                    # full run (~4-8 min on 2 cores)
    python bench/scheduler_scale.py --requests 20000 --grpc-requests 5000 --pg-requests 5000   # quick

Latencies are wall time per decision (p50, p99) and, since a shared box preempts the process at random,
also the CPU time of the deciding thread (p99 cpu): the decision's own cost, without the neighbours'.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from gpupool.scheduler.capacity import SHARE_UNITS
from gpupool.scheduler.hosts import DeviceSpec
from gpupool.scheduler.leases import Core, CoreConfig
from gpupool.scheduler.placement import Request
from gpupool.scheduler.store import MemoryStore, SqliteStore, Store

from gpupool import pki, tls, tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc
from gpupool.errors import ResourceExhausted

GiB = 1024**3
DEVICE_MEMORY = 80 * GiB
GPUS_PER_HOST = 8
TTL = 24 * 3600.0  # nothing expires during the run


@dataclass(frozen=True)
class Op:
    """Allocate `request`, or (request None) release the live lease at position `victim` modulo their number."""

    request: Request | None
    victim: int = 0


def workload(n: int, seed: int, policy: str) -> list[Op]:
    rng = random.Random(seed)
    ops: list[Op] = []
    for _ in range(n):
        if rng.random() < 0.4:
            ops.append(Op(None, rng.randrange(1 << 30)))
            continue
        gpus = rng.choices([1, 2, 4, 8], weights=[85, 8, 5, 2])[0]
        if rng.random() < 0.7:
            req = Request(gpus, fraction=rng.choice([0.1, 0.125, 0.25, 0.5, 0.75, 1.0]), policy=policy)
        else:
            req = Request(gpus, memory_bytes=rng.choice([4, 10, 20, 40]) * GiB, policy=policy)
        ops.append(Op(req))
    return ops


@dataclass
class Result:
    name: str
    decisions: int
    seconds: float
    latencies: list[float]
    cpu: list[float]
    granted: int
    exhausted: int
    allocated: float

    def row(self) -> str:
        lat, cpu = sorted(self.latencies), sorted(self.cpu)
        p50 = statistics.median(lat) * 1e6
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6
        p99_cpu = cpu[min(len(cpu) - 1, int(len(cpu) * 0.99))] * 1e6
        return (
            f"{self.name:<34} {self.decisions:>8} {self.decisions / self.seconds:>11.0f} {p50:>9.0f} {p99:>9.0f} "
            f"{p99_cpu:>9.0f} {self.granted:>8} {self.exhausted:>9} {100 * self.allocated:>9.1f}%"
        )


def run(name: str, ops: list[Op], allocate: Callable[[Request], str], release: Callable[[str], None]) -> Result:
    live: list[str] = []
    lat: list[float] = []
    cpu: list[float] = []
    granted = exhausted = 0
    start = time.perf_counter()
    for op in ops:
        t0, c0 = time.perf_counter(), time.thread_time()
        if op.request is None:
            if not live:
                continue
            i = op.victim % len(live)
            live[i], live[-1] = live[-1], live[i]
            release(live.pop())
        else:
            try:
                live.append(allocate(op.request))
                granted += 1
            except ResourceExhausted:
                exhausted += 1
        lat.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return Result(name, len(lat), time.perf_counter() - start, lat, cpu, granted, exhausted, 0.0)


def in_process(name: str, store: Store, ops: list[Op], hosts: int) -> Result:
    core = Core(store, b"k" * 32, CoreConfig(lease_ttl=TTL, max_lease_ttl=TTL))
    for h in range(hosts):
        specs = [DeviceSpec(i, f"GPU-{h}-{i}", "A100-80GB", DEVICE_MEMORY) for i in range(GPUS_PER_HOST)]
        core.hosts.register(f"host{h:04d}", f"10.0.{h // 250}.{h % 250}:50051", specs)

    def allocate(req: Request) -> str:
        lease = core.allocate(req, tenant="bench")
        for i in range(len(lease.grants)):
            core.token(lease, i)  # a decision includes signing its tokens, as through gRPC
        return lease.lease_id

    result = run(name, ops, allocate, core.release)
    devices = [d for _, d in core.pool.up_devices()]
    result.allocated = sum(d.allocated_units for d in devices) / (SHARE_UNITS * len(devices))
    store.close()
    return result


def on_postgres(ops: list[Op], hosts: int) -> Result:
    """The PostgreSQL store against a throwaway server (the tests' helper: initdb/pg_ctl on a Unix socket)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
    from gpupool.scheduler.pgstore import PostgresStore
    from scheduler_fixtures import Postgres  # type: ignore[import-not-found]

    pg = Postgres()
    try:
        return in_process("in-process postgresql binpack", PostgresStore(pg.dsn), ops, hosts)
    finally:
        pg.stop()


def through_grpc(name: str, ops: list[Op], hosts: int, tmp: Path) -> Result:
    key = tmp / "key"
    if not key.exists():
        tokens.generate_key_file(key)
        os.environ.update(pki.loopback_env(tmp / "pki"))  # the scheduler and this process speak TLS
    state = tmp / f"{name.replace(' ', '_').replace('/', '_')}.db"
    log = (tmp / f"{state.stem}.log").open("w+")  # a file, not a pipe: 1,250 "registered" lines must not block it
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpupool.cli", "scheduler", "--listen", "127.0.0.1:0", "--metrics-listen", "0",
         "--state", str(state), "--token-key-file", str(key), "--lease-ttl", str(TTL), "--host-timeout", "1e9",
         "--tenant-max-leases", "0"],  # one tenant ("bench") holds thousands of leases here
        stderr=log, text=True,
    )  # fmt: skip
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"listening on \S+:(\d+)", Path(log.name).read_text())
            port = int(m.group(1)) if m else None
            time.sleep(0.1)
        assert port, "scheduler did not start"
        channel = tls.channel(f"127.0.0.1:{port}")
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for h in range(hosts):
            devices = [
                device_pb2.DeviceInfo(index=i, uuid=f"GPU-{h}-{i}", model="A100-80GB", memory_bytes=DEVICE_MEMORY)
                for i in range(GPUS_PER_HOST)
            ]
            stub.Register(
                scheduler_pb2.RegisterRequest(host_id=f"host{h:04d}", address=f"10.0.0.1:{h + 1}", devices=devices)
            )

        def allocate(req: Request) -> str:
            pb = scheduler_pb2.AllocateRequest(gpus=req.gpus, policy=req.policy, tenant="bench")
            if req.fraction is not None:
                pb.fraction = req.fraction
            else:
                pb.memory_bytes = req.memory_bytes or 0
            try:
                return str(stub.Allocate(pb, timeout=30).lease_id)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
                    raise ResourceExhausted(str(err.details())) from None  # type: ignore[attr-defined]
                raise

        def release(lease_id: str) -> None:
            stub.Release(scheduler_pb2.ReleaseRequest(lease_id=lease_id), timeout=30)

        result = run(name, ops, allocate, release)
        pool = stub.ListPool(scheduler_pb2.ListPoolRequest(), timeout=60)
        shares = [d.allocated_share for h in pool.hosts for d in h.devices]
        result.allocated = sum(shares) / len(shares)
        channel.close()
        return result
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=1250)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--grpc-requests", type=int, default=100_000, help="requests sent through gRPC (0: skip)")
    p.add_argument("--pg-requests", type=int, default=20_000, help="requests on the PostgreSQL store (0: skip)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    print(f"pool: {args.hosts} hosts x {GPUS_PER_HOST} = {args.hosts * GPUS_PER_HOST} devices of 80 GiB")
    results = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for policy in ("binpack", "spread"):
            ops = workload(args.requests, args.seed, policy)
            results.append(in_process(f"in-process memory {policy}", MemoryStore(), ops, args.hosts))
            print(results[-1].row(), file=sys.stderr)
        ops = workload(args.requests, args.seed, "binpack")
        results.append(in_process("in-process sqlite-wal binpack", SqliteStore(tmp / "bench.db"), ops, args.hosts))
        print(results[-1].row(), file=sys.stderr)
        if args.pg_requests:
            results.append(on_postgres(workload(args.pg_requests, args.seed, "binpack"), args.hosts))
            print(results[-1].row(), file=sys.stderr)
        if args.grpc_requests:
            for policy in ("binpack", "spread"):
                ops = workload(args.grpc_requests, args.seed, policy)
                results.append(through_grpc(f"gRPC sqlite-wal {policy}", ops, args.hosts, tmp))
                print(results[-1].row(), file=sys.stderr)
    print()
    print(
        f"{'run':<34} {'requests':>8} {'decisions/s':>11} {'p50 µs':>9} {'p99 µs':>9} {'p99 cpu':>9} "
        f"{'granted':>8} {'exhausted':>9} {'allocated':>10}"
    )
    for r in results:
        print(r.row())
    by = {r.name: r for r in results}
    bp, sp = by["in-process memory binpack"], by["in-process memory spread"]
    print(
        f"\nbinpack / spread, allocated fraction at the end: {bp.allocated / sp.allocated:.3f}  "
        f"(granted {bp.granted} vs {sp.granted})"
    )
    if args.pg_requests:
        pg, sq = by["in-process postgresql binpack"], by["in-process sqlite-wal binpack"]
        ratio = (sq.decisions / sq.seconds) / (pg.decisions / pg.seconds)
        print(f"sqlite / postgresql decisions per second (binpack, in-process): {ratio:.1f}")
    if args.grpc_requests:
        g = by["gRPC sqlite-wal binpack"]
        ratio = (bp.decisions / bp.seconds) / (g.decisions / g.seconds)
        print(f"in-process / gRPC decisions per second (binpack): {ratio:.1f}")
        print(f"gRPC rows ran the first {args.grpc_requests} of the {args.requests} requests (same seed).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
