"""Red team, round 35 (cred35): the scheduler as the pool's credential authority, and what a host's registration
reaches. Real servers on loopback (the test PKI, mutual TLS or API tokens), `gpupool smi`/`list-gpus` as processes.

Found and fixed here (each test fails on 83b2932):
- a token removed from the scheduler's credentials file stayed valid for as long as the scheduler ran when the same
  edit (or any later one) left a line the parser refused, or when the file was removed: the table read before was
  kept whole (scheduler/auth.py `Credentials`);
- an old public key removed from a daemon's `--token-public-keys` file (rotation, step 3) still admitted its tokens
  when the file held a block that did not parse: every key read before was kept (gpupool/tokens.py `Verifier`);
- a host (its join token or certificate) registered device models, UUIDs, labels and an address holding escape
  sequences and rich markup, which `gpupool list-gpus` printed raw and `gpupool smi` rendered: `[/bold]` ended smi
  with a MarkupError for every user, ESC sequences reached the reader's terminal (an OSC 52 writes its clipboard);
  a daemon's Status (any server at a host's address) reached smi's tenants table alike (scheduler/hosts.py
  `check_printable`, client/smi.py `safe`);
- a lease asked for a day kept renewing by a day after the scheduler restarted with a lower `--max-lease-ttl`
  (scheduler/leases.py `Core.renew`);
- a client certificate naming two gpupool identities was the first one the TLS layer listed (scheduler/auth.py);
- a host marked down never heard of the revocations of the leases it lost (scheduler/hosts.py `mark_silent_down`);
- `gpupool up` used the token key it found in a state folder another user owned (gpupool/up.py `check_state_dir`);
- a `LeasedDevice`'s repr (a log line, `print(lease.devices)`, pytest's locals) showed its token (client/pool.py).
docs/security.md "Red team, round 35 (cred35)" lists these and the attacks that failed.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from gpupool.client.pool import LeasedDevice, SchedulerClient
from gpupool.client.session import Session
from gpupool.scheduler.auth import credential_line
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from scheduler_fixtures import ROOT, Proc, SimHost, key_file, start_scheduler, wait_until
from support import DaemonFactory, get_pki, mint_token, public_key_file
from test_scheduler_hostile import _client_cert

from gpupool import tls, tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc
from gpupool.config import write_secret
from gpupool.errors import GpupoolError, Unauthenticated

# What a rogue host puts where the pool's tools print it: rich markup that does not parse, a link, a screen clear
# and an OSC 52 (sets the reader's clipboard), a right-to-left override.
FAST = ["--host-timeout", "5", "--heartbeat-interval", "0.3"]
HOSTILE = "A100 [/bold] [link=https://evil.example]x[/link] \x1b[2J\x1b]52;c;ZXZpbA==\x1b\\ \u202eevil"


def _api_scheduler(creds: Path) -> SchedulerServer:
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0", credentials=str(creds), auth_fail_rate=0.0,
        tls=dataclasses.replace(get_pki().server_config(), client_auth="none"),
    )  # fmt: skip
    return SchedulerServer(config, tokens.Signer.from_seed(b"cred35")).start()


def _identity_of(server: SchedulerServer, token: str, tmp: Path) -> str:
    """'ok' when `token` is accepted (a ListPool), else the refusal's class name."""
    path = tmp / f"{token}.token"
    write_secret(path, (token + "\n").encode())
    client = SchedulerClient(server.address, tls.TlsConfig(ca=get_pki().ca_file, api_token_file=str(path)))
    try:
        client.list_pool()
        return "ok"
    except GpupoolError as exc:
        return type(exc).__name__
    finally:
        client.close()


