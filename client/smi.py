"""`gpupool smi` (the pool at a glance, like nvidia-smi) and `gpupool list-gpus` (one line per GPU)."""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

from gpupool.client.pool import SchedulerClient
from rich.console import Console
from rich.table import Table

from gpupool import tls
from gpupool._proto import scheduler_pb2
from gpupool.config import add_flag, format_size
from gpupool.errors import GpupoolError

STATE_STYLE = {"up": "green", "down": "red", "draining": "yellow"}


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_flag(p, "--scheduler", default="", help="scheduler HOST:PORT (default 127.0.0.1:50050)")
    tls.add_client_flags(p)
    return p


def _fetch(args: argparse.Namespace) -> scheduler_pb2.PoolState | None:
    tls.export_client_args(args)
    client = SchedulerClient(args.scheduler or None)
    try:
        return client.list_pool()
    except GpupoolError as exc:
        print(f"gpupool: {exc}", file=sys.stderr)
        return None
    finally:
        client.close()


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def render(pool: scheduler_pb2.PoolState, console: Console) -> None:
    """Print the devices table and the leases table."""
    holders: dict[tuple[str, int], list[str]] = defaultdict(list)
    for lease in pool.leases:
        for ld in lease.devices:
            holders[(ld.host_id, ld.device)].append(f"{lease.tenant or '?'} {ld.share:.2g}")
    devices = Table(title="gpupool devices", title_justify="left")
    for col in ("host", "state", "gpu", "model", "memory used", "allocated", "capacity", "share", "tenants"):
        devices.add_column(col, justify="right" if col in ("gpu", "memory used", "allocated", "capacity") else "left")
    for h in pool.hosts:
        style = STATE_STYLE.get(h.state, "")
        for i, d in enumerate(h.devices):
            devices.add_row(
                h.host_id if i == 0 else "",
                f"[{style}]{h.state}[/]" if i == 0 else "",
                str(d.info.index),
                d.info.model,
                format_size(d.used_bytes),
                format_size(d.allocated_bytes),
                format_size(d.info.memory_bytes),
                _pct(d.allocated_share),
                ", ".join(holders.get((h.host_id, d.info.index), [])) or "-",
            )
    console.print(devices)
    leases = Table(title=f"leases ({len(pool.leases)} active, {pool.waiting} waiting)", title_justify="left")
    for col in ("lease", "tenant", "devices", "quota", "share", "expires in"):
        leases.add_column(col)
    now = time.time()
    for lease in pool.leases:
        leases.add_row(
            lease.lease_id[:12] or "(other tenant)",
            lease.tenant,
            ", ".join(f"{ld.host_id}/{ld.device}" for ld in lease.devices),
            ", ".join(format_size(ld.quota_bytes) for ld in lease.devices),
            ", ".join(f"{ld.share:.2g}" for ld in lease.devices),
            f"{max(0.0, lease.expires_at - now):.0f} s",
        )
    console.print(leases)


def main(argv: list[str]) -> int:
    args = _parser("gpupool smi", "Show the pool: hosts, devices, memory, shares, leases.").parse_args(argv)
    pool = _fetch(args)
    if pool is None:
        return 1
    render(pool, Console())
    return 0


def list_gpus_main(argv: list[str]) -> int:
    args = _parser("gpupool list-gpus", "List the pool's GPUs, one line each.").parse_args(argv)
    pool = _fetch(args)
    if pool is None:
        return 1
    for h in pool.hosts:
        for d in h.devices:
            print(
                f"{h.host_id}/{d.info.index}: {d.info.model}{' (fake)' if d.info.fake else ''} "
                f"(UUID: {d.info.uuid}) {format_size(d.info.memory_bytes)}, "
                f"{_pct(d.allocated_share)} allocated, {h.state}, {h.address}"
            )
    return 0
