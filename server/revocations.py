"""What a daemon heard of revocations, kept on disk (`gpupool serve --state-dir`; round 45, control45).

The scheduler's heartbeat replies name the ended leases whose tokens to refuse, when status tokens were last revoked
and the revoked client certificates; until round 45 a daemon held them in memory only, so a restarted daemon served
nothing until its scheduler answered (round 44: before, it attached revoked tokens for an interval). Now it writes
them to ``<state dir>/revocations.json`` (0600, a new file renamed over the old one), with an HMAC-SHA256 under a key
of its own (``revocations.key``, 32 random bytes, 0600, made at the first start), and at a start reads them back:

- a file whose HMAC does not match (an edit: a revocation taken out, a date moved), of another host id, or that does
  not parse is not used (one error in the log) and the daemon waits for its scheduler as before; so is a missing one.
  What the HMAC cannot tell is a whole older copy of both files put back: its revocations are true but not the last.
- a valid file's revocations are taken at once (they only ever add refusals); and where the scheduler cannot be
  reached (`Daemon.scheduler_unreachable`) and the file was written after a scheduler's answer of at most
  `--revocations-max-age` ago, the daemon serves Attach on it: a revoked token is refused, the others attach. A lease
  that ended while the daemon was stopped is not in it (the scheduler tells it at the daemon's first heartbeat): the
  age bounds that window.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpupool.config import check_private_dir, read_trusted, write_secret
from gpupool.errors import InvalidArgument

log = logging.getLogger(__name__)

FILE = "revocations.json"
KEY = "revocations.key"
_MAC = b"\nhmac-sha256:"
_DOMAIN = b"gpupool-revocations\0"
REWRITE = 30.0  # with nothing new heard, the file (its `heard_at`) is written again at most this often


@dataclass
class Heard:
    """The revocations a daemon holds: leases (until when their tokens may live), status tokens' not-before, revoked
    certificates (and their list's version), and when the scheduler last answered (its clock: unix seconds)."""

    host_id: str
    heard_at: float = 0.0
    leases: dict[str, float] = field(default_factory=dict)
    status_not_before: float = 0.0
    certs: list[str] = field(default_factory=list)
    certs_version: str = ""

    def body(self) -> bytes:
        return json.dumps(
            {
                "v": 1,
                "host_id": self.host_id,
                "heard_at": self.heard_at,
                "leases": self.leases,
                "status_not_before": self.status_not_before,
                "certs": sorted(self.certs),
                "certs_version": self.certs_version,
            },
            separators=(",", ":"),  # (not sorted: the HMAC is over these bytes; sorting 20,000 keys doubled the time)
        ).encode()


def _parse(body: bytes, host_id: str) -> Heard:
    raw = json.loads(body)
    if not isinstance(raw, dict) or raw.get("v") != 1:
        raise ValueError("not a version 1 revocations file")
    if raw["host_id"] != host_id:
        raise ValueError(f"written by host {str(raw['host_id'])[:80]!r}, this is {host_id!r}")
    leases = raw["leases"]
    if not isinstance(leases, dict) or not all(
        isinstance(k, str) and type(v) in (int, float) and math.isfinite(v) for k, v in leases.items()
    ):
        raise ValueError("bad leases")
    certs = raw["certs"]
    if not isinstance(certs, list) or not all(isinstance(c, str) for c in certs):
        raise ValueError("bad certificates")
    numbers = (raw["heard_at"], raw["status_not_before"])
    if not all(type(x) in (int, float) and math.isfinite(x) for x in numbers):
        raise ValueError("bad times")
    return Heard(host_id, float(numbers[0]), dict(leases), float(numbers[1]), list(certs), str(raw["certs_version"]))


class RevocationFile:
    """`<directory>/revocations.json` and its key; `load` at start, `save` after heartbeats (`due` says when)."""

    def __init__(self, directory: str | os.PathLike[str], host_id: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE
        self.host_id = host_id
        self._lock = threading.Lock()
        self._written = 0.0  # time.monotonic() of the last save
        self._stamp: tuple[object, ...] = ()  # what the last save held, but heard_at
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            check_private_dir(self.directory, "state folder (--state-dir)", "its revocations could be taken out")
        except OSError as exc:
            raise InvalidArgument(str(exc)) from None
        self._key = self._load_key()

    def _load_key(self) -> bytes:
        path = self.directory / KEY
        if not path.exists():
            write_secret(path, os.urandom(32).hex().encode())
        try:
            key = bytes.fromhex(read_trusted(path, "revocations key", secret=True).decode().strip())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"revocations key {path} is not 64 hex digits: {exc}") from None
        if len(key) < 16:
            raise InvalidArgument(f"revocations key {path} is shorter than 16 bytes")
        return key

    def _mac(self, body: bytes) -> str:
        return hmac.new(self._key, _DOMAIN + body, hashlib.sha256).hexdigest()

    def load(self) -> Heard | None:
        """What the file holds, or None (missing, or refused: its HMAC, its host id, its form; said in the log)."""
        try:
            data = read_trusted(self.path, "revocations file", secret=True)
        except FileNotFoundError:
            log.info("no revocations file %s yet: Attach waits for the scheduler's first answer", self.path)
            return None
        except OSError as exc:
            log.error("revocations file %s refused: %s; Attach waits for the scheduler's first answer", self.path, exc)
            return None
        body, sep, mac = data.rpartition(_MAC)
        try:
            if not sep or not hmac.compare_digest(mac.strip().decode("ascii", "replace"), self._mac(body)):
                raise ValueError("its HMAC does not match (the file was edited, or written with another key)")
            heard = _parse(body, self.host_id)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("revocations file %s not used: %s; Attach waits for the scheduler's first answer", self.path, exc)
            return None
        return heard

    def due(self, stamp: tuple[object, ...]) -> bool:
        """Whether a save is due: what it holds changed (`stamp`), or `REWRITE` seconds passed."""
        return stamp != self._stamp or time.monotonic() - self._written >= REWRITE

    def save(self, heard: Heard, stamp: tuple[object, ...]) -> None:
        body = heard.body()
        with self._lock:
            write_secret(self.path, body + _MAC + self._mac(body).encode() + b"\n")
            self._written, self._stamp = time.monotonic(), stamp
