"""The daemon's front runs C++ on every tenant's bytes since round 24 (native_runner.cpp `split_frame`, the stream
reader's cut of each frame, in the one process all sessions share), from the native runner's cached build. Hostile
frames at the edges of its reading (lengths near 2^31, 2^32, 2^63 and longer than six bytes, field numbers at
protobuf's limit and past it, the wire types 3/4/5 as a command's first tag) reach that C++ through a real daemon: each
ends its own session with INVALID_ARGUMENT or RESOURCE_EXHAUSTED, never the daemon, while a neighbour keeps working.
And the cached build the front imports is one no other user could have written: a build folder or library made
writable by others is never imported (`config.check_private_file`), the frames are then cut in Python."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import slices
from shim_fixtures import start_daemon
from support import Healthy, stop_process, tls_channel

from gpupool import config, protocol
from gpupool._proto import device_pb2, device_pb2_grpc


def _command(body: bytes) -> bytes:
    return b"\x0a" + protocol.varint(len(body)) + body


SYNC = device_pb2.ClientFrame(commands=[device_pb2.Command(sync=device_pb2.Sync(request_id=1))]).SerializeToString()

# (what, frame): each refused by both readings or accepted by both (the C++ one must say the same as Python's)
EDGES = [
    ("length 2^31", b"\x0a" + protocol.varint(1 << 31) + b"\x08\x01"),
    ("length 2^32 - 1", b"\x0a" + protocol.varint((1 << 32) - 1) + b"\x08\x01"),
    ("length 2^32 + 1", b"\x0a" + protocol.varint((1 << 32) + 1) + b"\x08\x01"),
    ("length 2^42 - 1 (six bytes)", b"\x0a" + protocol.varint((1 << 42) - 1) + b"\x08\x01"),
    ("length 2^63 (ten bytes)", b"\x0a" + protocol.varint(1 << 63) + b"\x08\x01"),
    ("length 2^64 - 1", b"\x0a" + b"\xff" * 9 + b"\x01" + b"\x08\x01"),
    ("an unfinished length", b"\x0a" + b"\xff" * 5),
    ("field 2^29 - 1, a varint", _command(protocol.varint(((1 << 29) - 1) << 3) + b"\x01") + SYNC),
    ("field 2^29", _command(protocol.varint((1 << 29) << 3) + b"\x01") + SYNC),
    ("field 2^32 - 1", _command(protocol.varint(((1 << 32) - 1) << 3) + b"\x01") + SYNC),
    ("a six-byte tag", _command(b"\x88\x80\x80\x80\x80\x00\x01") + SYNC),
    ("field 0", _command(b"\x00\x01") + SYNC),
    ("a start group (wire type 3) unended", _command(b"\x0b\x08\x01") + SYNC),
    ("an end group (wire type 4) first", _command(b"\x0c") + SYNC),
    ("a group of field 1, ended", _command(b"\x0b\x0c") + SYNC),
    ("a fixed32 (wire type 5) of field 4", _command(b"\x25\x01\x02\x03\x04") + SYNC),
    ("wire type 6", _command(b"\x0e\x01") + SYNC),
    ("deep nesting", _command(b"\x0a" * 60 + b"\x00") + SYNC),
    ("a sync as a length-delimited upload tag", _command(b"\x22\x02\x08\x01") + SYNC),
    ("an empty command, then garbage", b"\x0a\x00\x12\x00"),
]


def _stream(address: str, token: str, frames: list[bytes]) -> tuple[grpc.StatusCode | None, str]:
    """Attach, send `frames` on the session's stream and read until it ends: (the status that ended it or None, its
    details)."""
    channel = tls_channel(address)
    try:
        stub = device_pb2_grpc.DeviceStub(channel)
        reply = stub.Attach(device_pb2.AttachRequest(token=token))
        stream = channel.stream_stream(
            "/gpupool.v1.Device/Stream",
            request_serializer=None,
            response_deserializer=device_pb2.ServerFrame.FromString,
        )
        try:
            for _ in stream(iter(frames), metadata=((protocol.SESSION_METADATA, reply.session_id),), timeout=20):
                pass
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return None, ""
    finally:
        channel.close()


@pytest.fixture
def cpp_split(monkeypatch: pytest.MonkeyPatch, native_runner_module: Any) -> Iterator[list[tuple[bytes, bool]]]:
    """The front's frame cut is native_runner.cpp's (as in a daemon whose runner is built), each call noted: (the
    frame, whether the C++ reading took it)."""
    calls: list[tuple[bytes, bool]] = []
    cpp = native_runner_module.split_frame

    def noted(raw: bytes, limit: int, upload: int, get: int) -> Any:
        got = cpp(raw, limit, upload, get)
        calls.append((raw, got is not None))
        return got

    monkeypatch.setattr(slices, "_native", [noted])
    yield calls


def test_hostile_frames_at_the_cpp_readings_edges_end_only_their_session(daemon: Any, cpp_split: Any) -> None:
    healthy = Healthy(daemon.address, daemon.token(tenant="healthy"))
    try:
        for what, raw in EDGES:
            reference: Any
            try:
                reference = [(k, bytes(s)) for k, s in slices.py_split_frame(raw, 1 << 20)]
            except Exception as exc:  # the Python reading's refusal
                reference = exc
            cpp_split.clear()
            code, details = _stream(daemon.address, daemon.token(tenant="hostile"), [raw])
            mine = [took for r, took in cpp_split if r == raw]  # (the neighbour's frames pass there too)
            assert len(mine) == 1, what  # the C++ reading saw it first
            took = mine[0]
            assert took == (not isinstance(reference, Exception)), what
            if took:
                cut = slices.split_frame(raw, 1 << 20)
                assert [(k, bytes(s)) for k, s in cut] == reference, what
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, None), (what, code)
            if code is not None:
                assert "internal" not in details.lower(), (what, details)
        with Session.attach(daemon.address, daemon.token(tenant="after")) as s:  # the front still serves
            [h] = s.call("aten::add.Tensor", Handle(s.upload(torch.ones(3))), 1)
            assert torch.equal(s.download(h), torch.full((3,), 2.0))
    finally:
        healthy.check()


# ---- the cached build the front imports ----


def _mapped(pid: int, path: Path) -> bool:
    """Whether process `pid` or any process below it has `path` mapped (a shared library it imported)."""
    tree, found = {pid}, True
    while found:
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in tree:
                continue
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in tree:
                tree.add(int(entry))
                found = True
    for p in tree:
        try:
            if str(path) in Path(f"/proc/{p}/maps").read_text():
                return True
        except OSError:
            continue
    return False


@pytest.mark.parametrize("unsafe", ["", "folder", "library"])
def test_a_cached_runner_build_other_users_could_write_is_never_imported(
    tmp_path: Path, native_runner_module: Any, unsafe: str
) -> None:
    """A daemon given a cache (GPUPOOL_NATIVE_RUNNER_CACHE, owner-only) that holds this source's build: imported by
    the front (and the zygote) as it is; with the build's own folder or the library writable by other users (a
    build under umask 0, a chmod: `cache_dir` checked the cache's root only) it is imported by no process of the
    daemon, which says why and serves on the Python path."""
    from gpupool.server import native_runner

    build = Path(native_runner_module.__file__)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    final = cache / native_runner._final().relative_to(native_runner.cache_dir())
    final.parent.mkdir(mode=0o755)
    shutil.copy2(build, final)
    if unsafe == "folder":
        final.parent.chmod(0o777)
    elif unsafe == "library":
        final.chmod(final.stat().st_mode | stat.S_IWOTH)
    env = {"GPUPOOL_NATIVE_RUNNER_CACHE": str(cache), "GPUPOOL_NATIVE_RUNNER": "1"}
    daemon = start_daemon(tmp_path, "1GiB", 1, env=env)
    try:
        with Session.attach(daemon.address, daemon.token()) as s:  # the front's first frames: it decides then
            [h] = s.call("aten::add.Tensor", Handle(s.upload(torch.ones(3))), 1)
            assert torch.equal(s.download(h), torch.full((3,), 2.0))
        assert _mapped(daemon.process.pid, final) == (not unsafe)
    finally:
        stop_process(daemon.process)
    deadline = time.monotonic() + 10  # (the log's reader thread may still be a few lines behind the exit)
    while unsafe and "writable by other users" not in "".join(daemon.process.log_lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = "".join(daemon.process.log_lines)
    assert ("writable by other users" in log) == bool(unsafe), log[-3000:]


def test_check_private_file(tmp_path: Path) -> None:
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    lib = folder / "x.so"
    lib.write_bytes(b"\x7fELF")
    lib.chmod(0o755)
    config.check_private_file(lib)
    lib.chmod(0o757)
    with pytest.raises(config.UnsafeCacheDir, match="writable by other users"):
        config.check_private_file(lib)
    lib.chmod(0o755)
    folder.chmod(0o777)
    with pytest.raises(config.UnsafeCacheDir, match="writable by other users"):
        config.check_private_file(lib)
    folder.chmod(0o700)
    link = tmp_path / "shared"
    link.mkdir()
    link.chmod(0o777)
    (link / "y.so").write_bytes(b"")
    (folder / "y.so").symlink_to(link / "y.so")  # a link into a folder others can write: resolved, refused
    with pytest.raises(config.UnsafeCacheDir):
        config.check_private_file(folder / "y.so")


@pytest.mark.parametrize(
    "told", ["../../../tmp/x", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "g" * 16]
)
def test_a_told_digest_that_is_not_16_hex_digits_names_no_build(told: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPUPOOL_NATIVE_RUNNER_DIGEST names a folder of the build cache (`torch-<version>-<digest>`) whose library the
    process imports: until round 28 any value was joined to the path as given (`../../../tmp/x` named a library
    outside the cache). Only `source`'s form, 16 lowercase hex digits, is taken; anything else is refused in one line
    naming the variable (`load` and `built` then log it and the Python path serves)."""
    from gpupool.server import native_runner

    monkeypatch.setenv(native_runner.DIGEST_ENV, told)
    with pytest.raises(ValueError, match=f"^{native_runner.DIGEST_ENV}=.* is not 16 lowercase hex digits"):
        native_runner._final()
    monkeypatch.setenv(native_runner.DIGEST_ENV, "0123456789abcdef")
    assert native_runner._final().parent.name.endswith("-0123456789abcdef")
    assert native_runner._final().parent.parent == native_runner.cache_dir()


