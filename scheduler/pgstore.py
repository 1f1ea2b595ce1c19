"""The scheduler's state on an existing PostgreSQL, for HA: several `gpupool scheduler` replicas, one leader.

Leadership is a session-level advisory lock (`pg_try_advisory_lock`) held on the one connection through
which the leader also writes: PostgreSQL drops the lock the moment that connection ends (the leader is
killed, its host dies, the network cuts it off - with TCP keepalives), and a standby polling for the lock
takes over, loads the state and serves. A leader that loses its connection cannot write any more, and
`check()` - called by the server every sweep - tells it to step down (the process exits; its supervisor
starts it again as a standby). Writes are one transaction each, like SqliteStore's; rows carry the same
JSON columns.

`--state postgresql://user@host/db` selects it (any libpq connection string; psycopg 3).
"""

from __future__ import annotations

import logging
import threading
import time

from .capacity import Host
from .store import HOST_COLUMNS, LEASE_COLUMNS, CertRow, Change, LeaseRecord, StateOwned, from_rows

log = logging.getLogger(__name__)

LOCK_KEY = 0x67707570_6F6F6C  # "gpupool": the advisory lock every replica of one pool contends for
_SCHEMA = """
CREATE TABLE IF NOT EXISTS gpupool_hosts (
  host_id TEXT PRIMARY KEY, address TEXT NOT NULL, state TEXT NOT NULL, labels TEXT NOT NULL, devices TEXT NOT NULL,
  cordoned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS gpupool_leases (
  lease_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL, grants TEXT NOT NULL,
  expires_at DOUBLE PRECISION NOT NULL, ttl DOUBLE PRECISION NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  ended_at DOUBLE PRECISION NOT NULL, cert TEXT NOT NULL DEFAULT '', kept TEXT NOT NULL DEFAULT ''
);
ALTER TABLE gpupool_leases ADD COLUMN IF NOT EXISTS cert TEXT NOT NULL DEFAULT '';
ALTER TABLE gpupool_leases ADD COLUMN IF NOT EXISTS kept TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS gpupool_revoked_certs (
  fingerprint TEXT PRIMARY KEY, revoked_at DOUBLE PRECISION NOT NULL, note TEXT NOT NULL
);
"""


def is_postgres(state: str) -> bool:
    return state.startswith(("postgresql://", "postgres://"))


class PostgresStore:
    """A Store on PostgreSQL that is also the leadership lock; `standby` waits to lead instead of failing."""

    def __init__(self, dsn: str, standby: bool = False, poll: float = 0.5) -> None:
        import psycopg  # only HA deployments need it

        self._psycopg = psycopg
        # Keepalives: a leader cut off by the network must lose its lock within seconds, not hours.
        self._conn = psycopg.connect(
            dsn, autocommit=True, keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3
        )
        self._lock = threading.Lock()
        announced = False
        while not self._conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:  # type: ignore[index]
            if not standby:
                self._conn.close()
                raise StateOwned(
                    "another scheduler leads this PostgreSQL state; refusing to start a second writer "
                    "(pass --standby to wait and take over when it stops)"
                )
            if not announced:
                log.warning("standing by: another scheduler leads this PostgreSQL state")
                announced = True
            time.sleep(poll)
        self._conn.execute(_SCHEMA)
        log.info("leading: holding the PostgreSQL advisory lock %#x", LOCK_KEY)

    def load(self) -> tuple[list[Host], list[LeaseRecord]]:
        with self._lock:
            host_rows = self._conn.execute(f"SELECT {HOST_COLUMNS} FROM gpupool_hosts").fetchall()
            lease_rows = self._conn.execute(f"SELECT {LEASE_COLUMNS} FROM gpupool_leases").fetchall()
        return from_rows(host_rows, lease_rows)

    def load_certs(self) -> list[CertRow]:
        with self._lock:
            rows = self._conn.execute("SELECT fingerprint, revoked_at, note FROM gpupool_revoked_certs").fetchall()
        return [(str(f), float(t), str(n)) for f, t, n in rows]

    def write(self, change: Change) -> None:
        if not change:
            return
        host_rows, lease_rows, forget_rows, forget_host_rows = change.rows()
        with self._lock, self._conn.transaction(), self._conn.cursor() as cur:
            if host_rows:
                cur.executemany(
                    f"INSERT INTO gpupool_hosts ({HOST_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (host_id) DO UPDATE SET address = EXCLUDED.address, "
                    "state = EXCLUDED.state, labels = EXCLUDED.labels, devices = EXCLUDED.devices, "
                    "cordoned = EXCLUDED.cordoned",
                    host_rows,
                )
            if lease_rows:
                cur.executemany(
                    f"INSERT INTO gpupool_leases ({LEASE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (lease_id) DO UPDATE SET tenant = EXCLUDED.tenant, state = EXCLUDED.state, "
                    "grants = EXCLUDED.grants, expires_at = EXCLUDED.expires_at, ttl = EXCLUDED.ttl, "
                    "created_at = EXCLUDED.created_at, ended_at = EXCLUDED.ended_at, cert = EXCLUDED.cert, "
                    "kept = EXCLUDED.kept",
                    lease_rows,
                )
            if forget_rows:
                cur.executemany("DELETE FROM gpupool_leases WHERE lease_id = %s", forget_rows)
            if forget_host_rows:
                cur.executemany("DELETE FROM gpupool_hosts WHERE host_id = %s", forget_host_rows)
            if change.certs:
                cur.executemany(
                    "INSERT INTO gpupool_revoked_certs VALUES (%s, %s, %s) ON CONFLICT (fingerprint) DO UPDATE SET "
                    "revoked_at = EXCLUDED.revoked_at, note = EXCLUDED.note",
                    list(change.certs),
                )
            if change.forget_certs:
                cur.executemany(
                    "DELETE FROM gpupool_revoked_certs WHERE fingerprint = %s", [(f,) for f in change.forget_certs]
                )

    def check(self) -> None:
        """Raise StateOwned once the connection holding the leadership lock is gone: we no longer lead."""
        try:
            with self._lock:
                self._conn.execute("SELECT 1")
        except self._psycopg.Error as exc:
            raise StateOwned(f"lost the PostgreSQL connection that holds leadership: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()  # ends the session: PostgreSQL releases the advisory lock
            except self._psycopg.Error:
                pass


def wipe(dsn: str) -> None:
    """Drop gpupool's tables (tests and benchmarks)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS gpupool_hosts, gpupool_leases, gpupool_revoked_certs")
