"""One host credential flooding the scheduler with heartbeats, and what a tenant's calls cost meanwhile: this
checkout's `gpupool scheduler` against another checkout's, side by side in one run (round 40, `--host-heartbeat-rate`).

Each side starts a real `gpupool scheduler` process (plaintext on loopback, API tokens from a credentials file: a host
join token and a tenant's), registers the host, then measures a tenant's ListPool latency idle, and again while
`--threads` threads of the host heartbeat as fast as they can, each heartbeat naming `--sessions` session lease ids
(each a lookup under the core's lock), or (`--flood listpool`) call ListPool with the host's credential. Prints calls
served and refused a second, the tenant's ListPool p50/p90, and the scheduler process's CPU meanwhile (% of one core,
and microseconds a flooding call, served or refused: /proc/PID/stat).

Round 43 (hostile43): `--flood tenant` (the tenant's own ListPool past `--tenant-rate`: refused) and `--flood stranger`
(an unknown API token: refused, past `--auth-fail-rate` before the credentials are read), and `--measure heartbeat`:
the host's heartbeats (one every 0.25 s, under its `--host-heartbeat-rate`) timed instead of the tenant's ListPool,
with their longest: whether refused calls make a real host's heartbeats late.

    nice -n 5 .venv/bin/python bench/heartbeat_flood.py --against /work/wt/base \
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from gpupool import tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
HOST_TOKEN, TENANT_TOKEN = "bench-host-token", "bench-tenant-token"


def _line(role: str, name: str, token: str) -> str:
    return f"{role} {name} sha256:{hashlib.sha256(token.encode()).hexdigest()}\n"


def _start(python: str, checkout: Path, tmp: Path) -> tuple[subprocess.Popen[str], str]:
    creds = tmp / "credentials"
    creds.write_text(_line("host", "h1", HOST_TOKEN) + _line("tenant", "alice", TENANT_TOKEN))
    creds.chmod(0o600)
    tokens.generate_key_file(tmp / "key")
    cmd = [python, "-m", "gpupool.cli", "scheduler", "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--insecure"]
    cmd += ["--credentials", str(creds), "--state", str(tmp / "state.db"), "--token-key-file", str(tmp / "key")]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env = {k: v for k, v in env.items() if not k.startswith("GPUPOOL_TLS")}
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        print(f"  {checkout.name}: {line.rstrip()}", file=sys.stderr)
        m = re.search(r"listening on (\S+:\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
            return proc, m.group(1)
    raise SystemExit(f"{checkout}: the scheduler did not start")


def _cpu(pid: int) -> float:
    """The process's CPU seconds (user + system) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _listpools(stub: scheduler_pb2_grpc.SchedulerStub, n: int) -> list[float]:
    md = (("authorization", f"Bearer {TENANT_TOKEN}"),)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        stub.ListPool(scheduler_pb2.ListPoolRequest(), metadata=md, timeout=30)
        out.append(time.perf_counter() - t)
    return out


def _beats(stub: scheduler_pb2_grpc.SchedulerStub, n: int) -> list[float]:
    md = (("authorization", f"Bearer {HOST_TOKEN}"),)
    beat = scheduler_pb2.HeartbeatRequest(host_id="h1")
    out = []
    for _ in range(n):
        t = time.perf_counter()
        stub.Heartbeat(beat, metadata=md, timeout=30)
        out.append(time.perf_counter() - t)
        time.sleep(0.25)
    return out


