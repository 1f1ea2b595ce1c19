"""Round 15's hostile review of the credential chain, the parts without a network: the scheduler core's own guard
against a lease that never expires, and the build caches whose shared libraries clients and daemons load
(tests/integration/test_credential_chain_hostile.py has the attacks over gRPC)."""

from __future__ import annotations

import hashlib
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gpupool.scheduler import auth
from gpupool.scheduler.hosts import DeviceSpec
from gpupool.scheduler.leases import Core, CoreConfig
from gpupool.scheduler.placement import Request
from gpupool.scheduler.store import MemoryStore

from gpupool import config, errors, tokens
from gpupool.errors import InvalidArgument

KEY = b"k" * 32


@pytest.mark.parametrize("ttl, wait", [(math.nan, 0.0), (10.0, math.nan), (10.0, math.inf)])
def test_the_core_refuses_a_ttl_or_wait_that_is_not_finite(ttl: float, wait: float) -> None:
    """The gRPC servicer checks isfinite, but Core.allocate is the domain API (library users, future callers): a
    NaN ttl made a lease whose expiry is NaN - never swept, its capacity held for good - and whose tokens carried
    `expires_at: NaN`."""
    core = Core(MemoryStore(), KEY, CoreConfig())
    core.hosts.register("h0", "127.0.0.1:1", [DeviceSpec(0, "u", "fake", 1 << 30, True)])
    with pytest.raises(InvalidArgument, match="finite"):
        core.allocate(Request(1, fraction=0.5), tenant="a", ttl=ttl, wait=wait)
    assert not core.leases
    lease = core.allocate(Request(1, fraction=0.5), tenant="a", ttl=10.0)
    assert math.isfinite(tokens.verify(KEY, core.token(lease, 0)).expires_at)


# ---- build caches: another user must not be able to plant the library we load ----


def _plant(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF not what you built")


def _cache_paths() -> list[tuple[str, object]]:
    """(cache variable, a function answering the path of the library loaded from that cache) for every cache."""
    pytest.importorskip("torch")
    from gpupool.client.native import backend
    from gpupool.client.torch import native as guard
    from gpupool.server import native_runner

    def runner_path() -> Path:
        import hashlib

        import torch

        digest = hashlib.sha256(native_runner.SOURCE.read_bytes()).hexdigest()[:16]
        return native_runner.cache_dir() / f"torch-{torch.__version__}-{digest}" / "gpupool_native_runner.so"

    return [
        ("GPUPOOL_NATIVE_CLIENT_CACHE", backend.built_path),
        ("GPUPOOL_NATIVE_CACHE", guard.library_path),
        ("GPUPOOL_NATIVE_RUNNER_CACHE", runner_path),
    ]


def test_a_library_planted_in_a_world_writable_cache_is_never_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache folder others can write (GPUPOOL_*_CACHE or XDG_CACHE_HOME on shared scratch): another user creates
    the folder of this torch version and source hash (both predictable) and puts a library in it; `build()` found
    it "already built" and the process loaded it - their code in our process. Now the folder is refused."""
    from gpupool.client.native import backend
    from gpupool.client.torch import native as guard
    from gpupool.server import native_runner

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    for env, where in _cache_paths():
        monkeypatch.setenv(env, str(shared / env))
        (shared / env).mkdir()
        os.chmod(shared / env, 0o777)  # made by someone else, open to all
        with pytest.raises(config.UnsafeCacheDir, match="writable by other users"):
            _plant(where())  # type: ignore[operator]
    # the loaders themselves: the C++ client's build, the device guard's, the daemon's runner's
    with pytest.raises(config.UnsafeCacheDir):
        backend.build()
    with pytest.raises(config.UnsafeCacheDir):
        guard.build()  # install() logs this and keeps torch's Python guard
    with pytest.raises(config.UnsafeCacheDir):
        native_runner._built()


def test_the_cache_folder_is_made_owner_only_and_checked_above(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_CACHE", str(tmp_path / "a" / "b"))
    made = config.cache_dir("x", "T_CACHE")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    # a folder above it that others may write (and may rename ours away): refused
    os.chmod(tmp_path / "a", 0o777)
    with pytest.raises(config.UnsafeCacheDir, match=str(tmp_path / "a")):
        config.cache_dir("x", "T_CACHE")
    # ...unless it has the sticky bit (/tmp): others cannot rename what is ours there
    os.chmod(tmp_path / "a", 0o1777)
    assert config.cache_dir("x", "T_CACHE") == made
    # a symbolic link is followed: what counts is where the files really are
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    (tmp_path / "link").symlink_to(open_dir)
    monkeypatch.setenv("T_CACHE", str(tmp_path / "link"))
    with pytest.raises(config.UnsafeCacheDir):
        config.cache_dir("x", "T_CACHE")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_a_cache_folder_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)  # nobody
    monkeypatch.setenv("T_CACHE", str(theirs))
    with pytest.raises(config.UnsafeCacheDir, match="belongs to uid 65534"):
        config.cache_dir("x", "T_CACHE")


_GROUP_CHECK = r"""
import os, sys
from pathlib import Path
from gpupool import config
folder, lib = Path(sys.argv[1]), Path(sys.argv[1]) / "x.so"
checks = (("folder", lambda: config.check_private_dir(folder)), ("library", lambda: config.check_private_file(lib)))
for what, check in checks:
    try:
        check()
        print(what, "accepted")
    except config.UnsafeCacheDir as exc:
        print(what, "refused:", exc)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process in another group")
def test_a_cache_writable_by_a_shared_primary_group_is_refused(tmp_path: Path) -> None:
    """A process whose primary group others share (`users`, gid 100, with umask 002 a folder it makes is
    group-writable): until round 28 a folder of its own group passed `check_private_dir`, so any member of that
    group could plant the library it loads. Only a user-private group's write bit (the group named as the user,
    no other member) passes now; the same folder of this user's private group does."""
    import grp

    shared_gid = 100
    try:
        grp.getgrgid(shared_gid)
    except KeyError:
        pytest.skip("no group 100 here")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "x.so").write_bytes(b"\x7fELF")
    os.chmod(tmp_path, 0o755)
    for path, mode in ((cache, 0o775), (cache / "x.so", 0o664)):
        os.chown(path, 0, shared_gid)
        os.chmod(path, mode)
    ran = subprocess.run(
        [sys.executable, "-c", _GROUP_CHECK, str(cache)], capture_output=True, text=True, timeout=60, group=shared_gid
    )
    assert ran.returncode == 0, ran.stderr
    name = grp.getgrgid(shared_gid).gr_name
    lines = ran.stdout.splitlines()
    assert lines[0].startswith("folder refused:") and f"group {name}, gid {shared_gid}" in lines[0], ran.stdout
    assert "is not this user's private group" in lines[0] and "chmod g-w" in lines[0], ran.stdout
    cache.chmod(0o755)  # the folder fixed: the library's own group write bit is refused next
    ran = subprocess.run(
        [sys.executable, "-c", _GROUP_CHECK, str(cache)], capture_output=True, text=True, timeout=60, group=shared_gid
    )
    assert ran.stdout.splitlines()[1].startswith("library refused:"), ran.stdout
    # this user's own private group (root's `root`, no other member): its write bit is no one else's
    if config._private_group(os.getegid()):
        for path, mode in ((cache, 0o775), (cache / "x.so", 0o664)):
            os.chown(path, 0, os.getegid())
            os.chmod(path, mode)
        config.check_private_file(cache / "x.so")


