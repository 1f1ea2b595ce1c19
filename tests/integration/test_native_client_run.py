"""The C++ client under `gpupool run` against a real pool (`gpupool up`: scheduler + daemon with fake GPUs, loopback,
TLS): an ordinary eager training script (`model.to("gpupool")`, no gpupool import) trains through the C++ client with
local CPU's losses within float32 rounding (the local run is a fresh process); what the native client lacks fails
with one message naming it and the way out; no compiler is one line. Since round 26 it is `gpupool run`'s default
client: a child says which client it has by default, with `--client native|shim` and $GPUPOOL_CLIENT, and where the
C++ client cannot be built or loaded (no compiler, an unsafe cache) the default falls back to the Python client with
one line.

Slow (the C++ client's first build takes ~1 min; cached after). Skipped only where no C++ compiler or ninja exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gpupool.client.native import WAY_OUT
from gpupool.client.native.backend import built_path, compiler_missing
from gpupool.client.pool import SchedulerClient
from scheduler_fixtures import ROOT, wait_until
from support import assert_float32_close, communicate, warmed_python

_why = compiler_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why is not None, reason=f"native client: {_why}")]

# An ordinary script: torch only, the device from argv; the losses and the final weights' checksum as JSON.
SCRIPT = """
import json, sys
import torch
from torch import nn

dev = sys.argv[1]
torch.manual_seed(0)
gen = torch.Generator().manual_seed(1)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)).to(dev)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
data = [(torch.randn(16, 32, generator=gen), torch.randint(0, 2, (16,), generator=gen)) for _ in range(4)]
losses = []
for i in range(8):
    x, y = data[i % 4]
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x.to(dev)), y.to(dev))
    loss.backward()
    opt.step()
    losses.append(loss.item())
