"""`gpupool host drain|undrain|remove HOST`: operator commands on the scheduler's hosts; `gpupool lease release|terms`.

- ``drain``: no new leases are placed on the host; the leases it holds run on (until released or expired).
  It stays drained across scheduler restarts and re-registrations, until ``undrain``.
- ``remove``: forget a host that is gone for good. Refused while it holds active leases unless ``--force``
  (they are then lost, and their clients told so at their next renewal). A daemon that is still running
  registers again at its next heartbeat: stop it first.

`gpupool lease terms LEASE... | --tenant NAME (--fraction F | --memory SIZE) [--share S]` (operators) changes active
leases' terms: the scheduler accounts them at once (refused, nothing changed, where they do not fit a device beside
its other leases, or a raise does not fit the free memory its daemon measures: RESOURCE_EXHAUSTED), the next renewal's
tokens carry them, and the sessions hold them from that refresh on (a quota below what a session holds refuses its
allocations until it frees below it; nothing is taken).

`gpupool lease release LEASE... | --tenant NAME` ends leases now: their capacity goes back, their daemons close
their sessions and refuse their tokens at their next heartbeat. An operator's way to end the leases of a tenant
whose credential was removed (removing it ends the tenant's calls to the scheduler, not its leases, whose tokens
admit sessions until they expire: docs/security.md); a tenant may release its own. A lease is named by its id or a
prefix of it that names one (`gpupool smi` shows 12 characters).

`gpupool cert revoke|unrevoke|list` (operators): the scheduler's list of revoked client certificates, each named by
a certificate file (PEM) or its fingerprint (`sha256:<hex>`, as `openssl x509 -noout -fingerprint -sha256` prints
it). The scheduler refuses a revoked certificate on every call from then on and keeps the list in its state; its
daemons refuse it on every call too (those that see client certificates: `--tls-client-auth require`) from their
next heartbeat; the status tokens minted before a revocation are refused. The leases allocated with the certificate
end (round 46: their tokens were bound to it); the tenant's others (allocated with an API token, by an operator for it,
or before round 46) run on until they end: release them (`gpupool lease release --tenant NAME`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from gpupool import certrevoke
from gpupool.config import add_flag, format_size, parse_size
from gpupool.errors import GpupoolError

from .pool import SchedulerClient


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpupool host", description=__doc__.split(";")[0] + ".")
    p.add_argument("action", choices=("drain", "undrain", "remove"), help="what to do with the host")
    p.add_argument("host_id", help="the host's id (as `gpupool smi` shows it)")
    p.add_argument("--force", action="store_true", help="remove: even if it holds active leases (they are lost)")
    add_flag(p, "--scheduler", default="", help="scheduler HOST:PORT[,HOST:PORT...] (none given: 127.0.0.1:50050)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    def act(client: SchedulerClient) -> int:
        if args.action == "remove":
            lost = client.remove_host(args.host_id, args.force)
            print(f"host {args.host_id} removed" + (f"; {lost} lease(s) lost" if lost else ""))
        else:
            client.drain_host(args.host_id, undo=args.action == "undrain")
            print(f"host {args.host_id} {'drained' if args.action == 'drain' else 'back in placement'}")
        return 0

    return _on_scheduler(args.scheduler, f"host {args.action}", act)


def _on_scheduler(address: str, what: str, act: Callable[[SchedulerClient], int]) -> int:
    """`act` on a client of the scheduler at `address` (default: the environment's); a refusal in one line."""
    client = SchedulerClient(address or None)
    try:
        return act(client)
    except GpupoolError as exc:
        print(f"gpupool {what}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def lease_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="gpupool lease",
        description="End leases now (operators: any tenant's; tenants: their own), or change their terms (operators: "
        "`terms`, a new quota and share on each of their devices, which their sessions hold from the lease's next "
        "renewal on; a raise must fit beside the device's other leases and the free memory its daemon measures).",
    )
    p.add_argument("action", choices=("release", "terms"), help="what to do with the leases")
    p.add_argument("leases", nargs="*", help="lease ids, or prefixes that name one (as `gpupool smi` shows them)")
    p.add_argument("--tenant", default="", help="every active lease of this tenant (its credential removed, say)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "-p", "--fraction", type=float, default=None,
        help="terms: the new fraction of each device (quota = fraction x its memory, share = fraction)",
    )  # fmt: skip
    size.add_argument(
        "-m", "--memory", default=None,
        help="terms: the new memory quota on each device, e.g. 4GiB (share = memory / the device's, unless --share)",
    )  # fmt: skip
    p.add_argument("--share", type=float, default=0.0, help="terms: the new compute share on each device, in (0, 1]")
    add_flag(p, "--scheduler", default="", help="scheduler HOST:PORT[,HOST:PORT...] (none given: 127.0.0.1:50050)")
    args = p.parse_args(argv)
    if not args.leases and not args.tenant:
        p.error("name the leases, or --tenant")
    sized = args.fraction is not None or args.memory is not None or args.share
    if (args.action == "terms") != bool(sized):
        p.error("terms: give --fraction, --memory or --share" if args.action == "terms" else "release takes no terms")
    try:
        memory = parse_size(args.memory) if args.memory is not None else None
    except ValueError as exc:
        p.error(f"--memory: {exc}")

    def act(client: SchedulerClient) -> int:
        shown = [x for x in client.list_pool().leases if x.lease_id]  # a tenant is shown the ids of its own only
        chosen = {x.lease_id for x in shown if x.tenant == args.tenant} if args.tenant else set()
        for given in args.leases:
            hits = [x.lease_id for x in shown if given and x.lease_id.startswith(given)]
            if len(hits) != 1:
                what = "no active lease you may see" if not hits else f"{len(hits)} leases"
                print(f"gpupool lease {args.action}: {given!r} names {what}", file=sys.stderr)
                return 1
            chosen.add(hits[0])
        for lease_id in sorted(chosen):
            if args.action == "release":
                client.release(lease_id)
                print(f"lease {lease_id} released")
                continue
            lease = client.set_lease_terms(lease_id, args.fraction, memory, args.share)
            terms = ", ".join(
                f"{d.host_id}/{d.device} {format_size(d.quota_bytes)} share {d.share:g}" for d in lease.devices
            )
            print(f"lease {lease_id}: {terms} (its sessions hold them from its next renewal)")
        if not chosen:
            print(f"no active lease of tenant {args.tenant!r}")
        return 0

    return _on_scheduler(args.scheduler, f"lease {args.action}", act)


def cert_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="gpupool cert",
        description="Operators: revoke client certificates of the pool (the scheduler refuses them on every call, and "
        "its daemons from their next heartbeat; the leases allocated with them end), take a revocation back, or list "
        "them.",
    )
    p.add_argument("action", choices=("revoke", "unrevoke", "list"), help="what to do")
    p.add_argument(
        "certificates", nargs="*", help="certificate files (PEM) or fingerprints (sha256:<hex>, colons allowed)"
    )
    p.add_argument("--note", default="", help="revoke: kept with the revocation (who, why; 256 characters at most)")
    add_flag(p, "--scheduler", default="", help="scheduler HOST:PORT[,HOST:PORT...] (none given: 127.0.0.1:50050)")
    args = p.parse_args(argv)
    if args.action != "list" and not args.certificates:
        p.error("name the certificates (files or fingerprints)")
    try:
        named = [certrevoke.fingerprint_given(x) for x in args.certificates]
    except (GpupoolError, OSError) as exc:
        print(f"gpupool cert {args.action}: {exc}", file=sys.stderr)
        return 1

    def act(client: SchedulerClient) -> int:
        revoke, unrevoke = (named, []) if args.action == "revoke" else ([], named)
        reply = client.revoke_certificates(revoke, unrevoke, args.note)
        for fp in named:
            print(f"{fp} {'revoked' if args.action == 'revoke' else 'no longer revoked'}")
        if args.action == "list":
            for r in reply.revoked:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.revoked_at))
                note = r.note.encode("unicode_escape").decode()
                print(f"{r.fingerprint}  {when} UTC  {note}".rstrip())
            if not reply.revoked:
                print("no client certificate is revoked")
        return 0

    return _on_scheduler(args.scheduler, f"cert {args.action}", act)
