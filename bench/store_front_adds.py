"""(store56) A keyed client's `set k "abc"` and `add k 1` on rank 0's group store, again and again, each on a new
proved connection (the store closed it, or the front): counts the lines written to this process's stderr (where
torch's store writes c10d's "Error processing client message: stoll"; under --isolation thread the daemon's) and
how many rounds a second, with the interpreter that runs it (run it with the base's to compare):

    nice -n 5 python bench/store_front_adds.py --seconds 10
    nice -n 5 /work/wt/base/.venv/bin/python bench/store_front_adds.py --seconds 10
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

from gpupool.server import collectives as c


def _query(kind: int, key: bytes, tail: bytes = b"") -> bytes:
    return bytes([kind]) + len(key).to_bytes(8, "little") + key + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    key = c._front_key("a group's secret")
    master, front = c.seclink.bind_in(
        c.COLLECTIVE_PORTS, lambda port: c._store_master("127.0.0.1", port, 2, 30.0, key, c.COLLECTIVE_PORTS, "x")
    )
    word = b"abc"
    rounds = 0
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                with socket.create_connection(("127.0.0.1", front.port), timeout=30) as sock:
                    c._prove(sock, key, time.monotonic() + 30)
                    sock.sendall(b"\x00" + (0x3C85F7CE).to_bytes(4, "little"))  # validate, as torch's client does first
                    sock.sendall(_query(1, b"/k", len(word).to_bytes(8, "little") + word))  # set
                    sock.sendall(_query(4, b"/k", (1).to_bytes(8, "little", signed=True)))  # add
                    sock.settimeout(30)
                    while sock.recv(64):  # until the store (base) or the front (store56) closes it
                        pass
                rounds += 1
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            front.close()
        err.seek(0)
        text = err.read().decode(errors="replace")
    stoll = text.count("Error processing client message: stoll")
    front_lines = text.count("closed a proved connection")  # (the front's own warning: rate-limited, 10 a minute)
    held = bytes(master.get("k"))
    print(f"{rounds} rounds in {args.seconds:g} s ({rounds / args.seconds:.1f}/s): {len(text.splitlines())} lines "
          f"on stderr, {stoll} of them c10d's stoll, {front_lines} the front's; the store holds {held!r}")  # fmt: skip


if __name__ == "__main__":
    main()
