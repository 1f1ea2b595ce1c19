"""Where the scheduler keeps hosts and leases so that a restart (even `kill -9`) loses nothing.

`Store` is the small interface the scheduler core needs: load everything once at start, then write the
hosts and leases one decision changed in one transaction. `SqliteStore` (WAL, synchronous=NORMAL: a commit
is an append to the log, durable across a process crash) is the default; `MemoryStore` serves tests and
benchmarks; an external store for HA deployments would implement the same three methods.

Allocations per device are not stored: they are the sum of the active leases' grants, rebuilt at load.
Heartbeats (last_seen, usage) are not stored either: they change every 2 s and mean nothing after a restart.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gpupool.errors import GpupoolError
from gpupool.protocol import HostState, LeaseState

from .capacity import Grant, Host, PoolDevice

log = logging.getLogger(__name__)


@dataclass
class LeaseRecord:
    """A lease: grants on one or more devices, valid until `expires_at` unless renewed."""

    lease_id: str
    tenant: str
    grants: list[Grant]
    expires_at: float
    ttl: float
    created_at: float
    state: LeaseState = LeaseState.ACTIVE
    ended_at: float = 0.0
    hosts: set[str] = field(default_factory=set)
    # Not stored: until when an active lease is kept past `expires_at` because the scheduler itself was away
    # (restarted, paused) and its tenant could not renew it.
    grace_until: float = 0.0
    # The client certificate it was allocated with (round 46): its fingerprint, then its ECDSA twins' (`certrevoke.
    # fingerprints_der`), space-separated; "" for none (an API token, an operator's lease for a named tenant, a lease
    # from before round 46). Its tokens carry the first (`TokenClaims.cert`); revoking any of them ends the lease.
    cert: str = ""
    # (terms54) Until when a token minted before an operator lowered its quota may live (0: none such): its grants'
    # `kept_bytes` stay counted until then (leases.py `Core.note_kept`). Stored with them (the `kept` column), so that
    # a restarted scheduler does not promise another lease the bytes its session may still hold.
    kept_until: float = 0.0

    @property
    def cert_fingerprints(self) -> list[str]:
        return self.cert.split()

    def __post_init__(self) -> None:
        self.hosts = {g.host_id for g in self.grants}


CertRow = tuple[str, float, str]  # a revoked client certificate: (fingerprint, revoked at, note)


@dataclass(frozen=True)
class Change:
    """One store transaction: upsert `hosts` and `leases`, delete the leases named in `forget` and the hosts
    named in `forget_hosts`; revoke the client certificates of `certs` (fingerprint, revoked at, note) and take back
    the revocations of `forget_certs` (round 45)."""

    hosts: Sequence[Host] = ()
    leases: Sequence[LeaseRecord] = ()
    forget: Sequence[str] = ()
    forget_hosts: Sequence[str] = ()
    certs: Sequence[CertRow] = ()
    forget_certs: Sequence[str] = ()

    def __bool__(self) -> bool:
        return bool(self.hosts or self.leases or self.forget or self.forget_hosts or self.certs or self.forget_certs)

    def rows(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[str]], list[tuple[str]]]:
        """(host rows, lease rows, leases to delete, hosts to delete) as the SQL stores write them."""
        return (
            [_host_row(h) for h in self.hosts],
            [_lease_row(x) for x in self.leases],
            [(lease_id,) for lease_id in self.forget],
            [(host_id,) for host_id in self.forget_hosts],
        )


class StateOwned(GpupoolError):
    """Another scheduler owns this state: starting a second writer would hand out capacity twice."""


class Store(Protocol):
    def load(self) -> tuple[list[Host], list[LeaseRecord]]: ...

    def load_certs(self) -> list[CertRow]:
        """The revoked client certificates."""
        ...

    def write(self, change: Change) -> None:
        """Apply `change` in one transaction."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """Keeps copies in dicts: the same semantics as SQLite, gone with the process."""

    def __init__(self) -> None:
        self._hosts: dict[str, Host] = {}
        self._leases: dict[str, LeaseRecord] = {}
        self._certs: dict[str, CertRow] = {}

    def load_certs(self) -> list[CertRow]:
        return list(self._certs.values())

    def load(self) -> tuple[list[Host], list[LeaseRecord]]:
        return [copy.deepcopy(h) for h in self._hosts.values()], [copy.deepcopy(x) for x in self._leases.values()]

    def write(self, change: Change) -> None:
        for h in change.hosts:
            self._hosts[h.host_id] = copy.deepcopy(h)
        for x in change.leases:
            self._leases[x.lease_id] = copy.deepcopy(x)
        for lease_id in change.forget:
            self._leases.pop(lease_id, None)
        for host_id in change.forget_hosts:
            self._hosts.pop(host_id, None)
        for row in change.certs:
            self._certs[row[0]] = row
        for fp in change.forget_certs:
            self._certs.pop(fp, None)

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
  host_id TEXT PRIMARY KEY, address TEXT NOT NULL, state TEXT NOT NULL, labels TEXT NOT NULL, devices TEXT NOT NULL,
  cordoned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS leases (
  lease_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL, grants TEXT NOT NULL,
  expires_at REAL NOT NULL, ttl REAL NOT NULL, created_at REAL NOT NULL, ended_at REAL NOT NULL,
  cert TEXT NOT NULL DEFAULT '', kept TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS revoked_certs (
  fingerprint TEXT PRIMARY KEY, revoked_at REAL NOT NULL, note TEXT NOT NULL
);
"""


