"""Sizes, addresses and GPUPOOL_* flag fallbacks."""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys

import pytest
from support import communicate

from gpupool.config import (
    add_flag,
    env_name,
    flush_ops,
    format_size,
    fused_sdpa,
    parse_size,
    split_address,
    withheld_features,
)


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


@pytest.mark.parametrize(("text", "n"), [(None, 32), ("", 32), (" ", 32), ("1", 1), ("65536", 65536), (" 8\n", 8)])
def test_flush_ops_reads_a_whole_number_of_commands(text: str | None, n: int) -> None:
    assert flush_ops({} if text is None else {"GPUPOOL_FLUSH_OPS": text}) == n


BAD_FLUSH_OPS = ["0", "65537", "-4", "abc", "4.0", "1e3", "1_000", "\u0664", "99999999999999999999"]


@pytest.mark.parametrize("text", BAD_FLUSH_OPS)
def test_flush_ops_refuses_anything_else_in_one_line_naming_the_variable(text: str) -> None:
    with pytest.raises(
        ValueError, match=f"^GPUPOOL_FLUSH_OPS={re.escape(text)} is not a number of commands from 1 to 65536$"
    ):
        flush_ops({"GPUPOOL_FLUSH_OPS": text})


BAD_AT_IMPORT = ["abc", "65537", "1_000"]