def _refused_with_a_shared_cache(tmp_path: Path, cmd: list[str], env: dict[str, str]) -> None:
    """`cmd` with the C++ client's cache in a folder every user can write: it ends in one line (no traceback) and
    never runs the command, nor builds or loads a library there."""
    pytest.importorskip("torch")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    inherited = ("GPUPOOL_LEASE", "GPUPOOL_CUDA", "GPUPOOL_CLIENT", "TORCH_DEVICE_BACKEND_AUTOLOAD")
    env = {
        **{k: v for k, v in os.environ.items() if k not in inherited},
        "GPUPOOL_NATIVE_CLIENT_CACHE": str(shared),
        **env,
    }
    ran = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert ran.returncode == 1 and "ran" not in ran.stdout
    assert ran.stderr.count("\n") == 1 and "writable by other users" in ran.stderr, ran.stderr
    assert not any(shared.iterdir())


def test_gpupool_run_refuses_an_unsafe_cache_in_one_line(tmp_path: Path) -> None:
    """`gpupool run --native-client` builds (or finds) the C++ client before it leases: it stops there."""
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--native-client", "--", sys.executable, "-c", "print('ran')"]
    _refused_with_a_shared_cache(tmp_path, cmd, {"GPUPOOL_SCHEDULER": "127.0.0.1:9"})


def test_native_client_env_refuses_an_unsafe_cache_in_one_line(tmp_path: Path) -> None:
    """`$GPUPOOL_CLIENT=native` outside `gpupool run`: `import torch` loads the C++ client from the backend entry
    point, and stops there."""
    _refused_with_a_shared_cache(
        tmp_path, [sys.executable, "-c", "import torch; print('ran')"], {"GPUPOOL_CLIENT": "native"}
    )


