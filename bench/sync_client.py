"""Sync round trips of this tree's client session against another checkout's, on one daemon, in one process.

`bench/daemon_wire.py --against` swaps daemons under one client; this swaps the client (`client/session.py`,
loaded from --against DIR under another module name) under one daemon of this tree, so a change to how the
client waits for a reply is measured side by side: blocks of 50 lone syncs alternate between a session of each
client, and the medians and their ratio are printed. A bare gRPC stream ping-pong (the floor of
bench/daemon_wire.py) is measured in the same blocks, so each client's ratio to it comes out of one run too, and
so is the client's CPU time per call (its calling thread, and its whole process with gRPC's threads).

    nice python bench/sync_client.py --against /work/main [--syncs 2000] [--tls]

The floor is always the plaintext gRPC echo (with --tls, the daemon's ratio to it includes TLS's own cost).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import daemon_wire  # noqa: E402 - the floor server and the daemon starter live there

BLOCK = 50


def _other_session_class(tree: str) -> Any:
    """`Session` of the other checkout's client/session.py, loaded as a module of a package made of its client/
    folder, so its relative imports (`from . import bulk`) take the other checkout's modules too."""
    folder = Path(tree) / "client"
    spec = importlib.util.spec_from_file_location(
        "gpupool_other_client", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package  # its modules' dataclasses look their module up
    spec.loader.exec_module(package)
    return importlib.import_module("gpupool_other_client.session").Session


def _floor(port: int) -> Any:
    import grpc

    return daemon_wire.echo_pinger(grpc.insecure_channel(f"127.0.0.1:{port}", options=daemon_wire.GRPC_OPTIONS))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, metavar="DIR", help="the other checkout (its client/session.py)")
    p.add_argument("--syncs", type=int, default=2000, help="syncs per client (blocks of 50, alternating)")
    p.add_argument("--tls", action="store_true", help="a TLS daemon (default: plaintext, --insecure)")
    args = p.parse_args(argv)

    from gpupool.client.session import Session

    from gpupool import tokens

    other = _other_session_class(args.against)
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = daemon_wire.loopback_keys(tmp, args.tls)
        proc, address = daemon_wire.start_daemon(key_file, *(() if args.tls else ("--insecure",)))
        floor, ports = daemon_wire.start_floor()
        try:
            grpc_port = int(ports[1])
            ping, close_floor = _floor(grpc_port)
            sessions: dict[str, Any] = {}
            for name, cls in (("other", other), ("this", Session)):
                claims = tokens.TokenClaims(f"{name}-syncs", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
                sessions[name] = cls.attach(address, tokens.mint(key, claims))
                sessions[name].sync()
            calls = {"other": sessions["other"].sync, "this": sessions["this"].sync, "floor": ping}
            rtts: dict[str, list[float]] = {k: [] for k in calls}
            cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in calls}  # per call: this thread, the process
            for block in range(max(1, args.syncs // BLOCK)):
                names = list(calls)
                for name in names[block % 3 :] + names[: block % 3]:
                    call = calls[name]
                    c0, p0 = time.thread_time(), time.process_time()
                    for _ in range(BLOCK):
                        t0 = time.perf_counter()
                        call()
                        rtts[name].append(time.perf_counter() - t0)
                    cpu[name].append(((time.thread_time() - c0) / BLOCK, (time.process_time() - p0) / BLOCK))
            for s in sessions.values():
                s.close()
            close_floor()
        finally:
            daemon_wire.stop([proc], floor)
    med = {k: statistics.median(v) * 1e6 for k, v in rtts.items()}
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    kind = "TLS" if args.tls else "plaintext"
    print(f"sync p50 (us), {kind} daemon, client of this tree vs {args.against}, load {load}")
    print("(floor: a bare plaintext gRPC stream ping-pong of 16 bytes, bench/daemon_wire.py's floor server)")
    print(f"{'other':>10}{'this':>10}{'this/other':>12}{'floor':>10}{'other/floor':>13}{'this/floor':>12}")
    o, t, f = med["other"], med["this"], med["floor"]
    print(f"{o:>10.0f}{t:>10.0f}{t / o:>12.2f}{f:>10.0f}{o / f:>13.2f}{t / f:>12.2f}")
    print("client CPU per call (us, medians of blocks): the calling thread / the whole client process (gRPC's too)")
    for name in calls:
        th = statistics.median(c for c, _ in cpu[name]) * 1e6
        pr = statistics.median(p for _, p in cpu[name]) * 1e6
        print(f"{name:>10}{th:>10.1f}{pr:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
