"""Finding aclImdb as a user's machine has it: an explicit path, the cache, ../shared/data, else a download.

``locate(arg)`` looks, in this order, at
  1. ``--data PATH`` or ``$GPUPOOL_IMDB`` (``sample``: the small real subset shipped in ``sample/``);
  2. the cache, ``$XDG_CACHE_HOME/gpupool/aclImdb_v1.tar.gz`` (default ``~/.cache/gpupool/``);
  3. ``../shared/data/aclImdb_v1.tar.gz`` next to the repository (CI and this project's machines);
  4. a download of the official tarball from its canonical URL into the cache, with a progress bar, checked
     against its published SHA-256 (a wrong or truncated download is deleted, never used).
When all of that fails, ``DataNotFound`` says in one line what to do.

As a script, ``python examples/sentiment/fetch.py [--data PATH] [--no-download]`` does that and prints the
tarball's path (until round 53 it ended in a traceback: "No module named 'examples'").
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import urllib.request
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

if __package__ in (None, ""):  # run as a script: make `examples.sentiment` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.sentiment.data import SAMPLE, SHARED_DATA, TARBALL, cache_root

log = logging.getLogger(__name__)

URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
# The published checksum of the official tarball (84,125,825 bytes; the same value TFDS and others pin).
SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
TIMEOUT_S = 30.0
_CHUNK = 1 << 20
_LOG_EVERY = 16 << 20  # bytes between log lines without a progress bar, when the size is unknown


class DataNotFound(RuntimeError):
    """aclImdb is nowhere and could not be downloaded; the message is the one line to show the user."""


def download(url: str, dest: Path, sha256: str, timeout: float = TIMEOUT_S, progress: bool = True) -> Path:
    """Fetch url to dest (via dest.part), showing a progress bar (progress=False, e.g. stderr not a terminal: a log
    line at each quarter, or each 16 MiB when the size is unknown); raise ValueError if its SHA-256 is not sha256.

    Nothing is left at dest unless the whole file arrived and matched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())  # fmt: skip
    got = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:  # noqa: S310 (https/http)
            total = int(resp.headers.get("Content-Length") or 0) or None
            step = total / 4 if total else _LOG_EVERY
            next_log = step
            with Progress(*columns, disable=not progress, transient=True) as bar:
                task = bar.add_task(f"downloading {dest.name}", total=total)
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.advance(task, len(chunk))
                    got += len(chunk)
                    if not progress and got >= next_log and (total is None or got < total):
                        of = f" of {total / 1e6:.1f} MB ({100 * got / total:.0f} %)" if total else ""
                        log.info("downloading %s: %.1f MB%s", dest.name, got / 1e6, of)
                        next_log += step
        if digest.hexdigest() != sha256:
            raise ValueError(f"{url}: SHA-256 {digest.hexdigest()} is not the expected {sha256}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    log.info("downloaded %s (%.1f MB, SHA-256 checked)", dest, got / 1e6)
    return dest


def candidates(arg: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where locate looks before downloading, in order."""
    explicit = arg if arg not in (None, "") else os.environ.get("GPUPOOL_IMDB")
    if explicit:
        return [SAMPLE if str(explicit) == "sample" else Path(explicit).expanduser()]
    return [cache_root() / TARBALL, SHARED_DATA.resolve()]


def locate(arg: str | os.PathLike[str] | None = None, allow_download: bool = True) -> Path:
    """The aclImdb tarball to use (see the module docstring); raises DataNotFound with a one-line message."""
    paths = candidates(arg)
    for path in paths:
        if path.is_file():
            return path
    if arg not in (None, "") or os.environ.get("GPUPOOL_IMDB"):
        raise DataNotFound(f"aclImdb: {paths[0]} does not exist (from --data / $GPUPOOL_IMDB)")
    dest = paths[0]
    url = os.environ.get("GPUPOOL_IMDB_URL", URL)
    sha = os.environ.get("GPUPOOL_IMDB_SHA256", SHA256)
    if allow_download:
        log.info("aclImdb not found locally; downloading %s to %s", url, dest)
        try:
            return download(url, dest, sha, progress=sys.stderr.isatty())
        except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
            reason = f"the download from {url} failed ({exc})"
    else:
        reason = "downloads are off"
    raise DataNotFound(
        f"aclImdb not found in {' or '.join(map(str, paths))} and {reason}: fetch {URL} into {dest.parent}/, "
        "pass --data PATH, or use --data sample (the 5,000-review subset in the repository)"
    )


def main(argv: list[str] | None = None) -> int:
    """`python examples/sentiment/fetch.py`: `locate` (downloading where the tarball is nowhere), its path printed;
    one line and exit status 1 when it is not found."""
    p = argparse.ArgumentParser(
        prog="examples/sentiment/fetch.py",
        description="Find aclImdb_v1.tar.gz (--data or $GPUPOOL_IMDB, the cache, ../shared/data), else download it "
        "into the cache (84 MB, its SHA-256 checked); print its path.",
    )
    p.add_argument("--data", default=None, help="a tarball's path, or 'sample' (the subset in the repository)")
    p.add_argument("--no-download", action="store_true", help="only look: fail where it is not found")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(locate(args.data, allow_download=not args.no_download))
    except DataNotFound as exc:
        print(f"{p.prog}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
