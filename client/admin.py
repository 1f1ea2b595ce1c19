"""`gpupool host drain|undrain|remove HOST`: operator commands on the scheduler's hosts.

- ``drain``: no new leases are placed on the host; the leases it holds run on (until released or expired).
  It stays drained across scheduler restarts and re-registrations, until ``undrain``.
- ``remove``: forget a host that is gone for good. Refused while it holds active leases unless ``--force``
  (they are then lost, and their clients told so at their next renewal). A daemon that is still running
  registers again at its next heartbeat: stop it first.
"""

from __future__ import annotations

import argparse
import sys

from gpupool.config import add_flag
from gpupool.errors import GpupoolError

from .pool import SchedulerClient


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpupool host", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("drain", "undrain", "remove"), help="what to do with the host")
    p.add_argument("host_id", help="the host's id (as `gpupool smi` shows it)")
    p.add_argument("--force", action="store_true", help="remove: even if it holds active leases (they are lost)")
    add_flag(p, "--scheduler", default="", help="scheduler HOST:PORT[,HOST:PORT...] (default 127.0.0.1:50050)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    client = SchedulerClient(args.scheduler or None)
    try:
        if args.action == "remove":
            lost = client.remove_host(args.host_id, args.force)
            print(f"host {args.host_id} removed" + (f"; {lost} lease(s) lost" if lost else ""))
        else:
            client.drain_host(args.host_id, undo=args.action == "undrain")
            print(f"host {args.host_id} {'drained' if args.action == 'drain' else 'back in placement'}")
        return 0
    except GpupoolError as exc:
        print(f"gpupool host {args.action}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
