"""What a group's rendezvous keeps in rank 0's store (front54: the bound of server/collectives.py `MAX_STORE_BYTES`,
`MAX_FRONT_KEYS`), measured: one process forms a group of `--ranks` ranks (threads) over a real `_store_master`,
every rank > 0's store a client through the front (`_connect_store` with the group's key), rank 0's the store's own
client as the daemon's (sec55b: counted too, `_CountedStore`), for each transport; prints the front's `_StoreTally`
high-water marks (bytes, keys) and (sec55b) of bytes in flight through the front, all connections (`MAX_FRONT_FLYING`);
the bound of bytes kept is MAX_STORE_BYTES and (store56) the group's ranks' room (`_StoreTally.room`).

    nice -n 5 python bench/store_front_tally.py --ranks 32
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid

import torch
from gpupool.server import collectives as c


def measure(transport: str, ranks: int, timeout: float) -> tuple[int, int, int, float, list[str]]:
    lease = uuid.uuid4().hex
    secret = c.group_secret(lease)
    owner = "owner-" + lease
    key = c._front_key(secret)
    master, front = c.seclink.bind_in(
        c.COLLECTIVE_PORTS,
        lambda port: c._store_master("127.0.0.1", port, ranks, timeout, key, c.COLLECTIVE_PORTS, lease),
    )
    groups = [c.Group(lease, r, ranks, timeout, transport) for r in range(ranks)]
    stores: list[object] = [None] * ranks

    def rank(r: int) -> None:
        if r == 0:
            stores[r] = master
        else:
            stores[r] = c._connect_store(["127.0.0.1"], front.port, ranks, timeout, groups[r].stop, key=key)
        groups[r].form(stores[r], owner, secret, "127.0.0.1", torch.device("cpu"))

    start = time.monotonic()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - start
    broken = [g.broken for g in groups if g.broken]
    for g in groups:
        g.close()
    front.close()
    return front.tally.peak_bytes, front.tally.peak_keys, front.tally.peak_flying, took, broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--transports", default="gloo,secure")
    args = parser.parse_args()
    kept = c.MAX_STORE_BYTES + c._StoreTally(args.ranks).room  # (store56: grows with the group's ranks)
    print(f"{'transport':>10} {'ranks':>6} {'bytes kept':>11} {'keys':>6} {'in flight':>10} {'formed in':>10}  "
          f"(bounds: {kept} bytes, {c.MAX_FRONT_KEYS} keys, {c.MAX_FRONT_FLYING} in flight)")  # fmt: skip
    for transport in args.transports.split(","):
        peak, keys, flying, took, broken = measure(transport, args.ranks, args.timeout)
        done = broken[:1] or "formed"
        print(f"{transport:>10} {args.ranks:>6} {peak:>11} {keys:>6} {flying:>10} {took:>9.1f}s  {done}")


if __name__ == "__main__":
    main()
