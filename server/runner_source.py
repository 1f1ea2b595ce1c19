"""native_runner.cpp as this process first read it, and its digest (server/native_runner.py builds and names its
cache entry by these bytes; the daemon tells the zygote it starts the digest, DIGEST_ENV, so that the front and the
zygote name one build whatever happens to the checkout between their reads).

No torch here: `gpupool serve` starts its zygote (server/zygote.py `_launch` reads the digest) before it imports
torch, so that the two processes import torch side by side (tests/unit/test_protocol.py)."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("native_runner.cpp")
DIGEST_ENV = "GPUPOOL_NATIVE_RUNNER_DIGEST"
_DIGEST = re.compile(r"[0-9a-f]{16}")  # what `source` makes: the first 16 hex digits of a SHA-256
_lock = threading.Lock()
_source: list[tuple[bytes, str]] = []  # [(native_runner.cpp as this process first read it, its digest)]


def source() -> tuple[bytes, str]:
    """native_runner.cpp as this process first read it, and its digest (read once: a build is made of these bytes)."""
    with _lock:
        if not _source:
            data = SOURCE.read_bytes()
            _source.append((data, hashlib.sha256(data).hexdigest()[:16]))
        return _source[0]


def told_digest() -> str | None:
    """The digest the daemon told this zygote ($GPUPOOL_NATIVE_RUNNER_DIGEST), or None when unset. It names a folder
    of the build cache (`torch-<version>-<digest>`), whose library the process imports: a value other than 16
    lowercase hex digits (`source`'s form), such as `../x`, would name a path outside its folder, so it is refused
    (ValueError, one line naming the variable) rather than used."""
    value = os.environ.get(DIGEST_ENV)
    if not value:
        return None
    if not _DIGEST.fullmatch(value):
        raise ValueError(f"{DIGEST_ENV}={value[:40]!r} is not 16 lowercase hex digits (what a daemon tells its zygote)")
    return value
