"""Round 41's review of sched41 (schedrev41): the stderr pump process (gpupool/logsink.py `StderrPump`) killed while its
program runs (it ignores SIGINT, SIGTERM and SIGHUP, so only a SIGKILL, by hand or the OOM killer, ends it first).

Found and fixed here (fails on 8b0bdbe): descriptor 2 stayed the dead pump's pipe. The program's log lines went to the
real stderr (the sink's fallback), but a print to sys.stderr raised BrokenPipeError, what C code wrote was lost, and a
child started with `subprocess` (which sets SIGPIPE back to its default before the exec: a shell, a compiler) died of
SIGPIPE at its first write to stderr. Now the pump's death, found by the sink's next write (EPIPE) or an unanswered
`settle`/`drain`, makes descriptor 2 the real stderr again (`StderrPump._gone`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PUMP_KILLED = """
import logging, os, signal, subprocess, sys, time
from gpupool.config import setup_logging
setup_logging("killed", background=True)  # (the daemon's and the scheduler's: the pump, their lines through it)
from gpupool import logsink
pump = logsink.PUMP.process
os.kill(pump.pid, signal.SIGKILL)
pump.wait()
logging.getLogger("t").warning("a log line after the pump died")  # (its write finds the pipe without a reader)
logsink.PUMP.sink.flush()
print("a print after", file=sys.stderr, flush=True)
os.write(2, b"a C write after\\n")
child = subprocess.run(["sh", "-c", "echo a child after >&2; echo alive"], stdout=subprocess.PIPE, text=True)
print(child.returncode, child.stdout.strip())
logsink.PUMP.settle()
"""


def test_a_program_whose_pump_died_writes_to_its_real_stderr_and_its_children_do_not_die_of_sigpipe(
    tmp_path: Path,
) -> None:
    """The pump is killed; the program logs a line, prints to sys.stderr, writes to descriptor 2 and runs
    `sh -c 'echo ... >&2'`: every line reaches the real stderr, the shell exits 0. On 8b0bdbe the print raised
    BrokenPipeError (the program ended with its traceback, lost too) and, without the print, the shell died of
    SIGPIPE (-13)."""
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.run(
            [sys.executable, "-c", PUMP_KILLED], stdout=subprocess.PIPE, stderr=err, text=True, timeout=60
        )
    text = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, (proc.returncode, text[-500:])
    assert proc.stdout.split() == ["0", "alive"], proc.stdout
    for line in ("a log line after the pump died", "a print after", "a C write after", "a child after"):
        assert line in text, (line, text)
