"""client/cuda/hint.py: which uncaught errors get the `--cuda` hint line under `gpupool run` without --cuda."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gpupool.client.cuda import hint


def _raised(make: object) -> BaseException:
    try:
        make()  # type: ignore[operator]
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("nothing raised")


def test_torchs_no_cuda_errors_and_errors_raised_from_them_get_the_hint() -> None:
    def chained() -> None:
        try:
            raise AssertionError("Torch not compiled with CUDA enabled")
        except AssertionError as exc:
            raise RuntimeError("the trainer could not start") from exc

    def during() -> None:
        try:
            raise RuntimeError("Found no NVIDIA driver on your system. Please check ...")
        except RuntimeError:
            raise ValueError("cleanup failed") from None  # `from None` hides it from the traceback, not __context__

    assert hint.wants_cuda(_raised(chained))
    assert hint.wants_cuda(_raised(during))
    assert hint.wants_cuda(AttributeError("module 'torch._C' has no attribute '_cuda_setDevice'"))
    assert hint.wants_cuda(RuntimeError("Distributed package doesn't have NCCL built in"))


def test_other_errors_get_none() -> None:
    assert not hint.wants_cuda(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not hint.wants_cuda(ValueError("bad shape"))
    assert not hint.wants_cuda(None)
    loop = RuntimeError("a")
    loop.__context__ = RuntimeError("b")
    loop.__context__.__context__ = loop  # a cycle ends the walk
    assert not hint.wants_cuda(loop)


RAISES = (
    "from gpupool.client.cuda import hint\n"
    "hint.install()\n"
    "raise AssertionError('Torch not compiled with CUDA enabled')\n"
)


def test_the_hint_prints_once_a_run_not_once_a_rank(tmp_path: Path) -> None:
    """Two processes of one `gpupool run` (torchrun's ranks) dying of the same error: one hint between them, the
    folder `gpupool run` names ($GPUPOOL_CUDA_HINT_DIR) saying which printed; without it each prints its own.
    Until journey42 a 2-rank torchrun printed the line twice."""
    env = {**os.environ, "GPUPOOL_CUDA_HINT_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", RAISES], env=env, capture_output=True, text=True) for _ in range(2)]
    assert [r.returncode for r in runs] == [1, 1]
    assert sum(r.stderr.count(hint.HINT) for r in runs) == 1, [r.stderr for r in runs]
    alone = {k: v for k, v in os.environ.items() if k != "GPUPOOL_CUDA_HINT_DIR"}
    done = subprocess.run([sys.executable, "-c", RAISES], env=alone, capture_output=True, text=True)
    assert done.stderr.count(hint.HINT) == 1, done.stderr
