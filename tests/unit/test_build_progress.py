"""A native build's words to the user who waits for it (round 49, the seed journey): an estimate at this machine's load
up front, a progress line while the compiler runs, and one line naming the compiler's error when it fails. Round 48's
fresh clone built the daemon's runner for 275 s after one "~60 s" line, and a failed C++ client build said "ninja:
build stopped: subcommand failed."

Each build here is real (torch.utils.cpp_extension, ninja and the system's compiler, through `buildcache.run_build`)
of a tiny source, in a process of its own (the module globals it changes are that process's), made slow where a
test needs it by a compiler that sleeps first (as test_buildcache's) or by the runner's test hook
(native_runner.SLOW_BUILD_ENV), with progress every second instead of every 15."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool import buildcache

TINY = 'extern "C" int gpupool_probe() { return 1; }\n'
BROKEN = 'extern "C" int gpupool_probe() { return not_declared_here; }\n'

# The C++ client's `build()` (client/native/build.py) of argv[1] in place of native_client.cpp, progress every second
CLIENT = """
import sys
from pathlib import Path
from gpupool import buildcache
from gpupool.client.native import build
buildcache.PROGRESS_EVERY = 1.0
build.SOURCE = Path(sys.argv[1])
try:
    print(build.build(retry_failed=True), flush=True)
except build.BuildError as exc:
    print("BuildError:", exc, flush=True)
