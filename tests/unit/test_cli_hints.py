"""`gpupool COMMAND` for a command gpupool has not but a user tries (round 41's journey typed `gpupool down`): the
refusal says what does it instead, as well as the usage."""

from __future__ import annotations

import pytest

from gpupool import cli


def test_down_says_how_up_stops(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["down"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'down'" in err
    assert "Ctrl-C" in err and "kill -INT" in err  # how `gpupool up` stops instead
    assert "usage: gpupool COMMAND" in err


@pytest.mark.parametrize("name", ["status", "ls"])
def test_status_like_names_point_at_smi(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([name]) == 2
    assert "gpupool smi" in capsys.readouterr().err.split("usage:")[0]


def test_other_unknown_commands_have_no_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpupool: unknown command 'frobnicate'\n\nusage:")
