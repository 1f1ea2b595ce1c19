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


def push_out(sources: Sequence[str], new: str, per_source: int, total: int) -> tuple[int, bool] | None:
    """The policy of a listener whose unauthenticated connections are capped (the collective hub, the bulk side
    port): a newcomer from `new` is never refused; past `per_source` connections of its own source it pushes out
    that source's oldest, past `total` in all the oldest of the source holding the most. `sources`: the pending
    connections' sources in arrival order. Returns (the index of the one to push out, whether it was its own
    source's cap), or None."""
    mine = [i for i, source in enumerate(sources) if source == new]
    if len(mine) >= per_source:
        return mine[0], True
    if len(sources) >= total:
        counts = collections.Counter(sources)
        busiest = max(counts.values())
        return next(i for i, source in enumerate(sources) if counts[source] == busiest), False
    return None