HOST_COLUMNS = "host_id, address, state, labels, devices, cordoned"
LEASE_COLUMNS = "lease_id, tenant, state, grants, expires_at, ttl, created_at, ended_at, cert, kept"


def from_rows(host_rows: Iterable[Any], lease_rows: Iterable[Any]) -> tuple[list[Host], list[LeaseRecord]]:
    """Hosts and leases from the rows of the two tables (SQLite and PostgreSQL store them alike)."""
    hosts = []
    for host_id, address, state, labels, devices, cordoned in host_rows:
        devs = {
            int(d["index"]): PoolDevice(
                host_id, int(d["index"]), str(d["uuid"]), str(d["model"]), int(d["capacity_bytes"]), bool(d["fake"])
            )
            for d in json.loads(devices)
        }
        hosts.append(Host(host_id, address, devs, dict(json.loads(labels)), HostState(state), cordoned=bool(cordoned)))
    leases = []
    for lease_id, tenant, state, grants, expires_at, ttl, created_at, ended_at, cert, kept in lease_rows:
        until, held = json.loads(kept) if kept else (0.0, [])  # (none kept, or a row from before round 54)
        rows = json.loads(grants)
        held = [int(n) for n in held] + [0] * (len(rows) - len(held))
        leases.append(
            LeaseRecord(
                lease_id,
                tenant,
                [Grant(str(h), int(d), int(q), int(u), n) for (h, d, q, u), n in zip(rows, held, strict=False)],
                expires_at,
                ttl,
                created_at,
                LeaseState(state),
                ended_at,
                cert=str(cert or ""),
                kept_until=float(until),
            )
        )
    return hosts, leases


def _host_row(h: Host) -> tuple[str, str, str, str, str, int]:
    devices = [
        {"index": d.index, "uuid": d.uuid, "model": d.model, "capacity_bytes": d.capacity_bytes, "fake": d.fake}
        for d in h.devices.values()
    ]
    return (h.host_id, h.address, h.state, json.dumps(h.labels), json.dumps(devices), int(h.cordoned))


def _lease_row(x: LeaseRecord) -> tuple[str, str, str, str, float, float, float, float, str, str]:
    grants = [[g.host_id, g.device, g.quota_bytes, g.units] for g in x.grants]
    # (terms54) [until, each grant's kept bytes] where any are kept; "" else (what an older row reads as)
    kept = json.dumps([x.kept_until, [g.kept_bytes for g in x.grants]]) if any(g.kept_bytes for g in x.grants) else ""
    return (
        x.lease_id, x.tenant, x.state, json.dumps(grants), x.expires_at, x.ttl, x.created_at, x.ended_at, x.cert, kept
    )  # fmt: skip