def _zygote_of(pid: int) -> int:
    """The zygote process a daemon started (`python -m gpupool.server.zygote`), found through /proc."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"gpupool.server.zygote" in (entry / "cmdline").read_bytes():
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    raise AssertionError(f"no zygote of daemon {pid}")


def test_the_front_and_the_zygote_load_the_build_of_the_source_the_daemon_read(
    tmp_path: Path, native_runner_module: Any
) -> None:
    """Round 25 hashed native_runner.cpp wherever a build was looked for: the zygote at its start, the front at its
    first frame (any time later), so a checkout changed under a running daemon gave the front the build of another
    source than the zygote's. The daemon reads the source once (`native_runner.source`) and tells the zygote its
    digest (GPUPOOL_NATIVE_RUNNER_DIGEST): both map the one build of that source. A zygote told a digest its own
    read of the file does not have (the checkout changed between them) builds nothing and loads nothing: it says
    why, and the Python path serves."""
    from gpupool.server import native_runner

    digest = native_runner.source()[1]
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    final = cache / native_runner._final().relative_to(native_runner.cache_dir())
    final.parent.mkdir(mode=0o700)
    shutil.copy2(native_runner_module.__file__, final)
    env = {"GPUPOOL_NATIVE_RUNNER_CACHE": str(cache), "GPUPOOL_NATIVE_RUNNER": "1"}
    daemon = start_daemon(tmp_path, "1GiB", 1, env=env)
    try:
        with Session.attach(daemon.address, daemon.token()) as s:
            [h] = s.call("aten::add.Tensor", Handle(s.upload(torch.ones(3))), 1)
            assert torch.equal(s.download(h), torch.full((3,), 2.0))
        zygote = _zygote_of(daemon.process.pid)
        told = Path(f"/proc/{zygote}/environ").read_bytes().split(b"\0")
        assert f"{native_runner.DIGEST_ENV}={digest}".encode() in told
        assert _mapped(daemon.process.pid, final) and _mapped(zygote, final)
    finally:
        stop_process(daemon.process)
    other = "0123456789abcdef"  # a zygote whose daemon read another source
    code = "from gpupool.server import native_runner as n; print('loaded', n.load() is not None)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
        env={**os.environ, **env, native_runner.DIGEST_ENV: other},
    )  # fmt: skip
    assert done.returncode == 0 and "loaded False" in done.stdout, done.stdout + done.stderr
    assert "changed since the daemon read it" in done.stderr, done.stderr
    assert sorted(p.relative_to(cache) for p in cache.glob("**/*.so")) == [final.relative_to(cache)]


def test_open_private_file_checks_the_file_it_opened(tmp_path: Path) -> None:
    """`check_private_file` then a load by name (round 25) checked one file and loaded whatever the name meant a
    moment later: a cache reached through a symbolic link another user owns (a folder named under /tmp) could be
    pointed elsewhere in between. `open_private_file` checks the open file and its folder; the daemon loads that
    file (/proc/self/fd/N, server/native_runner.py `_import`), whatever the link says afterwards."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(mode=0o700)
    theirs.mkdir()
    theirs.chmod(0o777)
    for folder in (ours, theirs):
        (folder / "x.so").write_bytes(folder.name.encode())
    link = tmp_path / "cache"
    link.symlink_to(ours)
    config.check_private_file(link / "x.so")
    fd = config.open_private_file(link / "x.so")
    try:
        (tmp_path / "swap").symlink_to(theirs)
        os.replace(tmp_path / "swap", link)  # the link pointed elsewhere after the check
        assert (link / "x.so").read_bytes() == b"theirs"  # a load by name reads another user's file now
        assert Path(f"/proc/self/fd/{fd}").read_bytes() == b"ours"  # the file loaded is the file checked
    finally:
        os.close(fd)
    with pytest.raises(config.UnsafeCacheDir, match="writable by other users"):
        config.open_private_file(link / "x.so")