"""

# The daemon's runner (server/native_runner.py `load`, as a zygote or scripts/setup.sh calls it) of argv[1] in place of
# native_runner.cpp, its log lines on stderr as the zygote's go to the daemon's
RUNNER = """
import hashlib, logging, sys
from pathlib import Path
from gpupool import buildcache
from gpupool.server import native_runner, runner_source
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
buildcache.PROGRESS_EVERY = 1.0
data = Path(sys.argv[1]).read_bytes()
runner_source._source[:] = [(data, hashlib.sha256(data).hexdigest()[:16])]
print("loaded:", native_runner.load() is not None, flush=True)
"""


def _skip_without_compiler() -> None:
    from gpupool.client.native import build

    if build.compiler_missing():
        pytest.skip(build.compiler_missing() or "")


def _slow_cxx(tmp_path: Path) -> Path:
    """A C++ compiler that, asked to compile (`-c`), first sleeps $SLOW_CXX seconds, then runs the real one."""
    cxx = tmp_path / "cxx"
    cxx.write_text(
        '#!/bin/sh\ncase " $* " in *" -c "*) [ -z "$SLOW_CXX" ] || sleep "$SLOW_CXX" ;; esac\nexec c++ "$@"\n'
    )
    cxx.chmod(0o755)
    return cxx


def _source(tmp_path: Path, text: str) -> Path:
    source = tmp_path / "tiny.cpp"
    source.write_text(text)
    return source


def test_a_native_client_build_gives_its_estimate_then_a_line_while_it_compiles(tmp_path: Path) -> None:
    """The first line names what a build takes at this load (the base: "~1-2 min" whatever the load), then a line
    every PROGRESS_EVERY seconds while the compiler runs (the base: none), each with the time so far, the CPU used of
    what a build takes and the load; the end line as before."""
    _skip_without_compiler()
    env = {**os.environ, "GPUPOOL_NATIVE_CLIENT_CACHE": str(tmp_path / "cache"), "CXX": str(_slow_cxx(tmp_path)),
           "SLOW_CXX": "4"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", CLIENT, str(_source(tmp_path, TINY))], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith(".so"), done.stdout + done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("gpupool: ")]
    assert re.match(r"gpupool: building the native client \(once per torch version and source: about \d+ (?:s|min) "
                    r"at this load \(load [0-9.]+ on \d+ cores; 30 s of CPU on an idle core\); a line every 1 s\) "
                    r"into ", lines[0]), lines  # fmt: skip
    progress = [ln for ln in lines if ln.startswith("gpupool: still building the native client: ")]
    assert len(progress) >= 2, lines  # the compiler sleeps 4 s: a line a second meanwhile
    for ln in progress:
        assert re.fullmatch(
            r"gpupool: still building the native client: \d+ s so far, \d+ s of CPU of the ~30 s a "
            r"build takes on an idle core(?:, about [0-9a-z ]+ left at this pace)? "
            r"\((?:[^;]+; )?load [0-9.]+ on \d+ cores\)",
            ln,
        ), ln
    assert re.fullmatch(r"gpupool: built the native client in \d+ s", lines[-1]), lines


def test_a_failed_native_client_build_names_the_compilers_error(tmp_path: Path) -> None:
    """A source the compiler refuses: the BuildError (what `gpupool run` prints before it takes the Python client) is
    the compiler's error line, not the output's last line (the base: "ninja: build stopped: subcommand failed.")."""
    _skip_without_compiler()
    env = {**os.environ, "GPUPOOL_NATIVE_CLIENT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", CLIENT, str(_source(tmp_path, BROKEN))], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    [said] = [ln for ln in done.stdout.splitlines() if ln.startswith("BuildError:")]
    assert re.fullmatch(r"BuildError: the native client did not build: \S*tiny\.cpp:1:\d+: error: .*not_declared_here"
                        r".*", said), said  # fmt: skip


@pytest.mark.parametrize("case", ["slow", "broken"])
def test_the_runners_build_logs_progress_and_a_one_line_failure(tmp_path: Path, case: str) -> None:
    """The daemon's runner (what a zygote logs to the daemon's log, what scripts/setup.sh prints): a build lasting 4 s
    logs a progress line a second (the base: none); a build the compiler refuses is one warning naming the compiler's
    error and the Python path the daemon takes (the base: 300 characters from the middle of the output, the compiler's
    command line)."""
    from gpupool.server import native_runner

    if native_runner.missing():
        pytest.skip(native_runner.missing() or "")
    env = {**os.environ, "GPUPOOL_NATIVE_RUNNER_CACHE": str(tmp_path / "cache"), "GPUPOOL_NATIVE_RUNNER": "1",
           "GPUPOOL_NATIVE_RUNNER_SANITIZE": "0"}  # fmt: skip
    env.pop("GPUPOOL_NATIVE_RUNNER_DIGEST", None)
    if case == "slow":
        env[native_runner.SLOW_BUILD_ENV] = "4"
    source = _source(tmp_path, TINY if case == "slow" else BROKEN)
    done = subprocess.run([sys.executable, "-c", RUNNER, str(source)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and "loaded: False" in done.stdout, done.stdout + done.stderr  # (not a runner)
    progress = [ln for ln in done.stderr.splitlines() if "building the native runner: " in ln]
    warnings = [ln for ln in done.stderr.splitlines() if ln.startswith("WARNING")]
    if case == "slow":
        assert len(progress) >= 2, done.stderr
        for ln in progress:
            assert re.fullmatch(
                r"INFO gpupool\.server\.native_runner: still building the native runner: \d+ s so far, \d+ s "
                r"of CPU of the ~45 s a build takes on an idle core(?:, about [0-9a-z ]+ left at this pace)? "
                r"\((?:[^;]+; )?load [0-9.]+ on \d+ cores\)",
                ln,
            ), ln
        return
    [warning] = warnings
    assert re.search(r"the native runner's build failed: \S*\.cpp:1:\d+: error: .*not_declared_here.*\): learned "
                     r"runs stay in Python, as with GPUPOOL_NATIVE_RUNNER=0", warning), warning  # fmt: skip
    assert "-isystem" not in warning and "\n" not in warning


def test_the_progress_line_names_the_compilers_source_and_counts_its_cpu(tmp_path: Path) -> None:
    """`run_build`'s progress of a real compile (a source the compiler takes seconds over: many template
    instantiations): a line names the file the compiler is on, and the CPU its session used grows."""
    _skip_without_compiler()
    heavy = tmp_path / "heavy.cpp"
    heavy.write_text("#include <map>\n#include <string>\n#include <vector>\ntemplate <int N> struct T { std::map<int, "
                     "std::vector<std::string>> m; int f() { m[N].push_back(std::to_string(N)); return T<N - 1>()"
                     ".f() + (int)m.size(); } };\ntemplate <> struct T<0> { int f() { return 0; } };\n"
                     'extern "C" int gpupool_probe() { return T<300>().f(); }\n')  # fmt: skip
    lines: list[str] = []
    spec = {"name": "heavy", "sources": [str(heavy)], "build_directory": str(tmp_path), "is_python_module": False,
            "verbose": False, "extra_cflags": ["-O2"]}  # fmt: skip
    code, out = buildcache.run_build(spec, float("inf"), "late", at_least=3.0, progress=lines.append,
                                     what="heavy", cpu=10.0, every=0.5)  # fmt: skip
    assert code == 0, out[-2000:]
    assert lines and all(ln.startswith("still building heavy: ") for ln in lines), lines
    used = [float(re.search(r"so far, (\d+) s of CPU", ln).group(1)) for ln in lines]  # type: ignore[union-attr]
    assert used == sorted(used), lines
    assert any("compiling heavy.cpp" in ln for ln in lines), lines


def test_failure_line_and_the_estimate() -> None:
    """`failure_line` picks the compiler's error out of cpp_extension's output (a traceback, ninja's command lines,
    then the error, then ninja's end), a killed compiler's line, a linker's; `estimate` stretches the CPU by the load
    per core and never says less than the CPU."""
    out = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nRuntimeError: Error building "
           "extension 'x': [1/2] c++ -MMD -c /a/b/x.cpp -o x.o\nFAILED: x.o\n/a/b/x.cpp: In function 'int f()':\n"
           "/a/b/x.cpp:1:29: error: 'y' was not declared in this scope\n    1 | int f() { return y; }\n"
           "ninja: build stopped: subcommand failed.\n")  # fmt: skip
    assert buildcache.failure_line(out, 1) == "/a/b/x.cpp:1:29: error: 'y' was not declared in this scope"
    killed = "FAILED: x.o\nc++: fatal error: Killed signal terminated program cc1plus\nninja: build stopped: x\n"
    assert buildcache.failure_line(killed, 1) == "c++: fatal error: Killed signal terminated program cc1plus"
    assert buildcache.failure_line("x.o: undefined reference to `g'\n", 1) == "x.o: undefined reference to `g'"
    assert buildcache.failure_line("", 3) == "exit status 3"
    load = os.getloadavg()[0]
    assert buildcache.expected_seconds(45.0) >= 45.0
    assert buildcache.expected_seconds(45.0) == pytest.approx(45.0 * max(1.0, (load + 1) / buildcache.cores()), 0.5)
    assert re.fullmatch(r"about (\d+ s|\d+ min) at this load \(load [0-9.]+ on \d+ cores; 45 s of CPU on an idle "
                        r"core\)", buildcache.estimate(45.0))  # fmt: skip
    assert [buildcache.duration(s) for s in (5, 89, 95, 275, 3600)] == ["5 s", "89 s", "1 min 30 s", "4 min 30 s",
                                                                         "60 min"]  # fmt: skip


def test_the_progress_line_says_the_time_left_at_the_pace_so_far() -> None:
    """Round 54's walk: the first line's estimate, the CPU stretched by the load ("about 11 min" at load 27, niced
    processes counted), was 3x the runner's build (3 min 20 s); each progress line says what is left at the pace the
    build's CPU has grown so far, once it has used a tenth of what a build takes, and nothing past its CPU."""
    line = buildcache.progress_line("the native runner", 60.0, 15.0, 45.0)
    assert line.startswith("still building the native runner: 60 s so far, 15 s of CPU of the ~45 s a build takes "
                           "on an idle core, about 2 min left at this pace ("), line  # fmt: skip
    for used in (2.0, 50.0):  # too early to tell; past what a build takes on an idle core (a busy core's cache)
        assert "left" not in buildcache.progress_line("the native runner", 60.0, used, 45.0)
    assert "left" not in buildcache.progress_line("the native runner", 60.0, 15.0, 0.0)
