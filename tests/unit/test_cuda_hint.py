"""client/cuda/hint.py: which uncaught errors get the `--cuda` hint line under `gpupool run` without --cuda."""

from __future__ import annotations

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