class SqliteStore:
    """SQLite in WAL mode; the scheduler core serializes calls, the lock only guards against misuse."""

    def __init__(self, path: str | Path, standby: bool = False) -> None:
        self._owner: int | None = None
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._owner = take_ownership(Path(str(path) + ".lock"), standby)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        if "cordoned" not in {row[1] for row in self._db.execute("PRAGMA table_info(hosts)")}:  # an older file
            self._db.execute("ALTER TABLE hosts ADD COLUMN cordoned INTEGER NOT NULL DEFAULT 0")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(leases)")}
        if "cert" not in columns:  # before round 46
            self._db.execute("ALTER TABLE leases ADD COLUMN cert TEXT NOT NULL DEFAULT ''")
        if "kept" not in columns:  # before round 54
            self._db.execute("ALTER TABLE leases ADD COLUMN kept TEXT NOT NULL DEFAULT ''")
        self._lock = threading.Lock()

    def load(self) -> tuple[list[Host], list[LeaseRecord]]:
        with self._lock:
            host_rows = self._db.execute(f"SELECT {HOST_COLUMNS} FROM hosts").fetchall()
            lease_rows = self._db.execute(f"SELECT {LEASE_COLUMNS} FROM leases").fetchall()
        return from_rows(host_rows, lease_rows)

    def load_certs(self) -> list[CertRow]:
        with self._lock:
            rows = self._db.execute("SELECT fingerprint, revoked_at, note FROM revoked_certs").fetchall()
        return [(str(f), float(t), str(n)) for f, t, n in rows]

    def write(self, change: Change) -> None:
        if not change:
            return
        host_rows, lease_rows, forget_rows, forget_host_rows = change.rows()
        with self._lock:
            self._db.execute("BEGIN")
            try:
                if host_rows:
                    self._db.executemany(
                        f"INSERT OR REPLACE INTO hosts ({HOST_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", host_rows
                    )
                if lease_rows:
                    self._db.executemany(
                        f"INSERT OR REPLACE INTO leases ({LEASE_COLUMNS}) VALUES ({', '.join('?' * 10)})", lease_rows
                    )
                if forget_rows:
                    self._db.executemany("DELETE FROM leases WHERE lease_id = ?", forget_rows)
                if forget_host_rows:
                    self._db.executemany("DELETE FROM hosts WHERE host_id = ?", forget_host_rows)
                if change.certs:
                    self._db.executemany("INSERT OR REPLACE INTO revoked_certs VALUES (?, ?, ?)", change.certs)
                if change.forget_certs:
                    self._db.executemany(
                        "DELETE FROM revoked_certs WHERE fingerprint = ?", [(f,) for f in change.forget_certs]
                    )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        log.exception("rollback failed")
                raise

    def disown(self) -> None:
        """Drop the ownership lock as the death of the process would (tests model `kill -9` with it)."""
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self.disown()


def take_ownership(lock_path: Path, standby: bool = False, poll: float = 0.5) -> int:
    """Hold an exclusive lock on `lock_path` for the life of the process (the kernel drops it when we die).

    A second scheduler on the same state either fails at once with StateOwned, naming the owner, or
    (`standby`) waits until the owner is gone and then takes over.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            if not standby:
                os.close(fd)
                raise StateOwned(
                    f"the state next to {lock_path} is owned by another running scheduler ({owner}); refusing to "
                    "start a second writer (stop it first, or pass --standby to wait and take over when it stops)"
                ) from None
            if not announced:
                log.warning("standing by: the state is owned by another scheduler (%s)", owner)
                announced = True
            time.sleep(poll)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
    return fd


def open_store(path: str, standby: bool = False) -> Store:
    """ ":memory:" or "" gives a MemoryStore, postgresql://... a PostgresStore (HA), anything else a SqliteStore
    at that path; both owned by this process (`standby`: wait until the current owner has gone)."""
    if path in ("", ":memory:"):
        return MemoryStore()
    if path.startswith(("postgresql://", "postgres://")):
        from .pgstore import PostgresStore  # psycopg only where it is used

        return PostgresStore(path, standby)
    return SqliteStore(path, standby)