@functools.cache
def imports() -> dict[str, tuple[int, str, str]]:
    """`import gpupool.torch` under each environment the two tests below need, the children side by side (each
    imports torch; eight children one after the other until round 25, three of them the same good " 16 " run):
    name -> (exit code, stdout, stderr)."""
    base = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    base.pop("GPUPOOL_FLUSH_OPS", None)
    base.pop("GPUPOOL_FUSED_SDPA", None)
    good = (
        "import gpupool.torch; from gpupool.client.torch import native, runtime\n"
        "print(runtime.FLUSH_OPS, native.set_fused_attention(True))"
    )
    children = {f"flush {text}": ("import gpupool.torch", {"GPUPOOL_FLUSH_OPS": text}) for text in BAD_AT_IMPORT}
    children["fused off"] = ("import gpupool.torch", {"GPUPOOL_FUSED_SDPA": "off"})
    children["good"] = (good, {"GPUPOOL_FLUSH_OPS": " 16 ", "GPUPOOL_FUSED_SDPA": " 0"})
    started = {
        name: subprocess.Popen(
            [sys.executable, "-c", code],
            env={**base, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (code, extra) in children.items()
    }
    out = {}
    for name, proc in started.items():
        stdout, stderr = communicate(proc, 120)
        out[name] = (proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("text", BAD_AT_IMPORT)
def test_the_shim_refuses_a_bad_flush_ops_at_import_with_that_line(text: str) -> None:
    """client/torch/runtime.py reads $GPUPOOL_FLUSH_OPS with the parser the C++ client's backend hands to
    configure_wire (client/native/backend.py): a bad value is one line naming the variable, not int()'s message or
    (for 1_000, which int() reads as 1000) a value the C++ client would refuse."""
    code, _, stderr = imports()[f"flush {text}"]
    assert code != 0
    want = f"ValueError: GPUPOOL_FLUSH_OPS={text} is not a number of commands from 1 to 65536"
    assert stderr.strip().splitlines()[-1] == want
    code, stdout, stderr = imports()["good"]  # " 16 ": surrounding blanks are fine
    flush, _ = stdout.split()
    assert flush == "16", stderr[-2000:]


@pytest.mark.parametrize(
    ("text", "on"), [(None, True), ("", True), (" ", True), ("1", True), ("0", False), (" 0\n", False)]
)
def test_fused_sdpa_reads_0_or_1(text: str | None, on: bool) -> None:
    assert fused_sdpa({} if text is None else {"GPUPOOL_FUSED_SDPA": text}) is on


@pytest.mark.parametrize("text", ["00", "2", "no", "false", "off", "true", "-0", "0.0", "\u0660"])
def test_fused_sdpa_refuses_anything_else_in_one_line_naming_the_variable(text: str) -> None:
    """Before round 22 the shim read any value but "0" (stripped) as on and the C++ client any value but exactly
    "0" (" 0" was on there, off in the shim): one parser now, and "no" or "false" is an error, never silently on."""
    with pytest.raises(
        ValueError,
        match=f"^GPUPOOL_FUSED_SDPA={re.escape(text)} is not 0 \\(torch's math path\\) or 1 \\(the fused backend\\)$",
    ):
        fused_sdpa({"GPUPOOL_FUSED_SDPA": text})


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (None, set()),
        ("", set()),
        (" , ", set()),
        ("sdpa_dropout", {"sdpa_dropout"}),
        (" sdpa_dropout,\n", {"sdpa_dropout"}),
    ],
)
def test_withheld_features_reads_known_names(text: str | None, names: set[str]) -> None:
    assert withheld_features({} if text is None else {"GPUPOOL_WITHHOLD_FEATURES": text}) == names


def test_withheld_features_refuses_an_unknown_name_in_one_line() -> None:
    with pytest.raises(ValueError, match="^GPUPOOL_WITHHOLD_FEATURES=sdpa_dropout,flash: flash is not a feature"):
        withheld_features({"GPUPOOL_WITHHOLD_FEATURES": "sdpa_dropout,flash"})


def test_the_shim_reads_gpupool_fused_sdpa_with_that_parser() -> None:
    """client/torch/native.py sets the device guard's choice from `fused_sdpa` when it installs (at `import
    gpupool.torch`): " 0" is the math path (as it was there; the C++ client took it for on), "off" one line."""
    code, _, stderr = imports()["fused off"]
    assert code != 0
    want = "ValueError: GPUPOOL_FUSED_SDPA=off is not 0 (torch's math path) or 1 (the fused backend)"
    assert stderr.strip().splitlines()[-1] == want, stderr[-2000:]
    code, stdout, stderr = imports()["good"]  # " 0": set_fused_attention(True) answers the choice before it: off
    _, fused = stdout.split()
    assert fused == "False", stderr[-2000:]


def test_the_daemons_on_off_flags_show_their_defaults_as_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpupool serve --help` shows --seccomp's and --landlock's defaults as on/off, as they are typed, and an
    environment's value as well (until round 44: "(default: True)", and --landlock said "(default on)" too)."""
    from gpupool.server.cli import build_parser

    for var in ("GPUPOOL_SECCOMP", "GPUPOOL_LANDLOCK"):
        monkeypatch.delenv(var, raising=False)
    text = " ".join(build_parser().format_help().split())
    assert "(default: True)" not in text and "(default on)" not in text
    assert "session workers (on/off) (default: on) [env GPUPOOL_SECCOMP]" in text
    assert "one warning (default: on) [env GPUPOOL_LANDLOCK]" in text
    monkeypatch.setenv("GPUPOOL_LANDLOCK", "off")
    text = " ".join(build_parser().format_help().split())
    assert "one warning [env GPUPOOL_LANDLOCK]" in text  # off: no default shown, as for every false default


def test_the_daemons_size_flags_show_their_defaults_as_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpupool serve --help` shows a size flag's default as the flag takes it ("(default: 16MiB)"; until round 45
    "(default: 16777216)"), an environment's value too, and the parsed value is the same number of bytes."""
    from gpupool.server.cli import build_parser

    for var in ("GPUPOOL_MAX_MESSAGE_SIZE", "GPUPOOL_FAKE_GPU_MEMORY"):
        monkeypatch.delenv(var, raising=False)
    text = " ".join(build_parser().format_help().split())
    assert "largest gRPC message accepted (default: 16MiB)" in text and "(default: 16777216)" not in text
    assert "memory of each fake GPU, e.g. 8GiB (default: 8GiB)" in text
    monkeypatch.setenv("GPUPOOL_FAKE_GPU_MEMORY", "1536MiB")
    parser = build_parser()
    assert "e.g. 8GiB (default: 1536MiB)" in " ".join(parser.format_help().split())
    assert parser.parse_args([]).fake_gpu_memory == 1536 << 20
