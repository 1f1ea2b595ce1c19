"""What a daemon's stop and `gpupool run --native-client`'s start cost, in this checkout and (with `--against DIR
--against-python PY`) in another, side by side in one run, rounds interleaved. Wall clock of fixed work, medians:

- `gpupool serve` (one fake GPU, plaintext on loopback): its start, to "listening on" (it waits for its zygote); the
  CPU seconds the serve process had spent when it launched the zygote (what the zygote's own torch import waits
  for, on an idle machine with a core each: round 21), and the zygote's launch in wall seconds after the start;
- `gpupool serve` (one session attached and detached): SIGTERM to exit;
- an in-process daemon (`RunningDaemon`, metrics on): `stop()`;
- `gpupool run --native-client`'s preparation before it leases (`client/run.py` `_prepare_native`: is the C++ client
  built?) in a fresh interpreter, the library already built.

Every test that starts or stops a daemon, and every `gpupool run --native-client`, pays these (rounds 19 and 21: the
suite's time).

    nice -n 10 .venv/bin/python bench/stop_start.py --rounds 5 --against /work/wt/base \
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Run by each checkout's python in its own folder (`--child WHAT`): prints one JSON number (seconds).
CHILD_IN_PROCESS = """
import json, secrets, time
from gpupool import tokens
from gpupool.tls import TlsConfig
from gpupool.server.app import RunningDaemon
from gpupool.server.daemon import DaemonConfig

seed = secrets.token_hex(32).encode()
verifier = tokens.Verifier([tokens.Signer.from_seed(seed).public])
times = []
for _ in range(N):
    config = DaemonConfig(listen="127.0.0.1:0", host_id="bench", fake_gpus=1, fake_gpu_memory=1 << 26,
                          token_key=verifier, metrics_listen="127.0.0.1:0", tls=TlsConfig(insecure=True))
    running = RunningDaemon(config)
    time.sleep(0.2)  # serving: its metrics thread is in its poll
    t0 = time.perf_counter()
    running.stop(grace=1.0, drain=False)
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""

CHILD_PREPARE = """
import json, time
t0 = time.perf_counter()
from gpupool.client import run
assert run._prepare_native(None) == 0
print(json.dumps(time.perf_counter() - t0))
"""

CHILD_ATTACH = """
import sys, torch
from gpupool.client.session import Handle, Session
s = Session.attach(sys.argv[1], sys.argv[2])
s.download(Handle(s.upload(torch.ones(4))))
s.close()
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _watch_zygote(pid: int, start: float, seen: dict[str, float]) -> None:
    """Poll for the zygote (a child of `pid`): when it appears, the wall seconds since `start` and `pid`'s CPU."""
    while "launch" not in seen:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if (
                    int(stat.rsplit(")", 1)[1].split()[1]) == pid
                    and b"gpupool.server.zygote" in Path(f"/proc/{entry}/cmdline").read_bytes()
                ):
                    seen["cpu"], seen["launch"] = _cpu_seconds(pid), time.perf_counter() - start
                    return
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.005)


def serve_stop(python: str, cwd: str) -> dict[str, float]:
    """Start `gpupool serve` (seconds to "listening", its CPU when it launched the zygote, when that was), attach and
    detach a session (a worker forked and ended), SIGTERM: seconds to exit."""
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key"
        code = ("import sys; from gpupool import tokens; tokens.generate_key_file(sys.argv[1], sys.argv[1] + '.pub'); "
                "print(tokens.mint(tokens.load_signer(sys.argv[1]), tokens.TokenClaims(lease_id='b', host='bench', "
                "device=0, quota_bytes=0, share=1.0, expires_at=__import__('time').time() + 600)))")  # fmt: skip
        token = subprocess.check_output([python, "-c", code, str(key)], cwd=cwd, text=True).strip().splitlines()[-1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_TLS")}
        cmd = [python, "-m", "gpupool.cli", "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
               "--insecure", "--token-public-keys", f"{key}.pub", "--host-id", "bench", "--fake-gpus", "1"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: dict[str, float] = {}
        watcher = threading.Thread(target=_watch_zygote, args=(proc.pid, t0, seen), daemon=True)
        watcher.start()
        assert proc.stdout is not None
        address, log = "", []
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"listening on (\S+:\d+)", line)
            if m:
                address = m.group(1)
                break
        started = time.perf_counter() - t0
        assert address, "gpupool serve did not start:\n" + "".join(log[-20:])
        watcher.join(timeout=5)
        attach_env = {**env, "GPUPOOL_INSECURE": "1"}
        subprocess.run([python, "-c", CHILD_ATTACH, address, token], cwd=cwd, env=attach_env, check=True)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        took = time.perf_counter() - t0
        assert proc.returncode == 0, proc.returncode
        return {"start": started, "cpu": seen.get("cpu", float("nan")), "launch": seen.get("launch", float("nan")),
                "serve": took}  # fmt: skip


def child(python: str, cwd: str, code: str) -> object:
    out = subprocess.check_output([python, "-c", code], cwd=cwd, text=True)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--against", default="", help="another checkout (its gpupool runs with --against-python)")
    p.add_argument("--against-python", default="")
    args = p.parse_args()
    sides = {"ours": (sys.executable, str(HERE.parent))}
    if args.against:
        sides["base"] = (args.against_python or sys.executable, args.against)
    keys = ("start", "cpu", "launch", "serve", "in-process", "prepare")
    results: dict[str, dict[str, list[float]]] = {s: {k: [] for k in keys} for s in sides}
    for _ in range(args.rounds):
        for side, (python, cwd) in sides.items():
            for key, value in serve_stop(python, cwd).items():
                results[side][key].append(value)
            results[side]["in-process"] += child(python, cwd, CHILD_IN_PROCESS.replace("N", "3"))  # type: ignore[arg-type]
            results[side]["prepare"].append(child(python, cwd, CHILD_PREPARE))  # type: ignore[arg-type]
    print(f"load average {os.getloadavg()[0]:.1f}; medians of {args.rounds} rounds (in-process: 3 stops a round), s")
    names = {"start": "gpupool serve: start to listening", "cpu": "gpupool serve: its CPU s at zygote launch",
             "launch": "gpupool serve: zygote launched after", "serve": "gpupool serve: SIGTERM to exit",
             "in-process": "RunningDaemon.stop()", "prepare": "gpupool run --native-client: prepare"}  # fmt: skip
    print(f"{'':42s} " + " ".join(f"{s:>8s}" for s in sides) + ("    ours/base" if len(sides) == 2 else ""))
    for key, name in names.items():
        meds = [statistics.median(results[s][key]) for s in sides]
        ratio = f"    {meds[0] / meds[1]:.3f}" if len(meds) == 2 else ""
        print(f"{name:42s} " + " ".join(f"{m:8.3f}" for m in meds) + ratio)


if __name__ == "__main__":
    main()
