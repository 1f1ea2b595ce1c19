"""A hostile-client fuzzer of a live scheduler's API, from real requests (round 33).

`Pool` starts a real scheduler (`SchedulerServer` on loopback, TLS, API tokens in a credentials file, a SQLite store)
with two hosts registered by their join tokens and a victim tenant, alice, holding a lease. `Fuzzer` then sends
mutated real requests, chosen by a seeded `random.Random`, as an attacker would: mallory (a tenant), h1 (a valid
host's join token), and callers with no or tampered credentials:

- credentials: API tokens flipped, cut, grown, huge, empty, another scheme, a lease token of alice's lease in
  their place, repeated `authorization` keys (mallory's and alice's, in both orders), binary `authorization-bin`;
- fields: every scalar of each method's request set to a boundary value (NaN, infinities, negative, zero, 2^64-1,
  huge strings, NUL, non-ASCII), alice's lease id in Renew/Release, another host's id in Register/Heartbeat, alice's
  lease ids in a heartbeat's sessions, operators' methods by a tenant or host;
- bytes: a real request's serialization with bytes flipped, cut, inserted, or grown past the 1 MiB bound.

After each case (`check`): the status is one a client can act on (OK, UNAUTHENTICATED, PERMISSION_DENIED,
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND, FAILED_PRECONDITION: never UNKNOWN, INTERNAL, UNAVAILABLE, or a
deadline), its message carries no traceback and fits in one reply; no reply or message carries a secret of another
party the request did not itself carry (alice's lease tokens, and her lease id but to operators and to the hosts
that serve it); a refused call
left the store's rows as they were; and alice still renews and lists her lease (the scheduler serves on).
`GPUPOOL_SCHEDULER_FUZZ_CASES` and `GPUPOOL_SCHEDULER_FUZZ_SEED` size the test's campaign (tests/integration/
test_scheduler_fuzz.py); run this file as a script for a long one: `python scheduler_fuzz.py CASES SEED`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from gpupool.scheduler.auth import credential_line
from gpupool.scheduler.cli import MAX_REQUEST_BYTES, SchedulerConfig, SchedulerServer

from gpupool import tls, tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc
from gpupool.errors import MAX_DETAILS

GiB = 1024**3
ACTIONABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    # (round 44) a Register of a live host's id from another address (scheduler/hosts.py `_check_duplicate`); the
    # campaign met it once HeartbeatRequest gained a field (`address`), which changed the seeded mutations
    grpc.StatusCode.ALREADY_EXISTS,
}
API_TOKENS = {"alice": "alice-api-token-0123456789", "mallory": "mallory-api-token-9876543210",
              "h1": "h1-join-token-abcdef", "h2": "h2-join-token-fedcba", "ops": "ops-admin-token-424242"}  # fmt: skip
METHODS = ("Register", "Heartbeat", "Allocate", "Renew", "Release", "ListPool", "DrainHost", "RemoveHost",
           "SetLeaseTerms")  # fmt: skip
REQUESTS: dict[str, Any] = {
    "Register": scheduler_pb2.RegisterRequest,
    "Heartbeat": scheduler_pb2.HeartbeatRequest,
    "Allocate": scheduler_pb2.AllocateRequest,
    "Renew": scheduler_pb2.RenewRequest,
    "Release": scheduler_pb2.ReleaseRequest,
    "ListPool": scheduler_pb2.ListPoolRequest,
    "DrainHost": scheduler_pb2.DrainHostRequest,
    "RemoveHost": scheduler_pb2.RemoveHostRequest,
    "SetLeaseTerms": scheduler_pb2.SetLeaseTermsRequest,
}
STRINGS = ["", "\x00", "é" * 40, "x" * 300, "y" * 20_000, "h1", "h2", "../../etc", "\u202e", "a b", "%s%n"]
FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 5e-324, 1e-300, 1.0000001, 2.0, 1e308, -0.0]
UINTS = [0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]


def devices(host_id: str, n: int = 2) -> list[device_pb2.DeviceInfo]:
    return [device_pb2.DeviceInfo(index=i, uuid=f"GPU-{host_id}-{i}", model="fake", memory_bytes=8 * GiB, fake=True)
            for i in range(n)]  # fmt: skip


class Pool:
    """A scheduler with hosts h1 and h2 and alice's lease, and stubs for each party."""

    def __init__(self, tmp: Path, ca_file: str, server_tls: tls.TlsConfig, **config: Any) -> None:
        creds = tmp / "credentials"
        creds.write_text(
            credential_line("tenant", "alice", API_TOKENS["alice"])
            + credential_line("tenant", "mallory", API_TOKENS["mallory"])
            + credential_line("host", "h1", API_TOKENS["h1"])
            + credential_line("host", "h2", API_TOKENS["h2"])
            + credential_line("admin", "ops", API_TOKENS["ops"])
        )
        self.state = tmp / "scheduler.db"
        cfg = SchedulerConfig(
            listen="127.0.0.1:0", state=str(self.state), metrics_listen="0", credentials=str(creds),
            tls=dataclasses.replace(server_tls, client_auth="none"), lease_ttl=3600.0, host_timeout=3600.0,
            **config,
        )  # fmt: skip
        self.server = SchedulerServer(cfg, tokens.Signer.from_seed(b"scheduler-fuzz")).start()
        creds_pem = Path(ca_file).read_bytes()
        self.channel = grpc.secure_channel(
            self.server.address,
            grpc.ssl_channel_credentials(creds_pem),
            options=[("grpc.ssl_target_name_override", "localhost"), ("grpc.max_send_message_length", 4 << 20)],
        )
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self._db = sqlite3.connect(f"file:{self.state}?mode=ro", uri=True, check_same_thread=False)
        self.restore()

    def restore(self) -> None:
        """Hosts h1 and h2 up as they registered first, and alice holding a fresh lease: after an operator's case
        (which may release her lease, drain or remove a host) or a host's own (which may re-register with other
        devices: its leases are lost), the powers those parties have."""
        for host in ("h1", "h2"):
            self.stub.Register(
                scheduler_pb2.RegisterRequest(host_id=host, address=f"127.0.0.1:{4000 + int(host[1])}",
                                              devices=devices(host)),
                metadata=self.md("ops"), timeout=10,
            )  # fmt: skip
            self.stub.DrainHost(scheduler_pb2.DrainHostRequest(host_id=host, undo=True), metadata=self.md("ops"))
            self.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(host_id=host), metadata=self.md("ops"), timeout=10)
        self.alice = self.stub.Allocate(
            scheduler_pb2.AllocateRequest(gpus=2, fraction=0.5), metadata=self.md("alice"), timeout=10
        )
        # Another party's secrets: no reply to anyone else may carry one (unless its request did).
        self.secrets = [self.alice.lease_id, *(d.token for d in self.alice.devices)]
        self.secrets += [d.token.rsplit(".", 1)[1] for d in self.alice.devices]  # the signatures alone

    @staticmethod
    def md(who: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {API_TOKENS[who]}"),)

    def rows(self) -> tuple[list[Any], list[Any]]:
        """The store's rows (a reader of its own: what a restarted scheduler would load)."""
        hosts = self._db.execute("SELECT * FROM hosts ORDER BY host_id").fetchall()
        leases = self._db.execute("SELECT * FROM leases ORDER BY lease_id").fetchall()
        return hosts, leases

    def serves_alice(self) -> str:
        """ "" when alice renews and lists her lease as before, else what went wrong."""
        try:
            renewed = self.stub.Renew(
                scheduler_pb2.RenewRequest(lease_id=self.alice.lease_id), metadata=self.md("alice"), timeout=10
            )
            pool = self.stub.ListPool(scheduler_pb2.ListPoolRequest(), metadata=self.md("alice"), timeout=10)
        except grpc.RpcError as err:
            return f"alice's calls failed: {err.code()} {err.details()}"  # type: ignore[attr-defined]
        if renewed.tenant != "alice" or [d.host_id for d in renewed.devices] != [d.host_id for d in self.alice.devices]:
            return f"alice's renewal answered another lease: {renewed}"
        if self.alice.lease_id not in [x.lease_id for x in pool.leases]:
            return "alice's lease is gone from her ListPool"
        return ""

    def close(self) -> None:
        self._db.close()
        self.channel.close()
        self.server.stop(grace=0.5)


@dataclass
class Case:
    method: str
    who: str  # whose credential the metadata started from
    metadata: list[tuple[str, Any]]
    body: bytes
    what: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    reply: bytes


class Fuzzer:
    def __init__(self, pool: Pool, rng: random.Random) -> None:
        self.pool = pool
        self.rng = rng
        self.codes: Counter[str] = Counter()
        self.mine: list[str] = []  # mallory's own leases, released as soon as granted

    # ---- the real requests ----

    def base(self, method: str) -> tuple[str, Any]:
        """(the caller, a real request of `method`) as an honest party would send it."""
        alice = self.pool.alice
        if method == "Register":
            return "h1", scheduler_pb2.RegisterRequest(host_id="h1", address="127.0.0.1:4001", devices=devices("h1"))
        if method == "Heartbeat":
            free = self.rng.choice([0, 1, 2**64 - 1])  # (terms54: the measured free memory a raise must fit)
            usage = [device_pb2.DeviceUsage(info=d, used_bytes=1, free_bytes=free) for d in devices("h1")]
            sessions = [device_pb2.SessionUsage(lease_id=self.mine[-1])] if self.mine else []
            return "h1", scheduler_pb2.HeartbeatRequest(host_id="h1", sessions=sessions, devices=usage)
        if method == "Allocate":
            return "mallory", scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=60)
        if method in ("Renew", "Release"):
            lease_id = self.mine[-1] if self.mine and self.rng.random() < 0.5 else alice.lease_id
            return "mallory", REQUESTS[method](lease_id=lease_id)
        if method == "SetLeaseTerms":  # (terms53) an operator's: refused to its tenant and to mallory alike
            return self.rng.choice(["mallory", "alice"]), REQUESTS[method](lease_id=alice.lease_id, fraction=0.25)
        if method == "ListPool":
            return "mallory", scheduler_pb2.ListPoolRequest(page_size=1)
        return self.rng.choice(["mallory", "h1"]), REQUESTS[method](host_id="h2")

    # ---- mutations ----

    def mutate_fields(self, msg: Any, what: list[str], depth: int = 0) -> None:
        rng = self.rng
        for fd in msg.DESCRIPTOR.fields:
            if rng.random() > 0.35:
                continue
            name = fd.name
            if fd.is_repeated:
                items = getattr(msg, name)
                if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                    choice = rng.randrange(3)
                    items.clear()
                    if choice == 1:
                        items.update({f"k{i}": "v" * rng.choice([0, 1, 300]) for i in range(rng.choice([1, 65]))})
                    elif choice == 2:
                        items.update({rng.choice(STRINGS)[:100] or "k": rng.choice(STRINGS)[:5000]})
                    what.append(f"{name}: map x{len(items)}")
                elif fd.message_type is not None:
                    if items and rng.random() < 0.5:
                        self.mutate_fields(items[0], what, depth + 1)
                    n = rng.choice([0, 2, 1100]) if rng.random() < 0.3 else len(items)
                    if n != len(items):
                        proto = items[0] if len(items) else None
                        del items[:]
                        for i in range(n):
                            item = items.add()
                            if proto is not None:
                                item.CopyFrom(proto)
                            if hasattr(item, "lease_id"):
                                item.lease_id = rng.choice([self.pool.alice.lease_id, f"l{i}"])
                        what.append(f"{name}: {n} items")
                continue
            if fd.message_type is not None:
                if depth < 2:
                    self.mutate_fields(getattr(msg, name), what, depth + 1)
                continue
            value: Any
            if fd.type == fd.TYPE_STRING:
                value = rng.choice([*STRINGS, self.pool.alice.lease_id, "binpack", "127.0.0.1:99999"])
            elif fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
                value = rng.choice(FLOATS)
            elif fd.type == fd.TYPE_BOOL:
                value = not getattr(msg, name)
            elif fd.type in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
                value = rng.choice([u for u in UINTS if u < 2**32])
            elif fd.type in (fd.TYPE_UINT64, fd.TYPE_FIXED64):
                value = rng.choice(UINTS)
            elif fd.type in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32):
                value = rng.choice([-(2**31), -1, 0, 2**31 - 1])
            elif fd.type in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
                value = rng.choice([-(2**63), -1, 0, 2**63 - 1])
            else:
                continue
            setattr(msg, name, value)
            what.append(f"{name}={value!r:.40}")

    def mutate_bytes(self, body: bytes, what: list[str]) -> bytes:
        rng = self.rng
        data = bytearray(body)
        kind = rng.randrange(5)
        if kind == 0 and data:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            what.append("bytes flipped")
        elif kind == 1 and data:
            data = data[: rng.randrange(len(data))]
            what.append(f"cut to {len(data)}")
        elif kind == 2:
            at = rng.randrange(len(data) + 1)
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            what.append("bytes inserted")
        elif kind == 3:
            data += b"\x0a" + bytes([0xFF, 0xFF, 0xFF, 0x7F])  # a field claiming 256 MiB that never come
            what.append("length past the end")
        else:
            data += b"\x7a\x80\x80\x40" + b"\xaa" * (MAX_REQUEST_BYTES + 1)  # an unknown field of 1 MiB + 1
            what.append("past MAX_REQUEST_BYTES")
        return bytes(data)

    def mutate_credentials(self, who: str, what: list[str]) -> list[tuple[str, Any]]:
        rng = self.rng
        token = API_TOKENS[who]
        kind = rng.randrange(12)
        if kind == 0:
            bad = token[:-1] + chr(ord(token[-1]) ^ 1)
        elif kind == 1:
            bad = token[: rng.randrange(len(token))]
        elif kind == 2:
            bad = token + rng.choice(["x", " ", "\t", API_TOKENS["alice"]])
        elif kind == 3:
            bad = "A" * rng.choice([1000, 7000])
        elif kind == 4:
            bad = self.pool.alice.devices[0].token  # a lease token is no API token
        elif kind == 5:
            what.append("scheme Basic")
            return [("authorization", f"Basic {token}")]
        elif kind == 6:
            what.append("empty authorization")
            return [("authorization", "")]
        elif kind in (7, 8):
            pair = [("authorization", f"Bearer {token}"), ("authorization", f"Bearer {API_TOKENS['alice']}")]
            what.append("repeated authorization")
            return pair if kind == 7 else pair[::-1]
        elif kind == 9:
            what.append("authorization-bin")
            return [("authorization-bin", b"\xff\xfe" + token.encode())]
        elif kind == 10:
            what.append("no credential")
            return []
        else:
            bad = API_TOKENS["ops"].upper()
        what.append(f"token {bad[:20]!r}... ({len(bad)})")
        return [("authorization", f"Bearer {bad}")]

    def case(self) -> Case:
        rng = self.rng
        method = rng.choice(METHODS)
        who, msg = self.base(method)
        what: list[str] = []
        metadata: list[tuple[str, Any]] = list(Pool.md(who))
        kind = rng.random()
        if kind < 0.2:
            metadata = self.mutate_credentials(who, what)
        if kind >= 0.1:
            self.mutate_fields(msg, what)
        body = msg.SerializeToString()
        if rng.random() < 0.2:
            body = self.mutate_bytes(body, what)
        if rng.random() < 0.05:
            who = rng.choice(["alice", "h2", "ops"])  # a method its role may not call, or an operator's
            metadata = list(Pool.md(who))
            what.append(f"as {who}")
        return Case(method, who, metadata, body, what)

    # ---- running and checking ----

    def send(self, case: Case) -> Outcome:
        call = self.pool.channel.unary_unary(
            f"/gpupool.v1.Scheduler/{case.method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            reply = call(case.body, metadata=case.metadata, timeout=10)
            return Outcome(grpc.StatusCode.OK, "", reply)
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""  # type: ignore[attr-defined]
            if code == grpc.StatusCode.INTERNAL and details == "Invalid metadata":  # the client's own check: not sent
                return Outcome(grpc.StatusCode.OK, f"not sent: {details}", b"")
            return Outcome(code, details, b"")
        except ValueError as exc:  # metadata gRPC itself refuses to send (the client's own check)
            return Outcome(grpc.StatusCode.OK, f"not sent: {exc}", b"")

    def run(self, case: Case) -> list[str]:
        before = self.pool.rows()
        out = self.send(case)
        after = self.pool.rows()
        self.codes[out.code.name] += 1
        problems = self.check(case, out, before, after)
        if out.code == grpc.StatusCode.OK and case.method == "Allocate" and out.reply:
            lease = scheduler_pb2.Lease.FromString(out.reply)  # released at once (by an operator: whoever's it is)
            self.pool.stub.Release(
                scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id), metadata=Pool.md("ops"), timeout=10
            )  # (or, with a TTL of nothing, the sweeper would end it while a later case runs)
            if lease.tenant == "mallory":
                self.mine.append(lease.lease_id)
        alive = self.pool.serves_alice()
        if alive and case.who in ("alice", "ops", "h1", "h2"):  # powers they have: the pool is set up again
            try:
                self.pool.restore()
                alive = self.pool.serves_alice()
            except grpc.RpcError as err:
                alive = f"the pool cannot be set up again: {err.code()} {err.details()}"  # type: ignore[attr-defined]
        if alive:
            problems.append(alive)
        return [f"{case.method} as {case.who} {case.what}: {p}" for p in problems]

    def check(self, case: Case, out: Outcome, before: Any, after: Any) -> list[str]:
        problems = []
        waited = case.method == "Allocate" and any(w.startswith("wait_seconds=") for w in case.what)
        if out.code == grpc.StatusCode.DEADLINE_EXCEEDED and waited:
            pass  # it asked to wait (in a pool an operator's case drained): the client's own deadline ended it
        elif out.code not in ACTIONABLE:
            problems.append(f"status {out.code.name}: {out.details[:300]}")
        if "Traceback" in out.details or 'File "' in out.details:
            problems.append(f"a traceback in the reply: {out.details[:300]}")
        if len(out.details) > MAX_DETAILS + 20:
            problems.append(f"a message of {len(out.details)} characters")
        if out.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Stream removed" in out.details:
            problems.append(f"the status was lost in transport: {out.details[:200]}")
        sent = case.body + repr(case.metadata).encode()
        if case.who not in ("alice", "ops"):  # an operator sees every lease id (ListPool), by design
            # A host is told the ids of the leases on it that ended (a heartbeat's revoked_leases): a lease id is a
            # public name to the hosts that serve it (docs/security.md), a secret to other tenants.
            secrets = self.pool.secrets[1:] if case.who in ("h1", "h2") else self.pool.secrets
            published = repr(before[0])  # what the hosts registered (ListPool shows everyone): h1, which serves
            for secret in secrets:  # alice's lease and so knows its id, may have put it in a UUID or label (secrev52)
                if secret.encode() in sent or secret in published:
                    continue
                if secret.encode() in out.reply or secret in out.details:
                    problems.append(f"another party's secret {secret[:12]}... in the reply")
        if out.code != grpc.StatusCode.OK and before != after:
            problems.append("a refused call changed the store")
        if case.method == "ListPool" and case.who != "ops" and out.code == grpc.StatusCode.OK:
            # (audit55) an operator's fields: a host's status token, a device's measured free memory (smi54: beside
            # a tenant's own use it tells the others')
            hosts = scheduler_pb2.PoolState.FromString(out.reply).hosts
            if any(h.status_token or any(d.HasField("measured_free_bytes") for d in h.devices) for h in hosts):
                problems.append("an operator's field (status token, measured free memory) in its ListPool")
        return problems


def campaign(
    tmp: Path, ca_file: str, server_tls: tls.TlsConfig, cases: int, seed: int
) -> tuple[list[str], Counter[str]]:
    """Run `cases` cases against a fresh pool; (problems, statuses seen)."""
    pool = Pool(tmp, ca_file, server_tls, auth_fail_rate=0.0, tenant_rate=0.0)  # the checks call as fast as they can
    try:
        fuzzer = Fuzzer(pool, random.Random(seed))
        problems: list[str] = []
        for _ in range(cases):
            problems += fuzzer.run(fuzzer.case())
        return problems, fuzzer.codes
    finally:
        pool.close()


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import support

    n, seed = int(sys.argv[1]), int(sys.argv[2])
    with tempfile.TemporaryDirectory() as d:
        p = support.install_test_tls(Path(d) / "pki")
        start = time.monotonic()
        found, seen = campaign(Path(d), p.ca_file, p.server_config(), n, seed)
        print(f"{n} cases, seed {seed}, {time.monotonic() - start:.0f} s: {dict(seen)}")
        for line in found[:50]:
            print(line)
        print(f"{len(found)} problem(s)")
