"""Finding aclImdb as a user's machine has it (examples/sentiment/fetch.py) and the real subset in the repository:
explicit path, $GPUPOOL_IMDB, the cache, ../shared/data, a download over real HTTP (loopback) checked by
SHA-256, and one clear line when everything fails."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from examples.sentiment import data, fake_data, fetch


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, closed_port: int) -> Path:
    """No $GPUPOOL_IMDB, an empty cache, no ../shared/data, downloads to a loopback port that refuses them."""
    monkeypatch.delenv("GPUPOOL_IMDB", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(fetch, "SHARED_DATA", tmp_path / "shared" / "data" / data.TARBALL)
    monkeypatch.setenv("GPUPOOL_IMDB_URL", f"http://127.0.0.1:{closed_port}/aclImdb_v1.tar.gz")
    return tmp_path


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on loopback serving a folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_sample_in_the_repository_is_real_balanced_and_small() -> None:
    assert data.SAMPLE.is_file() and data.SAMPLE.stat().st_size < 4_000_000
    reviews = data.read_reviews(data.SAMPLE)
    assert Counter((r.split, r.label) for r in reviews) == {
        ("train", 0): 1250, ("train", 1): 1250, ("test", 0): 1250, ("test", 1): 1250,
    }  # fmt: skip
    # real reviews: ratings as aclImdb defines the labels, natural text of varied length, (almost: aclImdb has a
    # few) no duplicates
    assert all((1 <= r.rating <= 4) if r.label == 0 else (7 <= r.rating <= 10) for r in reviews)
    assert len({r.text for r in reviews}) >= 0.99 * len(reviews)
    assert sum(len(data.tokenize(r.text)) for r in reviews) / len(reviews) > 100
    assert (data.SAMPLE.parent / "README.md").read_text().count("Maas") >= 2  # the citation ships with it


def test_explicit_path_and_sample_and_env(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tar = fake_data.write_tarball(clean_env / "mine.tar.gz", per_class=2)
    assert fetch.locate(str(tar)) == tar
    assert fetch.locate("sample") == data.SAMPLE
    monkeypatch.setenv("GPUPOOL_IMDB", str(tar))
    assert fetch.locate(None) == tar
    with pytest.raises(fetch.DataNotFound, match="nope.tar.gz does not exist"):
        fetch.locate(str(clean_env / "nope.tar.gz"))


def test_cache_comes_before_shared_data(clean_env: Path) -> None:
    fetch.SHARED_DATA.parent.mkdir(parents=True)
    shared = fake_data.write_tarball(fetch.SHARED_DATA, per_class=2)
    assert fetch.locate() == shared
    (clean_env / "xdg" / "gpupool").mkdir(parents=True)
    cached = fake_data.write_tarball(clean_env / "xdg" / "gpupool" / data.TARBALL, per_class=2)
    assert fetch.locate() == cached


def test_no_data_and_no_network_says_what_to_do_in_one_line(clean_env: Path) -> None:
    with pytest.raises(fetch.DataNotFound) as info:
        fetch.locate()
    msg = str(info.value)
    assert "\n" not in msg and "download" in msg and "--data sample" in msg and fetch.URL in msg
    assert not list((clean_env / "xdg").rglob("*.part"))


def test_download_checks_sha256_and_keeps_nothing_bad(http_dir: tuple[Path, str], tmp_path: Path) -> None:
    root, base = http_dir
    tar = fake_data.write_tarball(root / data.TARBALL, per_class=3)
    sha = hashlib.sha256(tar.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / data.TARBALL
    with pytest.raises(ValueError, match="SHA-256"):
        fetch.download(f"{base}/{data.TARBALL}", dest, "0" * 64, progress=False)
    assert not dest.exists() and not list(dest.parent.iterdir())
    assert fetch.download(f"{base}/{data.TARBALL}", dest, sha, progress=False) == dest
    assert dest.read_bytes() == tar.read_bytes()
    assert len(data.read_reviews(dest)) == 12


def test_locate_downloads_into_the_cache_when_nothing_is_local(
    clean_env: Path, http_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, base = http_dir
    tar = fake_data.write_tarball(root / data.TARBALL, per_class=2)
    monkeypatch.setenv("GPUPOOL_IMDB_URL", f"{base}/{data.TARBALL}")
    monkeypatch.setenv("GPUPOOL_IMDB_SHA256", hashlib.sha256(tar.read_bytes()).hexdigest())
    got = fetch.locate()
    assert got == clean_env / "xdg" / "gpupool" / data.TARBALL and got.read_bytes() == tar.read_bytes()
    assert fetch.locate() == got  # found in the cache the next time


def test_a_download_without_a_terminal_logs_its_progress_and_its_check(
    http_dir: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # stderr not a terminal (a CI log, `... 2>log`): no progress bar, so the 84 MB download says how far it is in log
    # lines, and the end says that it arrived whole and was checked
    root, base = http_dir
    blob = bytes(range(256)) * (5 * 4096)  # 5 MiB: five of download's reads
    (root / data.TARBALL).write_bytes(blob)
    dest = tmp_path / "cache" / data.TARBALL
    with caplog.at_level("INFO", logger=fetch.__name__):
        fetch.download(f"{base}/{data.TARBALL}", dest, hashlib.sha256(blob).hexdigest(), progress=False)
    lines = [r.getMessage() for r in caplog.records]
    progress = [m for m in lines if m.startswith(f"downloading {data.TARBALL}: ")]
    assert len(progress) >= 2 and all("of 5.2 MB" in m and "%" in m for m in progress), lines
    assert lines[-1] == f"downloaded {dest} (5.2 MB, SHA-256 checked)"


def test_fetch_runs_as_a_script_and_fails_in_one_line(tmp_path: Path) -> None:
    """`python examples/sentiment/fetch.py` from anywhere: the tarball's path, or one line and status 1 (until round
    53 a traceback: "No module named 'examples'", the module importing its package)."""
    script = str(Path(fetch.__file__))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)  # fmt: skip

    found = run("--data", "sample")
    assert found.returncode == 0 and found.stdout == f"{data.SAMPLE}\n", found.stdout + found.stderr
    missing = run("--data", str(tmp_path / "nope.tar.gz"), "--no-download")
    assert missing.returncode == 1 and missing.stdout == "", missing.stdout
    assert missing.stderr == (
        f"examples/sentiment/fetch.py: aclImdb: {tmp_path / 'nope.tar.gz'} does not exist (from --data / "
        "$GPUPOOL_IMDB)\n"
    )