def test_a_token_removed_from_the_credentials_file_is_refused_whatever_else_the_file_holds(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(credential_line("tenant", "tina", "t0k") + credential_line("tenant", "mallory", "m4l"))
    server = _api_scheduler(creds)
    try:
        assert _identity_of(server, "m4l", tmp_path) == "ok"
        # mallory's line removed; a line of the same edit is one the parser refuses (a hash cut short)
        creds.write_text(credential_line("tenant", "tina", "t0k") + "tenant bob sha256:0123\n")
        assert _identity_of(server, "m4l", tmp_path) == "Unauthenticated"  # 83b2932: still "ok"
        assert _identity_of(server, "t0k", tmp_path) == "ok"  # the lines that parse are the table
        creds.unlink()  # every API token withdrawn
        assert _identity_of(server, "t0k", tmp_path) == "Unauthenticated"  # 83b2932: still "ok"
        creds.write_text(credential_line("tenant", "tina", "t0k"))
        assert _identity_of(server, "t0k", tmp_path) == "ok"  # back with the file
    finally:
        server.stop(grace=0.5)


def test_a_public_key_removed_from_a_daemons_file_is_refused_whatever_else_the_file_holds(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    public = tmp_path / "token.pub"
    old = tokens.generate_key_file(tmp_path / "old.key", public)
    new = tokens.Signer.from_seed(b"cred35-new")
    public.write_bytes(public.read_bytes() + tokens.public_pem(new.public))  # rotation, step 1
    handle = daemon_factory(token_key=tokens.load_verifier(public))
    # Step 3: the old key removed; the same edit holds a block that is no key (a paste cut short).
    garbage = b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"
    public.write_bytes(tokens.public_pem(new.public) + garbage)
    time.sleep(1.1)  # the file is looked at once a second
    with pytest.raises(Unauthenticated, match="unknown key"):  # 83b2932: admitted (both keys kept)
        Session.attach(handle.address, mint_token(old, host=handle.host_id))
    with Session.attach(handle.address, mint_token(new, host=handle.host_id)) as s:
        s.sync()


class _RogueDevice(grpc.GenericRpcHandler):
    """What answers at a rogue host's address: any server; here one whose Status names hostile sessions."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != "/gpupool.v1.Device/Status":
            return None
        reply = device_pb2.StatusReply(
            host_id="rogue",
            sessions=[device_pb2.SessionUsage(session_id=HOSTILE, lease_id=HOSTILE, tenant=HOSTILE, limit_bytes=1)],
        )
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: reply,
            device_pb2.StatusRequest.FromString,
            device_pb2.StatusReply.SerializeToString,
        )


@pytest.fixture
def rogue_pool() -> Iterator[tuple[str, str]]:
    """A scheduler (mutual TLS) and a rogue Device server; (scheduler address, rogue address)."""
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0",
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )  # fmt: skip
    server = SchedulerServer(config, tokens.Signer.from_seed(b"cred35")).start()
    rogue = grpc.server(futures.ThreadPoolExecutor(2), handlers=[_RogueDevice()])
    port = tls.add_port(rogue, "127.0.0.1:0", get_pki().server_config(), "rogue")
    rogue.start()
    yield server.address, f"127.0.0.1:{port}"
    rogue.stop(0)
    server.stop(grace=0.5)


def _register(scheduler: str, address: str, model: str = "fake", uuid: str = "GPU-r", **labels: str) -> grpc.StatusCode:
    channel = tls.channel(scheduler, cfg=get_pki().client_config("host", "rogue"))
    try:
        scheduler_pb2_grpc.SchedulerStub(channel).Register(
            scheduler_pb2.RegisterRequest(
                host_id="rogue",
                address=address,
                labels=labels,
                devices=[device_pb2.DeviceInfo(index=0, uuid=uuid, model=model, memory_bytes=1 << 30)],
            ),  # fmt: skip
            timeout=10,
        )
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()
    finally:
        channel.close()


def _tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A `gpupool` command, as the test process's operator certificate unless `env` says otherwise."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "1000", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gpupool.cli", *args], env=full, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_a_host_cannot_write_to_the_terminals_of_smi_and_list_gpus(rogue_pool: tuple[str, str]) -> None:
    scheduler, rogue = rogue_pool
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert _register(scheduler, rogue, model=HOSTILE) == invalid  # 83b2932: OK
    assert _register(scheduler, rogue, uuid="GPU-\x1b[2J") == invalid
    assert _register(scheduler, rogue, zone="eu\x1b]52;c;ZXZpbA==\x07") == invalid
    assert _register(scheduler, "rogue\x1b[2J:50051") == invalid
    # Brackets are printable: stored as they are, shown as text. Its daemon's Status (any server) names the rest.
    assert _register(scheduler, rogue, model="A100 [/bold] [link=https://evil.example]x[/link]") == grpc.StatusCode.OK
    smi, gpus = _tool("smi", "--scheduler", scheduler), _tool("list-gpus", "--scheduler", scheduler)
    for done in (smi, gpus):
        assert done.returncode == 0, done.stderr  # 83b2932: smi ended in rich's MarkupError
        assert "\x1b" not in done.stdout and "\u202e" not in done.stdout, done.stdout
        assert "A100 [/bold] [link=https://evil.example]x[/link]" in done.stdout, done.stdout  # text, not markup
    assert "\\x1b[2J" in smi.stdout and "\\u202eevil" in smi.stdout, smi.stdout  # the Status's, escaped


def test_a_renewal_lives_no_longer_than_the_schedulers_policy_of_now(tmp_path: Path) -> None:
    """A lease asked for a day while `--max-lease-ttl` allowed it; the operator then restarts the scheduler with an
    hour. 83b2932 renewed it by its day for good (and minted tokens of a day), whatever the policy had become."""
    state = tmp_path / "scheduler.db"
    proc, address = start_scheduler(tmp_path, *FAST, state=state)
    host = SimHost(address, "h").start()
    try:
        held = SchedulerClient(address).allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, ttl_seconds=86400))
        assert held.ttl_seconds == 86400
        proc.stop()
        proc, address = start_scheduler(tmp_path, *FAST, "--listen", address, "--max-lease-ttl", "3600", state=state)
        client = SchedulerClient(address)
        renewed = client.renew(held.lease_id)
        assert renewed.ttl_seconds == 3600 and renewed.expires_at <= time.time() + 3600  # 83b2932: a day again
        claims = tokens.verify(tokens.Verifier.from_file(public_key_file(key_file(tmp_path))), renewed.devices[0].token)
        assert claims.expires_at == renewed.expires_at
        client.release(held.lease_id)
    finally:
        host.stop()
        proc.stop()


def test_a_certificate_naming_two_identities_is_no_identity(tmp_path: Path) -> None:
    """A certificate with the URIs `gpupool://tenant/alice` and `gpupool://admin/ops` (a CA's policy that checks one
    of a request's URIs): 83b2932 took the first the TLS layer listed, whichever that was. As two `authorization`
    headers (round 33), two identities are refused."""
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0",
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )  # fmt: skip
    server = SchedulerServer(config, tokens.Signer.from_seed(b"cred35")).start()
    try:
        for uris in (("gpupool://tenant/alice", "gpupool://admin/ops"), ("gpupool://admin/ops", "gpupool://tenant/a")):
            client = SchedulerClient(server.address, _client_cert(tmp_path, *uris))
            with pytest.raises(Unauthenticated, match="names 2 identities"):
                client.list_pool()
            client.close()
        same = SchedulerClient(server.address, _client_cert(tmp_path, "gpupool://tenant/t", "gpupool://tenant/t"))
        assert not same.list_pool().leases  # one identity named twice is that identity
        same.close()
    finally:
        server.stop(grace=0.5)


def test_a_host_that_comes_back_is_told_of_the_leases_lost_while_it_was_away(tmp_path: Path) -> None:
    """A host silent past `--host-timeout` is marked down and its leases lost (their capacity goes to others). 83b2932
    then dropped the revocations it had for that host: back, it was never told of them, and the tenant of a lost
    lease attached with its unexpired token there again (until the session showed in a heartbeat)."""
    proc, address = start_scheduler(tmp_path, "--host-timeout", "3", "--heartbeat-interval", "0.3")
    host = SimHost(address, "h").start()
    try:
        held = SchedulerClient(address).allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
        host.stop()  # silent: partitioned, paused
        wait_until(lambda: any(h.state == "down" for h in SchedulerClient(address).list_pool().hosts), what="down")
        host = SimHost(address, "h").start()  # back: registers again
        wait_until(lambda: held.lease_id in host.revoked, timeout=10, what="the lost lease revoked")  # 83b2932: never
        # Removed by an operator with --force while its daemon runs: it registers again, and hears of the lease too.
        again = SchedulerClient(address).allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
        assert SchedulerClient(address).remove_host("h", force=True) == 1
        wait_until(lambda: again.lease_id in host.revoked, timeout=10, what="the removed host's lease revoked")
    finally:
        host.stop()
        proc.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_up_keeps_its_keys_only_in_a_folder_of_its_own(tmp_path: Path) -> None:
    """`gpupool up` reused the token key and CA key it found in its state folder (making them when absent), and
    chmod'ed the folder 0700: in a folder another user owns (made before, /tmp/gpupool) that user's own key,
    planted there 0600, passed every mode check and signed the pool's tokens - and the folder stayed theirs to
    write. With `--state` in a folder others share (a /tmp), root's `up` made it 0700 for everyone. Refused now,
    in one line, before anything is read, written or chmod'ed there."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    planted = tokens.generate_key_file(theirs / "token.key")  # mallory's key, 0600: the mode checks pass it
    for path in (theirs, theirs / "token.key"):
        os.chown(path, 65534, 65534)  # nobody
    shared = tmp_path / "shared"  # as /tmp: everyone's, sticky
    shared.mkdir()
    os.chmod(shared, 0o1777)
    for folder, why in ((theirs, "belongs to uid 65534"), (shared, "writable by other users")):
        up = Proc(["up", "--fake-gpus", "1", "--scheduler-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0",
                   "--state", str(folder / "scheduler.db"), "--metrics-listen", "0", "--scheduler-metrics-listen", "0",
                   "--ca-dir", ""])  # fmt: skip
        try:
            assert up.popen.wait(60) == 1, up.log()  # 83b2932: ran, its scheduler signing with mallory's key
        except subprocess.TimeoutExpired:
            raise AssertionError("gpupool up ran with a state folder not its own:\n" + up.log()) from None
        finally:
            up.kill()
        assert why in up.log() and "Traceback" not in up.log(), up.log()
    assert (theirs / "token.key").stat().st_uid == 65534 and tokens.load_signer(theirs / "token.key").kid == planted.kid
    assert oct(shared.stat().st_mode & 0o7777) == "0o1777" and oct(theirs.stat().st_mode & 0o777) == "0o755"


def test_an_operator_ends_a_tenants_leases_with_gpupool_lease_release(tmp_path: Path) -> None:
    """Removing a tenant's credential ends its calls to the scheduler, not its leases (their tokens admit sessions
    until they expire). `gpupool lease release --tenant NAME` is the operator's way to end them now: capacity back,
    and the revocation reaches the lease's host at its next heartbeat. A tenant names only leases it may see."""
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0", heartbeat_interval=0.3,
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )  # fmt: skip
    server = SchedulerServer(config, tokens.Signer.from_seed(b"cred35")).start()
    host = SimHost(server.address, "h", gpus=2).start()
    try:
        leases = {}
        for tenant in ("alice", "mallory"):
            client = SchedulerClient(server.address, get_pki().client_config("tenant", tenant))
            leases[tenant] = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5)).lease_id
            client.close()
        files = get_pki().issue("tenant", "mallory")
        as_mallory = {"GPUPOOL_TLS_CERT": str(files.cert), "GPUPOOL_TLS_KEY": str(files.key)}
        done = _tool("lease", "release", leases["alice"][:12], "--scheduler", server.address, env=as_mallory)
        assert done.returncode == 1 and "names no active lease you may see" in done.stderr, done
        done = _tool("lease", "release", "--tenant", "mallory", "--scheduler", server.address)  # the operator
        assert done.returncode == 0 and f"lease {leases['mallory']} released" in done.stdout, done
        wait_until(lambda: leases["mallory"] in host.revoked, what="the revocation at the lease's host")
        active = {x.lease_id for x in SchedulerClient(server.address).list_pool().leases}
        assert active == {leases["alice"]}
        done = _tool("host", "remove", "nowhere", "--scheduler", server.address)  # `gpupool host`, beside it
        assert done.returncode == 1 and done.stderr.startswith("gpupool host remove: "), done
    finally:
        host.stop()
        server.stop(grace=0.5)


def test_a_leased_devices_repr_holds_no_token() -> None:
    """`print(lease.devices)`, a log line of one, pytest's locals in a failing test: 83b2932 showed each token."""
    device = LeasedDevice("h", "127.0.0.1:1", 0, "GPU-h-0", 1 << 30, 0.5, "kid.claims.SIGNATURE")
    assert "SIGNATURE" not in repr(device) and "SIGNATURE" not in str([device]) and "GPU-h-0" in repr(device)
