"""What round 46's lease token binding (sec46) adds per call: the scheduler's fingerprints of an Allocate's client
certificate (its DER's SHA-256 and its ECDSA twins'), a daemon's check of a bound token at Attach (the caller's PEM
fingerprinted and compared), its check of a session's holder (Stream, Detach, RefreshToken: a bytes compare), and a
token's verification with and without the `cert` claim (its bytes too).

    python bench/lease_binding.py [--measure cpu|instr] [--n 2000]

cpu: wall medians per call in this process (5 runs of --n calls; quote the load). instr: instructions per call under
callgrind (the figures of record), each item in its own window. No A/B run: 67a03c05 did none of it (its Attach
verified the token alone, as the unbound row does); no per-op path changed (the holder check runs once per Stream call,
never per frame).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cgtools

from gpupool import certrevoke, pki, tokens


def _items(tmp: Path) -> dict[str, Callable[[], object]]:
    ca = pki.LocalCA(tmp / "ca")
    pem = ca.issue("tenant", "bench").cert.read_bytes()
    other = ca.issue("tenant", "other").cert.read_bytes()
    fp = certrevoke.fingerprint_pem(pem)
    signer = tokens.Signer.from_seed(b"bench46")
    verifier = tokens.Verifier([signer.public])
    claims = tokens.TokenClaims("lease", "host", 0, 1 << 30, 0.5, time.time() + 3600, "bench")
    unbound = tokens.mint(signer, claims)
    bound = tokens.mint(signer, tokens.TokenClaims(**{**claims.__dict__, "cert": fp}))
    print(f"token bytes: unbound {len(unbound)}, bound {len(bound)} (+{len(bound) - len(unbound)})")
    session_pem = bytes(pem)  # (the session's copy: gRPC hands each call its own bytes)
    return {
        "verify unbound token": lambda: verifier.verify(unbound),
        "verify bound token": lambda: verifier.verify(bound),
        "Allocate: certificate's fingerprints": lambda: " ".join(
            certrevoke.fingerprints_der(certrevoke.der_of_pem(pem))
        ),
        "Attach: bound token's check": lambda: certrevoke.fingerprint_pem(pem) == fp,
        "Stream/Detach: holder's check": lambda: pem != session_pem and other != session_pem,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--measure", choices=("cpu", "instr"), default="cpu")
    p.add_argument("--n", type=int, default=2000, help="calls per run (instr: per window)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # under callgrind: the windows
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.measure == "instr" and not args.inner:
            return _under_callgrind(Path(tmp), args.n)
        items = _items(Path(tmp))
        if args.inner:
            for i, (name, f) in enumerate(items.items()):
                f()  # (warm: its caches, its first-call imports)
                with cgtools.instrumented():
                    for _ in range(args.n):
                        f()
                cgtools.control(f"--dump=item{i}")
                print(f"item{i}\t{name}", flush=True)
            return 0
        print(f"load {os.getloadavg()[0]:.1f}")
        for name, f in items.items():
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(args.n):
                    f()
                runs.append((time.perf_counter() - t0) / args.n)
            print(f"{name:<40} {statistics.median(runs) * 1e6:8.2f} us/call (median of 5 x {args.n})")
    return 0


def _under_callgrind(tmp: Path, n: int) -> int:
    out = tmp / "cg.out"
    cmd = [*cgtools.valgrind(out), sys.executable, str(Path(__file__)), "--inner", "--n", str(n)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
    names = dict(line.split("\t", 1) for line in done.stdout.splitlines() if line.startswith("item"))
    print(next(line for line in done.stdout.splitlines() if line.startswith("token bytes")))
    for dump in sorted(tmp.glob("cg.out.*")):
        text = dump.read_text()
        trigger = next(line for line in text.splitlines() if line.startswith("desc: Trigger:"))
        item = trigger.split("--dump=")[-1].strip() if "--dump=" in trigger else trigger.split()[-1]
        totals = [line for line in text.splitlines() if line.startswith(("totals:", "summary:"))]
        if item in names:
            print(f"{names[item]:<40} {int(totals[-1].split()[1]) / n / 1e3:8.1f} k instr/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