def _side(python: str, checkout: Path, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        proc, address = _start(python, checkout, Path(d))
        channel = grpc.insecure_channel(address)
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        host = (("authorization", f"Bearer {HOST_TOKEN}"),)
        try:
            info = device_pb2.DeviceInfo(index=0, uuid="GPU-0", model="fake", memory_bytes=1 << 30, fake=True)
            register = scheduler_pb2.RegisterRequest(host_id="h1", address="127.0.0.1:40001", devices=[info])
            stub.Register(register, metadata=host, timeout=30)
            measure = _beats if args.measure == "heartbeat" else _listpools
            idle = measure(stub, args.calls)
            sessions = [device_pb2.SessionUsage(lease_id=f"{i:032x}") for i in range(args.sessions)]
            beat = scheduler_pb2.HeartbeatRequest(host_id="h1", sessions=sessions)
            counts = {"served": 0, "refused": 0}
            stop = threading.Event()

            caller = {"tenant": TENANT_TOKEN, "stranger": "not-a-token-of-this-pool"}.get(args.flood)
            flooder = (("authorization", f"Bearer {caller}"),) if caller else host

            def flood() -> None:
                listing = scheduler_pb2.ListPoolRequest()
                while not stop.is_set():
                    try:
                        if args.flood != "heartbeat":
                            stub.ListPool(listing, metadata=flooder, timeout=30)
                        else:
                            stub.Heartbeat(beat, metadata=host, timeout=30)
                        counts["served"] += 1
                    except grpc.RpcError:
                        counts["refused"] += 1

            threads = [threading.Thread(target=flood) for _ in range(args.threads)]
            for t in threads:
                t.start()
            time.sleep(args.warm)  # (past the host's burst, where there is a limit)
            before, t0, cpu0 = dict(counts), time.monotonic(), _cpu(proc.pid)
            busy = measure(stub, args.calls)
            dt, cpu = time.monotonic() - t0, _cpu(proc.pid) - cpu0
            calls = counts["served"] - before["served"] + counts["refused"] - before["refused"]
            stop.set()
            for t in threads:
                t.join()
            return {
                "served/s": (counts["served"] - before["served"]) / dt,
                "refused/s": (counts["refused"] - before["refused"]) / dt,
                "idle p50 ms": statistics.median(idle) * 1e3,
                "flood p50 ms": statistics.median(busy) * 1e3,
                "flood p90 ms": statistics.quantiles(busy, n=10)[-1] * 1e3,
                "flood max ms": max(busy) * 1e3,
                "sched CPU %": cpu / dt * 100,
                "CPU us/beat": cpu / max(1, calls) * 1e6,
            }
        finally:
            channel.close()
            proc.terminate()
            proc.wait(20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", type=Path, required=True, help="the other checkout")
    p.add_argument("--against-python", default=sys.executable, help="its python (its venv's)")
    p.add_argument("--threads", type=int, default=4, help="heartbeating threads of the one host")
    p.add_argument(
        "--sessions", type=int, default=4000, help="session lease ids in each heartbeat (round 41: at most 4,096)"
    )
    p.add_argument(
        "--flood",
        choices=("heartbeat", "listpool", "tenant", "stranger"),
        default="heartbeat",
        help="what the threads call (listpool: the host's ListPool, limited by --tenant-rate since round 41; tenant: "
        "the tenant's ListPool; stranger: ListPool with an unknown token)",
    )
    p.add_argument("--measure", choices=("listpool", "heartbeat"), default="listpool", help="what is timed")
    p.add_argument("--calls", type=int, default=60, help="ListPool calls measured, idle and under the flood")
    p.add_argument("--warm", type=float, default=12.0, help="seconds of flood before measuring")
    a = p.parse_args()
    sides = {"this": _side(sys.executable, ROOT, a), "against": _side(a.against_python, a.against, a)}
    keys = list(sides["this"])
    print(f"{'':>10} " + " ".join(f"{k:>13}" for k in keys))
    for name, row in sides.items():
        print(f"{name:>10} " + " ".join(f"{row[k]:13.1f}" for k in keys))
    ratios = [sides["this"][k] / sides["against"][k] if sides["against"][k] else None for k in keys]
    print(f"{'ratio':>10} " + " ".join(f"{r:13.2f}" if r is not None else f"{'-':>13}" for r in ratios))


if __name__ == "__main__":
    main()
