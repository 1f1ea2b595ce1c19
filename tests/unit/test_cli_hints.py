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


@pytest.mark.parametrize("name", ["status", "ls"])
def test_status_like_names_point_at_smi(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([name]) == 2
    assert "gpupool smi" in capsys.readouterr().err.split("usage:")[0]


def test_other_unknown_commands_have_no_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpupool: unknown command 'frobnicate'\n\nusage:")
