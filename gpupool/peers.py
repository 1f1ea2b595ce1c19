"""Source addresses of network peers, as the unit that per-address limits count by (the scheduler's failed
authentications, the collective hub's handshakes).

An IPv4 address counts as itself (also when it arrives IPv4-mapped on a dual-stack socket); an IPv6 address
counts by its /64 by default, the smallest block a host is usually given (one host could otherwise take 2^64
addresses); by itself where the peers to keep apart are hosts of one subnet (the collective hub, on the daemons'
private network)."""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Sequence
from urllib.parse import unquote


def source_key(address: str, v6_prefix: int = 64) -> str:
    """The counting unit of an IP address ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1%eth0"): IPv6 by its
    first `v6_prefix` bits (128: each address alone); anything that is not an IP address counts as itself."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, v6_prefix), strict=False))
    return str(ip)


def grpc_source(peer: str) -> str:
    """The counting unit of a gRPC peer string: "ipv4:1.2.3.4:5678", "ipv6:[::1]:5678" (or URL-quoted,
    "ipv6:%5B::1%5D:5678"); other kinds ("unix:...") count as the whole string."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        return source_key(rest.rsplit(":", 1)[0])
    if kind == "ipv6":
        return source_key(rest.rsplit(":", 1)[0].strip("[]"))
    return peer


def push_out(
    sources: Sequence[str], new: str, per_source: int, total: int, held: Sequence[bool] = ()
) -> tuple[int, bool] | None:
    """The policy of a listener whose unauthenticated connections are capped (the collective hub, the bulk side
    port): a newcomer from `new` is never refused; past `per_source` connections of its own source it pushes out
    that source's oldest, past `total` in all the oldest of the source holding the most. `sources`: the pending
    connections' sources in arrival order. Returns (the index of the one to push out, whether it was its own
    source's cap), or None.

    (link56) `held`, one flag per pending connection: those that vouched for themselves already (rank 0's store
    front: a hello keyed with the group's secret) are never pushed out. A newcomer pushes out the oldest one not
    held of its source (past `total`: of the busiest source that has one), and where there is none it is turned
    away itself (index -1). So strangers on the ranks' own address, opening connections as fast as they like,
    push out only each other's, never a rank's that has said its hello."""
    flags = list(held) or [False] * len(sources)
    mine = [i for i, source in enumerate(sources) if source == new]
    if len(mine) >= per_source:
        return next((i for i in mine if not flags[i]), -1), True
    if len(sources) >= total:
        counts = collections.Counter(sources)
        free = [i for i in range(len(sources)) if not flags[i]]
        if not free:
            return -1, False
        busiest = max(counts[sources[i]] for i in free)
        return next(i for i in free if counts[sources[i]] == busiest), False
    return None


def grown_caps(expected: int, per_source: int, total: int, most: int) -> tuple[int, int]:
    """(sec55a, link56) A listener's caps on handshakes in progress where `expected` peers (the group's ranks, fixed
    by the join, never by a connection) may all dial from one host: per source `expected`, `per_source` at least and
    `most` at most, and in all `total` plus twice that growth, so that one source at its cap never makes a rank's
    own host the busiest."""
    grown = min(max(per_source, expected), most)
    return grown, total + 2 * (grown - per_source)
