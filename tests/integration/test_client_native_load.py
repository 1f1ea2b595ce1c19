"""The clients load their cached native libraries as opened and checked (`config.open_private_file`, then
`/proc/self/fd/N`): the shim's device guard (client/torch/native.py `install`), its native op path
(client/torch/native_ops.py `load`) and the C++ client (client/native/backend.py `load`). Until round 26 each was
checked by name (`config.check_private_file`) and then loaded by name again: a cache reached through a symbolic link
another user owns (a folder named under /tmp) could be pointed at their library in between, as the daemon's runner
could until sec26 (tests/integration/test_front_native_hostile.py `test_open_private_file_checks_the_file_it_opened`).

Each case runs in a child process of its own (a library registers itself into torch once a process): the real build,
copied into a private cache reached through a link; the real `open_private_file`, after which the link is pointed at
another folder whose file of the same name is not a library (the other user's move, at the worst moment). The load
must use the file it checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, shutil, sys
from pathlib import Path

which, tmp = sys.argv[1], Path(sys.argv[2])
os.environ["GPUPOOL_NATIVE"] = os.environ["GPUPOOL_NATIVE_OPS"] = "0"  # not at import: below
env = "GPUPOOL_NATIVE_CLIENT_CACHE" if which == "cpp" else "GPUPOOL_NATIVE_CACHE"
if which == "guard":
    from gpupool.client.torch import native as mod
    lib_path = mod.library_path
elif which == "ops":
    from gpupool.client.torch import native_ops as mod
    lib_path = mod.library_path
else:
    from gpupool.client.native import backend as mod
    lib_path = mod.built_path
built = mod.build()  # the real build, in the user's cache (cached after the first)
ours, theirs, link = tmp / "ours", tmp / "theirs", tmp / "cache"
ours.mkdir(mode=0o700)
theirs.mkdir(mode=0o700)
link.symlink_to(ours)
os.environ[env] = str(link)
path = lib_path()  # the same name under the link
path.parent.mkdir(mode=0o700, exist_ok=True)
shutil.copy(built, path)
planted = theirs / path.relative_to(link)
planted.parent.mkdir(mode=0o700, exist_ok=True)
planted.write_bytes(b"another user's file: not a library")

from gpupool import config

checked = config.open_private_file
swapped = []


def open_then_swap(p):
    fd = checked(p)  # the real check, on the file opened
    (tmp / "swap").symlink_to(theirs)
    os.replace(tmp / "swap", link)  # the link pointed elsewhere after the check
    swapped.append(str(p))
    return fd


config.open_private_file = open_then_swap
del os.environ["GPUPOOL_NATIVE"], os.environ["GPUPOOL_NATIVE_OPS"]
if which == "guard":
    ok = mod.install()
elif which == "ops":
    mod._ops.clear()  # (None: GPUPOOL_NATIVE_OPS=0 above, if anything asked)
    ok = mod.load() is not None
else:
    import torch
    mod.load()
    ok = int(torch.ops.gpupool_native.device_count()) >= 0
print(json.dumps({"ok": ok, "swapped": swapped, "path": str(path),
                  "theirs_now": (link / path.relative_to(link)).read_bytes() == planted.read_bytes()}))
"""


@pytest.mark.parametrize("which", ["guard", "ops", "cpp"])
def test_a_client_loads_the_library_it_checked(tmp_path: Path, which: str) -> None:
    if which == "cpp":
        from gpupool.client.native.backend import compiler_missing

        why = compiler_missing()
        if why is not None:
            pytest.skip(f"C++ client: {why}")
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(ROOT)}
    for k in ("GPUPOOL_NATIVE", "GPUPOOL_NATIVE_OPS", "GPUPOOL_NATIVE_CACHE", "GPUPOOL_NATIVE_CLIENT_CACHE"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", CHILD, which, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["swapped"] == [got["path"]]  # checked as opened (config.open_private_file), once
    assert got["theirs_now"]  # a load by name now would read the other user's file
    assert got["ok"] is True, proc.stderr[-4000:]  # the library loaded is the one checked
