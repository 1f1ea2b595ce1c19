"""What round 45's revocations cost (control45): a daemon's revocations file (server/revocations.py) written and read
back at N lease revocations, the check of a call's client certificate against the revoked list (gpupool/certrevoke.py,
the scheduler's every call and the daemon's where it sees certificates), and a heartbeat reply's bytes with the list.

    python bench/revocation_costs.py [--sizes 1000,20000,200000] [--repeat 5]

Wall times in this process (medians of --repeat; the box is noisy: quote the load), bytes exact. No base to compare
with: f47ac67 had none of it (its daemon held the revocations in memory only, its scheduler no list).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid

from gpupool.server.revocations import Heard, RevocationFile

from gpupool import certrevoke
from gpupool._proto import scheduler_pb2


def _median(f: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,20000,200000", help="lease revocations in the file")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    print(f"load {os.getloadavg()[0]:.1f}")
    print(f"{'leases':>8} {'file bytes':>11} {'save ms':>8} {'load ms':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            until = time.time() + 3600
            heard = Heard("h", time.time(), {uuid.uuid4().hex: until + i for i in range(n)}, time.time(), [], "v1:x")
            f = RevocationFile(os.path.join(tmp, f"s{n}"), "h")
            save = _median(lambda f=f, heard=heard, n=n: f.save(heard, (n,)), args.repeat)
            load = _median(lambda f=f: f.load(), args.repeat)
            size = os.path.getsize(f.path)
            print(f"{n:>8} {size:>11} {save * 1e3:>8.1f} {load * 1e3:>8.1f}")

    pem = b"-----BEGIN CERTIFICATE-----\n" + b"MIIB" + b"A" * 600 + b"\n-----END CERTIFICATE-----\n"
    calls = 100_000
    print(f"\n{'revoked certs':>13} {'check ns/call':>14}")
    for count in (0, 10_000):
        revoked = certrevoke.RevokedCerts(f"sha256:{i:064x}" for i in range(count))
        revoked.refused_pem(pem)  # (cached from the first call on, as a connection's certificate is)

        def check(revoked: certrevoke.RevokedCerts = revoked) -> None:
            for _ in range(calls):
                if len(revoked):
                    revoked.refused_pem(pem)

        print(f"{count:>13} {_median(check, args.repeat) / calls * 1e9:>14.0f}")

    print(f"\n{'revoked certs':>13} {'reply bytes (changed)':>22} {'(unchanged)':>12}")
    for count in (0, 100, 10_000):
        fps = [f"sha256:{i:064x}" for i in range(count)]
        changed = scheduler_pb2.HeartbeatReply(
            revoked_certificates=fps, revoked_certificates_version=certrevoke.version_of(fps)
        )
        same = scheduler_pb2.HeartbeatReply(revoked_certificates_version=certrevoke.version_of(fps))
        print(f"{count:>13} {changed.ByteSize():>22} {same.ByteSize():>12}")


if __name__ == "__main__":
    main()