weights = [p.detach().cpu().tolist() for p in model.parameters()]
out = {"losses": losses, "weights": weights, "device": str(next(model.parameters()).device)}
if dev != "cpu":
    from gpupool.client.native import backend
    out["client"] = "python shim" if "gpupool.client.torch" in sys.modules else "native"
    out["op_records"] = backend.stats()["op_records"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def pool(two_gpu_pool: str) -> str:
    """The shared pool of two 512 MiB fake GPUs (conftest.py: two_gpu_pool); these tests lease one."""
    return two_gpu_pool


def _env(pool: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUPOOL_SCHEDULER": pool}
    for k in ("GPUPOOL_LEASE", "GPUPOOL_CUDA", "GPUPOOL_CLIENT"):
        env.pop(k, None)
    return {**env, **extra}


def _run(pool: str, *args: str, timeout: float = 280, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gpupool.cli", "run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(pool, **env))


def _local(pool: str, script: Path) -> subprocess.Popen[str]:
    """`python SCRIPT cpu` started (the local reference, support.warmed_python), to run side by side with the run on
    the pool (one after the other until round 25); _finish gives its stdout."""
    cmd = warmed_python(str(script), "cpu")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(pool))


def _finish(local: subprocess.Popen[str]) -> str:
    stdout, stderr = communicate(local, 120)
    assert local.returncode == 0, stderr[-3000:]
    return stdout


def _script(tmp: Path) -> Path:
    path = tmp / "train.py"
    path.write_text(SCRIPT)
    return path


def test_a_training_script_runs_unchanged_with_local_losses(pool: str, tmp_path: Path) -> None:
    """Within float32 rounding of the local run, a fresh CPU process (support.assert_float32_close): Adam's `sqrt` of
    the second Linear's 4096 weights runs on two threads there, MKL's vector math warmed first as in a session worker
    (support.warmed_python: a cold first call's error is not rounding)."""
    script = _script(tmp_path)
    local = _local(pool, script)  # side by side with the run on the pool
    ran = _run(pool, "-p", "0.5", "--native-client", "--", sys.executable, str(script), "gpupool")
    want = json.loads(_finish(local).strip().splitlines()[-1])
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = json.loads(ran.stdout.strip().splitlines()[-1])
    assert got["client"] == "native" and got["device"] == "gpupool:0"
    assert got["op_records"] > 8 * 20  # the ops went through the C++ encoder
    assert len(set(got["losses"])) == 8  # it trains: every step's loss differs
    assert_float32_close(got["losses"], want["losses"], "losses")
    assert_float32_close(got["weights"], want["weights"], "weights")  # read back from the daemon (.cpu())
    wait_until(lambda: not SchedulerClient(pool).list_pool().leases, timeout=10, what="the run's lease released")


# Numbers and 0-dim CPU tensors among a device op's arguments: each value and dtype as local CPU's (round 17: `x % 7`,
# the sentiment example's bigram hashing, was remainder.Tensor with a number the daemon's call refuses; a float64 0-dim
# tensor went as a number, which type promotion treats otherwise).
SCALARS = """
import json, sys
import torch

dev = sys.argv[1]
x = torch.arange(-20, 20).to(dev)
f = (torch.arange(40) / 7 - 2.5).to(dev)
h = f.half()
outs = {
    "remainder": x % 7, "remainder_float": x % 2.5, "remainder_": x.clone().remainder_(6), "fmod": torch.fmod(x, 3),
    "bitwise_and": x & 5, "xlogy": torch.xlogy(f.abs(), 2.0), "mul_half": h * 3.3, "where": torch.where(f > 0, f, 0.0),
    "f64_tensor": f * torch.tensor(1.5, dtype=torch.float64), "int_f64": x * torch.tensor(0.5, dtype=torch.float64),
    "remainder_tensor": x % torch.tensor(4),
    # an op that resizes a view of part of its out= argument (arange into a slice of fftfreq's output): round 26
    "fftfreq": torch.fft.fftfreq(5, device=dev), "fftfreq_even": torch.fft.fftfreq(6, 0.5, device=dev),
    "rfftfreq": torch.fft.rfftfreq(7, device=dev),
}
print(json.dumps({k: [str(v.dtype), v.cpu().tolist()] for k, v in outs.items()}))
"""


def test_numbers_and_cpu_scalars_give_local_values_and_dtypes(pool: str, tmp_path: Path) -> None:
    """Bit for bit, though the local run is a fresh process: each op is one call on at most 40 elements (no parallel
    path, ATen's grain is 2048 and more), the same kernel on one thread of one CPU in both processes."""
    path = tmp_path / "scalars.py"
    path.write_text(SCALARS)
    local = _local(pool, path)  # side by side with the run on the pool
    ran = _run(pool, "-p", "0.5", "--native-client", "--", sys.executable, str(path), "gpupool")
    want = json.loads(_finish(local).strip().splitlines()[-1])
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = json.loads(ran.stdout.strip().splitlines()[-1])
    for k in want:
        assert got[k] == want[k], k


# `untyped_storage().resize_` on the C++ client (torch's resizePrivateUse1Bytes hook: FSDP2's free_storage and
# alloc_storage): the daemon's count of the session's bytes, a view of the freed storage touched, the storage back.
RESIZE = """
import json
import torch
from gpupool._proto import device_pb2, device_pb2_grpc
from gpupool.client.native import backend
from gpupool.tokens import public_session_id

def used():
    torch.gpupool.synchronize()
    s = backend.session(0)
    reply = device_pb2_grpc.DeviceStub(s._channel).Status(
        device_pb2.StatusRequest(), timeout=10, metadata=(("gpupool-session", s.session_id),)
    )
    return next(u.used_bytes for u in reply.sessions if u.session_id == public_session_id(s.session_id))

x = torch.arange(65536.0, device="gpupool")  # 256 KiB
v = x[8:16]
out = {"held": used()}
x.untyped_storage().resize_(0)
out["freed"], out["size"] = used(), x.untyped_storage().nbytes()
try:
    (v * 2).cpu()
except Exception as e:
    out["touched"] = f"{type(e).__name__}: {e}"
try:
    x.untyped_storage().resize_(-4)
except Exception as e:
    out["negative"] = str(e)
x.untyped_storage().resize_(262144)
out["back"], out["values"] = used(), v.cpu().tolist()
x.copy_(torch.arange(65536.0))
out["written"] = v.cpu().tolist()
print(json.dumps(out))
"""


def test_a_storage_resized_to_zero_frees_its_bytes_on_the_daemon(pool: str, tmp_path: Path) -> None:
    """`x.untyped_storage().resize_(0)` frees x's 256 KiB on the daemon (its session's count), a view of it touched
    fails at the sync with the daemon's error, a negative size is refused here, and `resize_(n)` charges the bytes
    again, zeroed, under the same tensors. Before round 37 the first resize raised torch's "You should register
    `PrivateUse1HooksInterface` for PrivateUse1 before call `resizePrivateUse1Bytes`"."""
    path = tmp_path / "resize.py"
    path.write_text(RESIZE)
    ran = _run(pool, "-p", "0.5", "--native-client", "--", sys.executable, str(path))
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = json.loads(ran.stdout.strip().splitlines()[-1])
    assert got["held"] - got["freed"] == 262144 and got["size"] == 0, got
    assert "RemoteError" in got["touched"] and "resized to 0 bytes" in got["touched"], got
    assert "negative size" in got["negative"], got
    assert got["back"] == got["held"] and got["values"] == [0.0] * 8, got
    assert got["written"] == [float(i) for i in range(8, 16)], got


def test_the_env_selects_it_too(pool: str, tmp_path: Path) -> None:
    ran = _run(pool, "-p", "0.5", "--", sys.executable, str(_script(tmp_path)), "gpupool", GPUPOOL_CLIENT="native")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads(ran.stdout.strip().splitlines()[-1])["client"] == "native"


# A `gpupool run` child that says which client it has: the C++ client is loaded at `import torch` ($GPUPOOL_CLIENT
# =native from `gpupool run`), and a tensor made on gpupool.torch.device() is a plain torch.Tensor (the shim's: a
# RemoteTensor)
WHICH = """
import os, sys
import torch
import gpupool.torch as gt
from gpupool.client import native
x = torch.arange(4.0, device=gt.device()) * 2
shim = "gpupool.client.torch" in sys.modules
print("client", "native" if native.active() and not shim else "shim", type(x).__name__, x.sum().item(),
      os.environ["GPUPOOL_CLIENT"])
"""
FALLBACK = "WARNING gpupool.run: using the Python client (--client shim): "


def _which(pool: str, *flags: str, **env: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    ran = _run(pool, "-p", "0.5", *flags, "--", sys.executable, "-c", WHICH, **env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran.stdout.strip().splitlines()[-1], ran


def test_gpupool_run_defaults_to_the_cpp_client(pool: str) -> None:
    said, ran = _which(pool)
    assert said == "client native Tensor 12.0 native", ran.stdout
    assert FALLBACK not in ran.stderr


@pytest.mark.parametrize(
    ("flags", "env", "want"),
    [
        (("--client", "shim"), {}, "client shim RemoteTensor 12.0 shim"),
        (("--client", "native"), {}, "client native Tensor 12.0 native"),
        ((), {"GPUPOOL_CLIENT": "shim"}, "client shim RemoteTensor 12.0 shim"),
        (("--client", "native"), {"GPUPOOL_CLIENT": "shim"}, "client native Tensor 12.0 native"),  # the flag wins
    ],
    ids=["flag-shim", "flag-native", "env-shim", "flag-over-env"],
)
def test_either_client_can_be_chosen(pool: str, flags: tuple[str, ...], env: dict[str, str], want: str) -> None:
    said, ran = _which(pool, *flags, **env)
    assert said == want, ran.stdout
    assert FALLBACK not in ran.stderr


def test_a_client_the_env_does_not_know_is_one_line(pool: str) -> None:
    ran = _run(pool, "--", sys.executable, "-c", "print('ran')", GPUPOOL_CLIENT="cpp")
    assert ran.returncode == 2 and "ran" not in ran.stdout
    assert ran.stderr == "gpupool run: $GPUPOOL_CLIENT='cpp' is not a client (native or shim)\n"


@pytest.mark.parametrize("why", ["no-compiler", "build-error", "unsafe-cache", "cache-takes-no-build"])
def test_without_a_usable_cpp_client_the_default_is_the_shim_with_one_line(pool: str, tmp_path: Path, why: str) -> None:
    """Where the C++ client cannot be built or loaded (a PATH without c++ and ninja and nothing cached; a compiler that
    fails, $CXX=false; a cache folder other users could write; a cache that cannot take a build), plain `gpupool run`
    runs the script on the Python client after one log line saying why; `--client native` stops there (exit 1, before
    leasing). The last: root's shared cache (scripts/setup.sh) for a user whose torch or source it has no build of,
    a read-only or full disk - here a file where the build's folder goes; round 26's run died of the OSError with a
    traceback (EACCES, EROFS, EEXIST), before choosing a client."""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"GPUPOOL_NATIVE_CLIENT_CACHE": str(cache)}
    if why == "no-compiler":
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        os.symlink(sys.executable, bin_dir / "python3")
        env["PATH"] = str(bin_dir)
        reason = "cannot build the native client: no C++ compiler (c++ not on PATH)"
    elif why == "build-error":
        env["CXX"] = "false"  # on PATH, and fails: torch.utils.cpp_extension's first call of it
        reason = "the native client did not build: "
    elif why == "unsafe-cache":
        cache.chmod(0o777)  # a real condition: any user could plant a library there
        reason = f"cache folder {cache}: "
    else:
        folder = cache / built_path().parent.name
        folder.write_text("in the way")  # the build's folder cannot be made (as in a cache only root may write)
        reason = f"cannot build the native client in {folder}: [Errno 17] File exists"
    said, ran = _which(pool, **env)
    assert said == "client shim RemoteTensor 12.0 shim", ran.stdout
    lines = [line for line in ran.stderr.splitlines() if "gpupool.run" in line]
    assert len(lines) == 1 and FALLBACK + reason in lines[0], ran.stderr
    refused = _run(pool, "--client", "native", "--", sys.executable, "-c", "print('ran')", **env)
    assert refused.returncode == 1 and "ran" not in refused.stdout
    building = why == "build-error"  # it tried: "gpupool: building the native client ... into ..." first
    said = [ln for ln in refused.stderr.splitlines() if " still building " not in ln]  # (progress: a slow host's)
    assert len(said) == 1 + building and reason in refused.stderr, refused.stderr


def test_a_failed_build_is_not_tried_again_by_the_default(pool: str, tmp_path: Path) -> None:
    """A build that failed (a compiler that fails: a script counting its calls) is remembered beside the library
    (client/native/build.py `failed_marker`): the next default run falls back at once with one line saying when it
    failed, without calling the compiler; `--client native` tries again; a marker others could have written is
    ignored (the library's rules: config.open_private_file); another compiler (a new mtime) builds again. Until round
    26 every default run built again before falling back (CXX=false: 3.7 s; a late build error: ~1 min)."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    calls = tmp_path / "calls"
    cxx = tmp_path / "cxx"
    cxx.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 1\n')
    cxx.chmod(0o755)
    # the child's shim compiles nothing ($CXX would count): its guard and op path off
    env = {"GPUPOOL_NATIVE_CLIENT_CACHE": str(cache), "CXX": str(cxx), "GPUPOOL_NATIVE": "0", "GPUPOOL_NATIVE_OPS": "0"}

    def count() -> int:
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    def default_run() -> str:
        said, ran = _which(pool, **env)
        assert said == "client shim RemoteTensor 12.0 shim", ran.stdout
        lines = [line for line in ran.stderr.splitlines() if "gpupool.run" in line]
        assert len(lines) == 1 and FALLBACK + "the native client did not build: " in lines[0], ran.stderr
        return lines[0]

    assert "a build failed at" not in default_run()
    built = count()
    assert built > 0  # it tried
    again = default_run()
    assert count() == built  # not again
    assert again.endswith("; `gpupool run --client native` retries)") and " (a build failed at " in again, again
    [marker] = cache.glob("torch-*/failed-*.json")
    marker.chmod(0o666)  # another user could have written it: ignored, the build runs
    assert "a build failed at" not in default_run() and count() > built
    built = count()
    assert "a build failed at" in default_run() and count() == built  # remembered again, privately
    refused = _run(pool, "--client", "native", "--", sys.executable, "-c", "print('ran')", **env)
    assert refused.returncode == 1 and "ran" not in refused.stdout and count() > built  # the explicit choice retries
    built = count()
    st = cxx.stat()
    os.utime(cxx, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # another compiler: another key
    assert "a build failed at" not in default_run() and count() > built


UNSUPPORTED = {
    "attach": ("import torch, gpupool.torch as gt\ngt.attach('localhost:1', 'x')", "gpupool.torch.attach"),
    "RemoteTensor": ("import torch, gpupool.torch as gt\nprint(gt.RemoteTensor)", "gpupool.torch.RemoteTensor"),
    # the Python client's own modules and attaching by hand: one line, not torch's "multiple backend fallbacks"
    "shim-import": ("import torch\nimport gpupool.client.torch", "the Python client (gpupool.client.torch)"),
    "lease-device": (
        "import torch\nfrom gpupool.client.pool import Lease\nLease.from_env().device(0)",
        "attaching a lease by hand (Lease.device)",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_what_it_lacks_fails_with_one_message_and_the_way_out(pool: str, tmp_path: Path, case: str) -> None:
    code, feature = UNSUPPORTED[case]
    ran = _run(pool, "--", sys.executable, "-c", code)  # `gpupool run`'s default client
    assert ran.returncode == 1, ran.stdout
    last = ran.stderr.strip().splitlines()[-1]
    assert feature in last and "--native-client" in last and WAY_OUT in last, ran.stderr[-2000:]


def test_no_compiler_is_one_line(pool: str, tmp_path: Path) -> None:
    """A PATH without c++ and an empty build cache: `gpupool run` says so in one line, before leasing; a child with
    $GPUPOOL_CLIENT=native (no `gpupool run` to build first) ends at `import torch` with the same line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python3")
    env = {"PATH": str(bin_dir), "GPUPOOL_NATIVE_CLIENT_CACHE": str(tmp_path / "cache")}
    ran = _run(pool, "--native-client", "--", sys.executable, "-c", "print('ran')", **env)
    assert ran.returncode == 1 and "ran" not in ran.stdout
    assert ran.stderr.count("\n") == 1, ran.stderr
    assert "no C++ compiler" in ran.stderr and "install g++ and ninja" in ran.stderr and WAY_OUT in ran.stderr
    child = subprocess.run([sys.executable, "-c", "import torch; print('ran')"], capture_output=True, text=True,
                           timeout=120, env=_env(pool, GPUPOOL_CLIENT="native", **env))  # fmt: skip
    assert child.returncode == 1 and "ran" not in child.stdout
    assert child.stderr.count("\n") == 1 and "no C++ compiler" in child.stderr, child.stderr


def test_the_build_is_cached_per_torch_and_source() -> None:
    path = built_path()
    assert path.exists()  # built by the runs above (or scripts/setup.sh)
    assert shutil.which("c++") is not None
    parent = path.parent.name
    import torch

    assert parent.startswith(f"torch-{torch.__version__}-") and len(parent.rsplit("-", 1)[1]) == 16
    assert not list(path.parent.glob("build-*"))  # the private build folders are gone


# A torch.manual_seed before the device's module is imported (the sentiment example did so until round 17) must seed
# the daemon's generator as one after it does: the seed is torch.initial_seed() when the session attaches.
SEED_FIRST = """
import json, sys
import torch

torch.manual_seed(int(sys.argv[2]))
if sys.argv[1] == "python":
    import gpupool.torch  # noqa: F401  (the Python client, imported after the seed)
x = torch.ones(256, device="gpupool")
print(json.dumps(torch.nn.functional.dropout(x, 0.5).cpu().tolist()))
"""


@pytest.mark.parametrize("client", ["python", "native"])
def test_a_seed_set_before_the_client_loads_seeds_the_daemon(pool: str, tmp_path: Path, client: str) -> None:
    path = tmp_path / "seed_first.py"
    path.write_text(SEED_FIRST)
    flags = ("--native-client",) if client == "native" else ("--client", "shim")
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-p", "0.5", *flags, "--", sys.executable, str(path), client]
    # The three runs side by side (three half leases on the pool's two devices), each a process and session of its own
    runs = [subprocess.Popen([*cmd, str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(pool)) for seed in (5, 5, 6)]  # fmt: skip

    def masks(ran: subprocess.Popen[str]) -> list[float]:
        stdout, stderr = communicate(ran, 280)
        assert ran.returncode == 0, stderr[-3000:]
        return json.loads(stdout.strip().splitlines()[-1])

    try:
        first, again, other = (masks(ran) for ran in runs)
    finally:
        for ran in runs:
            if ran.poll() is None:
                ran.kill()
                ran.communicate()
    assert first == again  # the same seed, the same dropout mask
    assert first != other and 0 < first.count(0.0) < 256


# A run that ends its session while its lease still renews (--ttl 1: every 0.33 s): what the end of every run does for
# the moment between atexit's Detach and the renewal thread's stop, held open here for 2 s.
ENDS = """
import time
import torch
from gpupool.client import native

x = torch.arange(6.0, device="gpupool") * 2
print(float(x.sum()))
native.session().close()  # the session ends as at the process's exit (Detach; atexit's close is then a no-op)
time.sleep(2)  # renewals go on meanwhile; each forwarded its token to the closed session
"""


def test_a_normal_end_logs_no_lease_subscriber_error(pool: str, tmp_path: Path) -> None:
    """journey47: after a normal end (exit 0) the client logged "ERROR gpupool.client.pool: lease subscriber failed"
    with a traceback: a renewal racing the session's Detach at exit forwarded its token to the closed session
    (FailedPrecondition "session closed: detached", or the closed channel's ValueError). Now the lease stops renewing
    before the sessions close, and a closed session takes no token."""
    script = tmp_path / "ends.py"
    script.write_text(ENDS)
    ran = _run(pool, "-p", "0.5", "--ttl", "1", "--native-client", "--", sys.executable, str(script))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip().splitlines()[-1] == "30.0", ran.stdout
    assert "lease subscriber failed" not in ran.stderr and "Traceback" not in ran.stderr, ran.stderr[-3000:]
    assert "ERROR" not in ran.stderr, ran.stderr[-3000:]
    wait_until(lambda: not SchedulerClient(pool).list_pool().leases, timeout=10, what="the run's lease released")
