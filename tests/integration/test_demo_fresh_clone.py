"""The README's first command on a fresh clone: `bash scripts/demo.sh` in a `git clone` in a temporary folder, with no
../shared beside it, an empty cache and no network, trains on the real reviews shipped in the repository and exits 0.

The clone is of the committed HEAD (what a user gets). The demo's setup step (pip install) is skipped: this
environment is already installed, and reinstalling would point it at the temporary clone. So are its native builds
(the device guard, the op path, the daemon's runner, the C++ client): the demo finds them where scripts/setup.sh put
them for this environment, as after the setup it skips, while the rest of its cache (the data) starts empty. Built in
the demo instead (~1-2 min each on 2 cores; minutes more on a loaded machine) they would only make it longer (until
round 37 a daemon on a loaded machine did not listen within `gpupool up`'s 120 s; tests/integration/test_first_start.py
has a first start with an empty cache). A small configuration keeps it short."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpupool import config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # pool start-up and training: minutes on a loaded box

REPO = Path(__file__).resolve().parents[2]


def _demo_env(tmp_path: Path) -> dict[str, str]:
    """The demo's environment: no GPUPOOL_* of ours, its setup skipped, an empty cache but for the native builds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    env.update(
        GPUPOOL_DEMO_SETUP="0",
        PYTHON=sys.executable,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        # the native builds scripts/setup.sh made (the demo's setup step, skipped here, makes them there)
        GPUPOOL_NATIVE_CACHE=str(config.cache_dir("native", "GPUPOOL_NATIVE_CACHE")),
        GPUPOOL_NATIVE_RUNNER_CACHE=str(config.cache_dir("runner", "GPUPOOL_NATIVE_RUNNER_CACHE")),
        GPUPOOL_NATIVE_CLIENT_CACHE=str(config.cache_dir("native-client", "GPUPOOL_NATIVE_CLIENT_CACHE")),
        COLUMNS="160",
    )
    return env


def test_demo_runs_in_a_fresh_clone_without_shared_data_or_network(tmp_path: Path, closed_port: int) -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "elsewhere" / "gpupool"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    assert not (clone.parent / "shared").exists()
    env = _demo_env(tmp_path)
    env["GPUPOOL_IMDB_URL"] = f"http://127.0.0.1:{closed_port}/aclImdb_v1.tar.gz"  # a download attempt fails at once
    small = ["--data", "sample", "--limit", "400", "--epochs", "1", "--bigram-buckets", "0", "--embed-dropout", "0",
             "--embed-dim", "32", "--filters", "32", "--log-every", "2"]  # fmt: skip
    done = subprocess.run(["bash", "scripts/demo.sh", *small], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "aclImdb: 400 train / 400 test reviews" in out, out[-4000:]
    assert "epoch 1: train loss" in out and "saved the model to runs/demo" in out, out[-4000:]
    assert "tenants" in out and "gpupool devices" in out  # the live view of the pool was shown
    verdicts = [line.split("\t")[0] for line in done.stdout.splitlines() if line.count("\t") == 2]
    assert len(verdicts) == 2 and set(verdicts) <= {"pos", "neg"}, done.stdout[-2000:]
    assert (clone / "runs" / "demo" / "model.pt").is_file()
    # The pool stopped by `gpupool down` (until round 52 by `kill -INT` and a wait for `up`), which returns once every
    # process of the pool has ended: nothing started in the clone still runs when the demo has exited.
    assert "stopping the pool: gpupool down --state " in out, out[-4000:]
    assert not _running_in(clone), f"left running: {_running_in(clone)}"
    # How it stops, in the demo's words: until round 55 it printed `up`'s banner's "Ctrl-C stops both (or `gpupool
    # down --state ...` from another shell ...)" - `up`'s own Ctrl-C, which no terminal's reaches under setsid, and
    # a `gpupool down` that stops the pool under the training
    assert "Ctrl-C stops the training, then the pool" in out and "stops both" not in out, out[-4000:]


def test_ctrl_c_of_the_demo_stops_the_training_then_the_pool(tmp_path: Path) -> None:
    """Ctrl-C while the demo trains (typed into its terminal: SIGINT to its foreground process group): the training
    stops first, then the pool; the demo says so and exits 130, leaving nothing running. Until journey40 the
    terminal's SIGINT stopped `gpupool up` under the training, which ignored it (a script's background job), died of
    DeviceLost ("host vm is draining") and the demo printed its tracebacks twice and "training failed (exit 1)"."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "gpupool"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    env = _demo_env(tmp_path)
    small = ["--data", "sample", "--limit", "400", "--epochs", "50", "--bigram-buckets", "0", "--embed-dropout", "0",
             "--embed-dim", "32", "--filters", "32", "--log-every", "1"]  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the demo in a terminal of its own (its session leader), as a user runs it
        # with a terminal's Ctrl-C: a harness that ran the tests as a background job of a non-interactive shell left
        # SIGINT ignored, which exec keeps (the demo's INT trap and every program under it then never saw it)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(clone)
        os.execvpe("bash", ["bash", "scripts/demo.sh", *small], env)
    out = bytearray()
    deadline = time.monotonic() + 600
    try:
        while b"step 2:" not in out:
            chunk = _read(fd)
            assert chunk is not None and time.monotonic() < deadline, out[-4000:].decode(errors="replace")
            out += chunk
        os.write(fd, b"\x03")
        while (chunk := _read(fd)) is not None:  # to the end: every holder of the terminal gone
            out += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 130, text[-4000:]
    assert "interrupted: stopping the training and the pool" in text, text[-4000:]
    assert "Traceback" not in text and "training failed" not in text, text[-4000:]
    left = subprocess.run(["pgrep", "-f", str(clone)], capture_output=True, text=True).stdout.split()
    assert not left and not _running_in(clone), f"left running: {left} {_running_in(clone)}"


def _running_in(folder: Path) -> dict[int, str]:
    """The processes whose working folder is `folder` or below it (what the demo started there: `gpupool up` and
    every process under it, the training), with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            if entry.name.isdigit() and (cwd == folder or folder in cwd.parents):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # (ended meanwhile, or not ours to read)
            continue
    return found


def _read(fd: int) -> bytes | None:
    """What the terminal has for us within a second; None once it is closed (EIO: no process holds it)."""
    if not select.select([fd], [], [], 1.0)[0]:
        return b""
    try:
        return os.read(fd, 65536) or None
    except OSError:
        return None
