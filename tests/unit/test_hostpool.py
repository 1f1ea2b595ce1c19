"""gpupool/hostpool.py: big downloads' storages, reused only once nothing of the caller's refers to them."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gpupool import hostpool

MiB = hostpool.MiB


def test_a_dropped_download_s_storage_is_handed_out_again() -> None:
    pool = hostpool.Pool(64 * MiB)
    a, kept = hostpool.empty([1024, 4096], torch.float32, pool=pool)  # 16 MiB
    assert not kept and a.is_contiguous() and a.shape == (1024, 4096) and a.dtype == torch.float32
    where = a.data_ptr()
    del a
    b, kept = hostpool.empty([4096, 1024], torch.float32, pool=pool)
    assert kept and b.data_ptr() == where and pool.reused == 1
    assert b.shape == (4096, 1024) and b.stride() == (1024, 1) and b.storage_offset() == 0
    b.resize_(5 * MiB)  # an ordinary tensor: its storage grows as any does
    assert b.numel() == 5 * MiB


@pytest.mark.parametrize("hold", ["view", "numpy", "storage", "tensor"])
def test_a_storage_anything_of_the_caller_s_refers_to_is_never_handed_out(hold: str) -> None:
    pool = hostpool.Pool(64 * MiB)
    a, _ = hostpool.empty([8 * MiB], torch.uint8, pool=pool)
    a.fill_(7)
    held = {"view": lambda: a[1:], "numpy": lambda: a.numpy(), "storage": lambda: a.untyped_storage()}.get(
        hold, lambda: a
    )()
    if hold != "tensor":
        del a
    b, kept = hostpool.empty([8 * MiB], torch.uint8, pool=pool)
    assert not kept and pool.reused == 0
    b.fill_(1)
    seen = torch.empty(0, dtype=torch.uint8).set_(held) if hold == "storage" else torch.as_tensor(held)
    assert int(seen.min()) == 7  # the held bytes are untouched
    del seen
    del held, b
    if hold != "tensor":
        c, kept = hostpool.empty([8 * MiB], torch.uint8, pool=pool)
        assert kept  # now nothing refers to either: one of them comes back


def test_a_storage_in_shared_memory_is_never_reused() -> None:
    pool = hostpool.Pool(64 * MiB)
    a, _ = hostpool.empty([8 * MiB], torch.uint8, pool=pool)
    a.share_memory_()  # another process may map it now
    del a
    _, kept = hostpool.empty([8 * MiB], torch.uint8, pool=pool)
    assert not kept


def test_what_is_kept_is_bounded_and_the_oldest_goes_first() -> None:
    pool = hostpool.Pool(32 * MiB)
    first, _ = hostpool.empty([16 * MiB], torch.uint8, pool=pool)
    second, _ = hostpool.empty([16 * MiB], torch.uint8, pool=pool)
    third, _ = hostpool.empty([16 * MiB], torch.uint8, pool=pool)  # 48 MiB asked: the first is let go
    assert sum(t.nbytes for t in pool.kept) == 32 * MiB
    assert [t.data_ptr() for t in pool.kept] == [second.data_ptr(), third.data_ptr()]
    assert first.sum() is not None  # the caller's tensor is the caller's, kept or not
    big, kept = hostpool.empty([40 * MiB], torch.uint8, pool=pool)  # larger than the bound: never kept
    assert not kept and all(t.data_ptr() != big.data_ptr() for t in pool.kept)
    pool.release()
    assert pool.kept == []


def test_small_downloads_and_reuse_off_take_torch_empty() -> None:
    advised: list[int] = []
    pool = hostpool.Pool(64 * MiB)
    t, kept = hostpool.empty([1024], torch.float32, advised.append, pool=pool)
    assert not kept and pool.kept == [] and advised == [t]
    off = hostpool.Pool(0)
    for _ in range(2):
        t, kept = hostpool.empty([16 * MiB], torch.uint8, pool=off)
        assert not kept and off.kept == []
        del t


def test_size_classes_cover_their_sizes_within_a_sixteenth() -> None:
    for n in (1, MiB, MiB + 1, 8 * MiB - 3, 64 * MiB, 64 * MiB + 1, 100 * MiB + 7, 256 * MiB, 3 * 2**30 + 5):
        c = hostpool.size_class(n)
        assert n <= c <= n + max(MiB, n // 16)
    assert hostpool.size_class(256 * MiB) == 256 * MiB


@pytest.mark.parametrize("value", ["lots", "-1", "1.5"])
def test_a_malformed_setting_is_named(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hostpool.ENV, value)
    with pytest.raises(ValueError, match=hostpool.ENV):
        hostpool.keep_from_env()


def test_the_setting_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hostpool.ENV, "0")
    assert hostpool.keep_from_env() == 0
    monkeypatch.delenv(hostpool.ENV)
    assert hostpool.keep_from_env() == hostpool.DEFAULT_KEEP


def test_a_storage_is_handed_to_one_tensor_at_a_time() -> None:
    """Round 29: `take` gave out the storage and `empty` made its tensor after the pool's lock was let go, so a
    second thread's `take` in between saw it unused and was handed the same one (two downloads into one buffer).
    The tensor is now made under the lock: a storage handed out is in use the moment `take` returns."""
    pool = hostpool.Pool(64 * MiB)
    a, _ = hostpool.empty([8 * MiB], torch.uint8, pool=pool)
    del a
    size = hostpool.size_class(8 * MiB)
    first, kept = pool.take(size, [8 * MiB], torch.uint8)  # as two threads' takes, back to back
    second, kept_too = pool.take(size, [8 * MiB], torch.uint8)
    assert kept and not kept_too and first.data_ptr() != second.data_ptr()
    assert first.shape == (8 * MiB,) and first.is_contiguous() and second.shape == (8 * MiB,)


def test_threads_never_share_a_storage() -> None:
    """Downloads of several sessions' reply readers at once: each tensor's bytes stay its own."""
    pool = hostpool.Pool(64 * MiB)
    errors: list[str] = []

    def work(mark: int) -> None:
        for _ in range(30):
            t, _ = hostpool.empty([8 * MiB], torch.uint8, pool=pool)
            t[:: 1 << 16].fill_(mark)
            time.sleep(0)  # let another thread take a storage in between
            if int(t[:: 1 << 16].min()) != mark or int(t[:: 1 << 16].max()) != mark:
                errors.append(f"thread {mark}: another thread wrote into its tensor")
            del t

    threads = [threading.Thread(target=work, args=(m,)) for m in range(1, 5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and pool.reused > 0
