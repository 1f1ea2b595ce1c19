"""`gpupool COMMAND` for a command gpupool has not but a user tries (round 41's journey typed `gpupool down`, a
command since round 51): the refusal says what does it instead, as well as the usage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


STOP_LINE = "from pathlib import Path; from gpupool import up; print(up._stop_line(Path('/tmp/p/scheduler.db')))"


def _stop_line_in_a_terminal() -> str:
    """`up`'s banner's last line, said by a process in a terminal of its own (pty.fork: its session leader, in the
    terminal's foreground process group), as a user's shell runs `gpupool up`."""
    import os
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execv(sys.executable, [sys.executable, "-c", STOP_LINE])
        finally:
            os._exit(127)
    out = b""
    try:
        while chunk := _read_pty(fd):
            out += chunk
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    return out.decode().strip()


def _read_pty(fd: int) -> bytes:
    import os

    try:
        return os.read(fd, 4096)
    except OSError:  # (EIO: the process that held the terminal has ended)
        return b""


def test_the_banner_offers_ctrl_c_only_where_a_terminals_reaches_up() -> None:
    """Round 55: `gpupool up`'s banner ended "Ctrl-C stops both" also where no terminal's Ctrl-C reaches it: in a
    session of its own (`up --detach`'s child; scripts/demo.sh's `setsid gpupool up`, whose log the demo printed,
    where Ctrl-C is the demo's own, which stops its training first). There it names `gpupool down` first."""
    alone = subprocess.run([sys.executable, "-c", STOP_LINE], capture_output=True, text=True, check=True,
                           start_new_session=True, timeout=60).stdout.strip()  # fmt: skip
    assert re.fullmatch(
        r"`gpupool down --state /tmp/p/scheduler\.db` stops both \(or `kill -INT \d+`; no terminal's Ctrl-C reaches "
        r"this `up`\)\.",
        alone,
    ), alone
    terminal = _stop_line_in_a_terminal()
    assert re.fullmatch(
        r"Ctrl-C stops both \(or `gpupool down --state /tmp/p/scheduler\.db` from another shell, or "
        r"`kill -INT \d+`\)\.",
        terminal,
    ), terminal


def test_the_usage_says_which_flags_read_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 55: `gpupool --help` said "every flag can also be set as GPUPOOL_<FLAG>", but `gpupool run`'s lease size
    reads no variable (nor smi's view flags): $GPUPOOL_GPUS is not -n. It names the rule --help shows, [env NAME]."""
    from gpupool.client import run

    monkeypatch.setenv("GPUPOOL_GPUS", "3")
    parser = run.build_parser()
    assert parser.parse_args(["--", "true"]).gpus == 1 and "GPUPOOL_GPUS" not in parser.format_help()
    assert "[env GPUPOOL_SCHEDULER]" in " ".join(parser.format_help().split())
    usage = " ".join(cli.usage().split())
    assert "every flag" not in usage and "one whose help ends [env NAME] can also be set by that variable" in usage


def test_smis_line_of_a_lease_without_sessions_does_not_say_not_yet() -> None:
    """Round 55's walk: at the demo's end, its training's session closed, its lease lived on seconds until `gpupool
    run` released it, and `smi --watch`'s line said "none open yet"."""
    from gpupool.client import smi

    from gpupool._proto import scheduler_pb2

    now = smi.Sample(pool=scheduler_pb2.PoolState(leases=[scheduler_pb2.LeaseInfo(lease_id="l1")]))
    line = smi.summary(now, None)
    assert line.endswith("sessions: none shown to you (none open now - not yet, or no longer -, or not yours to see)")


def test_a_gpupool_run_child_keeps_torchs_objects_out_of_its_exits_collections() -> None:
    """Round 56: a script's exit through `gpupool run` took 5-9 s at load 15-20 after its last line, ~80 % of it the
    interpreter's final collections over torch's objects: in a process of `gpupool run` ($GPUPOOL_LEASE) `import torch`
    ends with them frozen (client/cuda `freeze_imports`); GPUPOOL_GC_FREEZE=0 leaves them, and a plain script is
    untouched."""
    code = "import gc, torch; print(gc.get_freeze_count())"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "TORCH_DEVICE_BACKEND"))}
    cases = {"run": {"GPUPOOL_LEASE": "{}"}, "off": {"GPUPOOL_LEASE": "{}", "GPUPOOL_GC_FREEZE": "0"}, "plain": {}}
    children = {
        name: subprocess.Popen([sys.executable, "-c", code], env={**env, **extra}, stdout=subprocess.PIPE, text=True)
        for name, extra in cases.items()
    }
    counts = {name: int(child.communicate(timeout=120)[0]) for name, child in children.items()}
    assert counts["run"] > 50_000 and counts["off"] == 0 and counts["plain"] == 0, counts
