"""Mutants of server/seclink.py that the tests must catch: each is applied to the file in place, the tests run,
and the file is restored (do not run tests or benches from this checkout meanwhile).

    .venv/bin/python scripts/seclink_mutants.py [MUTANT ...]   (default: all; from the repository root)

- skip-tag: open frames with GCM's keystream (AES-CTR from counter 2) and no tag check;
- reuse-nonce: every frame of a connection under nonce 0;
- no-rank-in-keys: the ranks left out of the key derivation (the handshake MACs still bind them);
- no-rank-anywhere: the ranks left out of the key derivation and of the handshake's transcript.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "server" / "seclink.py"
TESTS = ["tests/unit/test_seclink.py", "tests/integration/test_collectives_secure.py"]

SKIP_TAG = [
    (
        "        self._recv = AESGCM(recv_key)\n",
        "        self._recv = AESGCM(recv_key)\n        self._recv_key = recv_key\n",
    ),
    (
        "            self._recv.decrypt_into(self._nonce(self._received), sealed, _LEN.pack(length), plain)",
        "            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes\n"
        "            ctr = modes.CTR(self._nonce(self._received) + b'\\0\\0\\0\\2')\n"
        "            plain[:] = Cipher(algorithms.AES(self._recv_key), ctr).decryptor().update(bytes(sealed[:-16]))",
    ),
]
NO_RANK_KDF = [('struct.pack("!III", size, rank, hub)', 'struct.pack("!I", size)')]
NO_RANK_TRANSCRIPT = [
    ("    transcript = hello + mine\n", "    transcript = hello[:8] + hello[12:] + mine\n"),
    (
        "    transcript = hello + reply[:HELLO_BYTES]\n",
        "    transcript = hello[:8] + hello[12:] + reply[:HELLO_BYTES]\n",
    ),
]
MUTANTS = {
    "skip-tag": SKIP_TAG,
    "reuse-nonce": [('        return counter.to_bytes(12, "big")', '        return (0).to_bytes(12, "big")')],
    "no-rank-in-keys": NO_RANK_KDF,
    "no-rank-anywhere": NO_RANK_KDF + NO_RANK_TRANSCRIPT,
}


def run(name: str) -> bool:
    """Whether the tests caught the mutant (some failed)."""
    original = TARGET.read_text()
    src = original
    for old, new in MUTANTS[name]:
        if src.count(old) != 1:
            raise SystemExit(f"{name}: the code to mutate moved: {old.strip()[:60]!r}")
        src = src.replace(old, new)
    TARGET.write_text(src)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        TARGET.write_text(original)
    lines = r.stdout.strip().splitlines()
    print(f"{name}: {lines[-1] if lines else r.returncode}")
    for line in lines:
        if line.startswith("FAILED"):
            print("   ", line[:150])
    return r.returncode != 0


def main() -> int:
    names = sys.argv[1:] or list(MUTANTS)
    survived = [n for n in names if not run(n)]
    if survived:
        print("survived:", ", ".join(survived))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
