"""`gpupool token`: mint a lease token by hand, for daemons run without a scheduler and for tests."""

from __future__ import annotations

import argparse
import socket
import sys
import time
import uuid

from gpupool import tokens
from gpupool.config import add_flag, size_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpupool token", description=__doc__)
    add_flag(p, "--token-key-file", help="file with the key shared with the daemons")
    add_flag(p, "--host", default=socket.gethostname(), help="host id of the daemon the token is for")
    add_flag(p, "--device", type=int, default=0, help="device index on that host")
    add_flag(p, "--fraction", type=float, default=1.0, help="compute share in (0, 1]; quota = fraction x capacity")
    add_flag(p, "--memory", type=size_arg, default=0, help="memory quota (e.g. 6GiB) instead of the fraction's")
    add_flag(p, "--ttl", type=float, default=3600.0, help="seconds until the token expires")
    add_flag(p, "--tenant", default="", help="tenant name shown in metrics")
    add_flag(p, "--lease-id", default="", help="lease id (default: a new random one)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.fraction <= 1.0:
        print("gpupool token: --fraction must be in (0, 1]", file=sys.stderr)
        return 2
    key = tokens.load_key(args.token_key_file)
    claims = tokens.TokenClaims(
        lease_id=args.lease_id or uuid.uuid4().hex,
        host=args.host,
        device=args.device,
        quota_bytes=args.memory,
        share=args.fraction,
        expires_at=time.time() + args.ttl,
        tenant=args.tenant,
    )
    print(tokens.mint(key, claims))
    return 0
