"""Sizes, addresses and GPUPOOL_* flag fallbacks."""

from __future__ import annotations

import argparse

import pytest

from gpupool.config import add_flag, env_name, format_size, parse_size, split_address


@pytest.mark.parametrize(
    "text,expected",
    [("8GiB", 8 << 30), ("512MiB", 512 << 20), ("6GB", 6_000_000_000), ("1024", 1024), ("1.5GiB", 3 << 29), ("0", 0)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "8XB", "-1GiB", "eight"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(8 << 30) == "8.0GiB"
    assert format_size(12) == "12B"


def test_split_address() -> None:
    assert split_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_address("[::1]:7") == ("::1", 7)
    with pytest.raises(ValueError):
        split_address("localhost")


def test_env_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name("--fake-gpu-memory") == "GPUPOOL_FAKE_GPU_MEMORY"
    monkeypatch.setenv("GPUPOOL_FAKE_GPUS", "3")
    monkeypatch.setenv("GPUPOOL_DRAIN", "true")
    p = argparse.ArgumentParser()
    add_flag(p, "--fake-gpus", type=int, default=0, help="n")
    add_flag(p, "--drain", action="store_true", help="d")
    add_flag(p, "--listen", default="127.0.0.1:1", help="l")
    ns = p.parse_args([])
    assert (ns.fake_gpus, ns.drain, ns.listen) == (3, True, "127.0.0.1:1")
    assert p.parse_args(["--fake-gpus", "5"]).fake_gpus == 5
    assert "GPUPOOL_FAKE_GPUS" in p.format_help()
