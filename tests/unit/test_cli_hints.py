"""`gpupool COMMAND` for a command gpupool has not but a user tries (round 41's journey typed `gpupool down`, a
command since round 51): the refusal says what does it instead, as well as the usage."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpupool import cli


def test_down_is_a_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Round 51: `gpupool down` stops the pool `gpupool up` runs (tests/integration/test_up_down51.py); with none on its
    --state it says so in one line."""
    assert cli.main(["down", "--state", str(tmp_path / "none" / "scheduler.db")]) == 1
    err = capsys.readouterr().err
    assert err == f"gpupool down: no pool runs on {tmp_path / 'none' / 'scheduler.db'} (`gpupool up` starts one)\n"
    assert "down " in cli.usage()


def test_downs_timeout_variable_is_its_own(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Round 54: `gpupool down --timeout` is $GPUPOOL_DOWN_TIMEOUT (it was $GPUPOOL_TIMEOUT, a name any command's
    timeout could claim); the old name, shown in --help until then, is still read, with a line saying it is
    deprecated, and the new one wins over it."""
    from gpupool import down

    monkeypatch.delenv("GPUPOOL_DOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("GPUPOOL_TIMEOUT", raising=False)
    parser = down.build_parser()
    assert "GPUPOOL_DOWN_TIMEOUT" in parser.format_help() and "GPUPOOL_TIMEOUT" not in parser.format_help()
    monkeypatch.setenv("GPUPOOL_DOWN_TIMEOUT", "7")
    assert down.build_parser().parse_args([]).timeout == 7 and capsys.readouterr().err == ""
    monkeypatch.setenv("GPUPOOL_TIMEOUT", "5")
    assert down.build_parser().parse_args([]).timeout == 7 and capsys.readouterr().err == ""
    monkeypatch.delenv("GPUPOOL_DOWN_TIMEOUT")
    assert down.build_parser().parse_args([]).timeout == 5
    assert capsys.readouterr().err == (
        "gpupool down: $GPUPOOL_TIMEOUT (--timeout) is deprecated: set $GPUPOOL_DOWN_TIMEOUT instead (read this time)\n"
    )


@pytest.mark.parametrize("name", ["status", "ls"])
def test_status_like_names_point_at_smi(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([name]) == 2
    assert "gpupool smi" in capsys.readouterr().err.split("usage:")[0]


def test_other_unknown_commands_have_no_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpupool: unknown command 'frobnicate'\n\nusage:")