@pytest.mark.parametrize("folder_mode", [0o700, 0o777])
def test_open_private_file_refuses_what_is_not_a_regular_file_without_waiting(tmp_path: Path, folder_mode: int) -> None:
    """A named pipe where a cached library or a failed build's marker is looked for (a build's folder another user
    can write: `check_private_file`'s umask-0 case): round 26 opened first and checked after, and opening a pipe
    waits for a writer, so the daemon's zygote, a client's import or `gpupool run` hung there for good instead of
    refusing the file. Now it is opened without waiting and refused (not a regular file), as is a link to a device;
    a failed build's marker that is not a regular file is ignored (the build runs)."""
    from gpupool.client.native import build

    folder = tmp_path / "torch-x"
    folder.mkdir()
    folder.chmod(folder_mode)
    pipe = folder / "x.so"
    os.mkfifo(pipe, 0o600)
    (folder / "null.so").symlink_to("/dev/null")
    got: list[BaseException | int] = []

    def open_it(path: Path) -> None:
        try:
            got.append(config.open_private_file(path))
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            got.append(exc)

    for path in (pipe, folder / "null.so"):
        got.clear()
        t = threading.Thread(target=open_it, args=(path,), daemon=True)
        t.start()
        t.join(10)
        if t.is_alive():
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # let the stuck open go
            t.join(10)
            pytest.fail(f"open_private_file({path.name}) waited on a named pipe")
        assert len(got) == 1 and isinstance(got[0], config.UnsafeCacheDir), got
        assert re.search("not a regular file|writable by other users", str(got[0])), got[0]
    marker = folder / "failed-0123456789abcdef.json"
    os.mkfifo(marker, 0o600)
    seen: list[str | None] = []
    t = threading.Thread(target=lambda: seen.append(build._failed_before(marker)), daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        os.close(os.open(marker, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail("a failed build's marker that is a named pipe held `gpupool run`")
    assert seen == [None]


def _open_on(path: Path) -> list[int]:
    """This process's descriptors open on `path`."""
    fds = []
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(entry) == str(path):
                fds.append(int(entry.name))
        except OSError:
            continue
    return fds


def test_a_cached_library_that_does_not_load_gives_its_descriptor_back(tmp_path: Path) -> None:
    """A cached build the dynamic loader refuses (not an ELF file; a library with an undefined symbol, the build of
    another torch) made the import raise; until round 28 its descriptor (`config.load_name`) stayed open for good, one
    more at each attempt (the front asks `native_runner.built` again while nothing is decided). Now the failed load
    gives it back. A library the loader took whose init then raised (no PyInit) keeps its descriptor: the loader knows
    it by that number's name, and a reused number would load it again instead of another library."""
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    garbage = folder / "garbage.so"
    garbage.write_bytes(b"\x7fELF" + b"\0" * 60)
    cases = [garbage]
    if shutil.which("cc"):
        for stem, code in (("unresolved", "extern int nowhere(void); int f(void) { return nowhere(); }"),
                           ("plain", "int f(void) { return 1; }")):  # fmt: skip
            (folder / f"{stem}.c").write_text(code + "\n")
            subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-z,now", "-o", str(folder / f"{stem}.so"),
                            str(folder / f"{stem}.c")], check=True, timeout=120)  # fmt: skip
        cases.append(folder / "unresolved.so")
    import ctypes

    for lib in cases:
        for _ in range(3):
            with pytest.raises(ImportError):
                config.import_private_extension("gpupool_nothing_here", lib)
            with pytest.raises(OSError):
                config.load_private(lib, ctypes.CDLL)
        assert _open_on(lib) == [], f"{lib.name}: a failed load kept its descriptor"
    if shutil.which("cc"):  # loaded, then refused by the import (no PyInit_...): its name stays bound
        plain = folder / "plain.so"
        with pytest.raises(ImportError, match="PyInit"):
            config.import_private_extension("gpupool_nothing_here", plain)
        [fd] = _open_on(plain)
        assert fd in config._LOADED_FDS
        assert config.load_private(plain, ctypes.CDLL).f() == 1
