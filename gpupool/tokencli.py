"""`gpupool token`: the pool's keys and credentials by hand.

gpupool token keygen KEY [--public PUB]   a new Ed25519 signing key (scheduler), and its public key (daemons)
gpupool token public-key --token-key-file KEY   print the public key (append it to the daemons' key file)
gpupool token api-token --role tenant --name alice --credentials FILE --out alice.token
                                          a new API token (tenant, host join token, admin) and its credentials line
gpupool token [mint] --token-key-file KEY --host H --device 0 [--cert FILE] ...
                                          sign a lease token (daemons without a scheduler)
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
import sys
import time
import uuid
from pathlib import Path

from gpupool import certrevoke, tokens
from gpupool.config import add_flag, size_arg, write_secret
from gpupool.errors import GpupoolError

ROLES = ("tenant", "host", "admin")
NAME = re.compile(r"[^\s#]{1,128}")  # what one field of a credentials line can hold (scheduler/auth.py)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpupool token [mint]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flag(p, "--token-key-file", help="the scheduler's Ed25519 private key (PEM)")
    add_flag(p, "--host", default=socket.gethostname(), help="host id of the daemon the token is for")
    add_flag(p, "--device", type=int, default=0, help="device index on that host")
    add_flag(p, "--fraction", type=float, default=1.0, help="compute share in [1e-06, 1]; quota = fraction x capacity")
    add_flag(p, "--memory", type=size_arg, default=0, help="memory quota (e.g. 6GiB) instead of the fraction's")
    add_flag(p, "--ttl", type=float, default=3600.0, help="seconds until the token expires (at most a day)")
    add_flag(p, "--tenant", default="", help="tenant name shown in metrics")
    add_flag(p, "--lease-id", default="", help="lease id (default: a new random one)")
    p.add_argument(
        "--cert",
        default="",
        metavar="FILE",
        help="bind the token to this client certificate (a PEM file, or its fingerprint sha256:HEX), as the scheduler "
        "binds a lease allocated with one: a daemon under --tls-client-auth require then attaches it only for that "
        "certificate (a leaked token is worth nothing without its key); unbound (anyone's) without it",
    )
    p.add_argument(
        "--network",
        action="store_true",
        help="let the session's worker open TCP sockets (collectives of a lease of several devices; the daemon's "
        "--worker-network must be on too)",
    )
    return p


def _mint(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not tokens.MIN_SHARE <= args.fraction <= 1.0:
        print(f"gpupool token: --fraction must be in [{tokens.MIN_SHARE:g}, 1]", file=sys.stderr)
        return 2
    if not 0 < args.ttl <= tokens.MAX_TTL:
        print(f"gpupool token: --ttl must be in (0, {tokens.MAX_TTL:g}]", file=sys.stderr)
        return 2
    signer = tokens.load_signer(args.token_key_file)
    cert = certrevoke.fingerprint_given(args.cert) if args.cert else ""
    claims = tokens.TokenClaims(
        lease_id=args.lease_id or uuid.uuid4().hex,
        host=args.host,
        device=args.device,
        quota_bytes=args.memory,
        share=args.fraction,
        expires_at=time.time() + args.ttl,
        tenant=args.tenant,
        network=args.network,
        cert=cert,
    )
    print(tokens.mint(signer, claims))
    return 0


def _keygen(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpupool token keygen", description="Write a new Ed25519 token signing key.")
    p.add_argument("key", help="private key file to write (owner-only); the scheduler's --token-key-file")
    p.add_argument("--public", help="also write the public key here (the daemons' --token-public-keys)")
    args = p.parse_args(argv)
    signer = tokens.generate_key_file(args.key, args.public)
    print(f"key id {signer.kid}", file=sys.stderr)
    return 0


def _public_key(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpupool token public-key", description="Print the public key of a signing key.")
    add_flag(p, "--token-key-file", help="the scheduler's Ed25519 private key (PEM)")
    args = p.parse_args(argv)
    sys.stdout.write(tokens.public_pem(tokens.load_signer(args.token_key_file).public).decode())
    return 0


def _api_token(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpupool token api-token", description="Make an API token for the scheduler.")
    p.add_argument("--role", choices=ROLES, default="tenant", help="tenant, host (a join token) or admin")
    p.add_argument("--name", required=True, help="tenant name, host id or operator name")
    add_flag(p, "--credentials", help="the scheduler's credentials file to append the token's hash to")
    p.add_argument("--out", required=True, help="file to write the token to (owner-only)")
    args = p.parse_args(argv)
    if not args.credentials:
        p.error("--credentials is required")
    from gpupool.scheduler.auth import credential_line  # the hash format is the scheduler's

    if not NAME.fullmatch(args.name):  # a space or newline would break (or add) lines of the credentials file
        p.error(f"--name {args.name!r}: 1-128 characters, no spaces and no '#'")
    token = secrets.token_urlsafe(32)
    write_secret(args.out, (token + "\n").encode())  # a new 0600 file: an existing --out's mode or readers count not
    fd = os.open(args.credentials, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(credential_line(args.role, args.name, token))
    print(f"{args.role} {args.name}: token in {Path(args.out)}, hash appended to {args.credentials}", file=sys.stderr)
    return 0


COMMANDS = {"keygen": _keygen, "public-key": _public_key, "api-token": _api_token, "mint": _mint}


def main(argv: list[str]) -> int:
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else _mint(argv)
    except GpupoolError as exc:
        print(f"gpupool token: {exc.message}", file=sys.stderr)
        return 1