def _api_token(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_TOKEN")}
    cmd = [sys.executable, "-m", "gpupool.cli", "token", "api-token", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_api_token_out_is_owner_only_even_when_it_existed(tmp_path: Path) -> None:
    """O_CREAT's 0600 applies to a new file only: an --out that existed (0644, say from `touch`) kept its mode, and the
    new bearer token was readable by every local user."""
    creds, out = tmp_path / "credentials", tmp_path / "alice.token"
    out.write_text("")
    os.chmod(out, 0o644)
    made = _api_token("--role", "tenant", "--name", "alice", "--credentials", str(creds), "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["alice\nadmin root", "two words", "a#b", "", "x" * 129])
def test_api_token_names_cannot_break_the_credentials_file(tmp_path: Path, name: str) -> None:
    """A newline in --name wrote a second line (another role, another name) into the credentials file; a space made
    a line the scheduler refuses - and a scheduler refuses to start on such a file."""
    from gpupool.scheduler.auth import parse_credentials

    creds, out = tmp_path / "credentials", tmp_path / "t.token"
    assert _api_token("--name", "ok", "--credentials", str(creds), "--out", str(out)).returncode == 0
    before = creds.read_text()
    made = _api_token("--role", "tenant", "--name", name, "--credentials", str(creds), "--out", str(out))
    assert made.returncode == 2 and "--name" in made.stderr
    assert creds.read_text() == before and len(parse_credentials(before)) == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_the_scheduler_refuses_a_tenant_limit_that_is_not_a_number(value: str) -> None:
    """`--tenant-max-share nan` passed `< 0` and then made every Allocate fail with INTERNAL (round(nan))."""
    cmd = [sys.executable, "-m", "gpupool.cli", "scheduler", "--tenant-max-share", value, "--listen", "127.0.0.1:0"]
    ran = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2 and "--tenant-max-share" in ran.stderr, ran.stderr


@pytest.mark.parametrize("age_s", [0, 3600], ids=["just-written", "an-hour-old"])
def test_a_removed_api_token_stops_working_even_when_size_and_mtime_are_kept(tmp_path: Path, age_s: int) -> None:
    """Replacing a tenant's token by another of the same length, in place, within one timestamp tick (or putting
    the mtime back) kept the (mtime, size) stamp the scheduler compared: the revoked token went on working."""
    path = tmp_path / "credentials"
    line = "tenant alice sha256:{}\n"
    old, new = "a" * 40, "b" * 40
    path.write_text(line.format(hashlib.sha256(old.encode()).hexdigest()))
    then = time.time_ns() - age_s * 10**9
    os.utime(path, ns=(then, then))
    creds = auth.Credentials(str(path))
    assert creds.lookup(old) is not None and creds.lookup(new) is None
    with path.open("r+") as f:  # the same inode, the same size
        f.write(line.format(hashlib.sha256(new.encode()).hexdigest()))
    os.utime(path, ns=(then, then))
    assert path.stat().st_size == len(line.format("0" * 64)) and path.stat().st_mtime_ns == then
    assert creds.lookup(old) is None
    assert creds.lookup(new) is not None and creds.lookup(new).name == "alice"


def test_tokens_of_a_lease_of_several_devices_share_a_group_secret_across_renewals() -> None:
    """Each rank of a multi-GPU job renews the lease in its own process, so the ranks hold different tokens of it;
    the daemons key the job's collective group from the `group` claim, which must be the same in all of them,
    differ between leases and keys, and never appear in a lease of one device."""
    core = Core(MemoryStore(), KEY, CoreConfig())
    core.hosts.register("h0", "127.0.0.1:1", [DeviceSpec(i, f"u{i}", "fake", 1 << 30, True) for i in range(2)])
    two = core.allocate(Request(2, fraction=0.5), tenant="a", ttl=60.0)
    first = [tokens.verify(KEY, core.token(two, i)) for i in range(2)]
    time.sleep(0.01)
    core.renew(two.lease_id, tenant="a")
    again = [tokens.verify(KEY, core.token(two, i)) for i in range(2)]
    assert again[0].expires_at > first[0].expires_at
    assert {c.group for c in first + again} == {tokens.lease_group(KEY, two.lease_id)}
    assert len(first[0].group) == 64
    other = core.allocate(Request(2, fraction=0.25), tenant="a", ttl=60.0)
    assert tokens.verify(KEY, core.token(other, 0)).group not in ("", first[0].group)
    assert tokens.lease_group(b"another key", two.lease_id) != first[0].group
    one = core.allocate(Request(1, fraction=0.25), tenant="a", ttl=60.0)
    assert tokens.verify(KEY, core.token(one, 0)).group == ""


@pytest.mark.parametrize("group", ["xyz", "A" * 64, "0" * 63, "0" * 65])
def test_a_malformed_group_claim_is_refused(group: str) -> None:
    claims = tokens.TokenClaims("l", "h", 0, 0, 0.5, time.time() + 60, "t", network=True, group=group)
    with pytest.raises(errors.Unauthenticated, match="out of range"):
        tokens.verify(KEY, tokens.mint(KEY, claims))


def test_per_address_buckets_stay_bounded_whatever_the_addresses() -> None:
    """An attacker with more addresses than the scheduler tracks shares one overflow bucket (memory bounded);
    addresses already tracked keep their own."""
    from gpupool.scheduler.auth import AuthFailRate

    fails = AuthFailRate(0.001, burst=2.0)
    fails.MAX_TRACKED = 3
    for source in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert fails.take(source)  # spent one of two: not full, kept
    assert fails.take("10.0.0.4") and fails.take("10.0.0.5")  # the overflow bucket's two
    assert not fails.take("10.0.0.6") and not fails.allows("10.0.0.7")
    assert fails.allows("10.0.0.1") and fails.take("10.0.0.1") and not fails.allows("10.0.0.1")
    assert len(fails._buckets) == 4
