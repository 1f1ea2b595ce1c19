"""`gpupool run -n 1 -p 0.5 -- python train.py`: run a command on leased (fractions of) GPUs.

Allocates the lease, hands it to the child through the environment ($GPUPOOL_LEASE, JSON; the torch shim
reads it with `Lease.from_env`), renews it in the background while the child runs, releases it when the
child exits and returns the child's exit code. SIGINT/SIGTERM are forwarded to the child (SIGINT not where
the terminal sent it to both: `_terminal_sent_both`). If the scheduler
declares the lease lost (its host died, it expired), the child is stopped at once (SIGTERM, SIGKILL after
`STOP_GRACE` s) and `run` exits 1 saying why: the devices are gone, so waiting on them would only hang.

With --cuda (or $GPUPOOL_CUDA=1) the child also gets GPUPOOL_CUDA=1, and the leased devices appear to it as
CUDA devices (gpupool.client.cuda, loaded by torch itself at `import torch`; docs/cuda.md). The child gets
GRPC_ENABLE_FORK_SUPPORT=0 unless the environment sets it (docs/cuda.md, "DataLoader workers"). In the child, `import
torch` ends with torch's objects frozen out of the garbage collector's sight (client/cuda `freeze_imports`: a script's
exit spent seconds collecting them; GPUPOOL_GC_FREEZE=0 turns it off).

The child's `gpupool` device is the C++ client (gpupool.client.native; docs/native-client.md) wherever it is built or
can be built: `run` builds it first (once per torch version and source, ~30 s of CPU: minutes on a loaded host, said up
front, with a line every 15 s while it compiles; cached; scripts/setup.sh builds it), before it leases, and starts the
child with GPUPOOL_CLIENT=native. Where it cannot be built (no g++ or ninja, a build error, a cache folder other users
could write, a cache that cannot take a build: root's shared one, a read-only disk) `run` logs one line saying why and
the child gets the Python client (GPUPOOL_CLIENT=shim). `--client native` (alias `--native-client`) or `--client shim`
(or $GPUPOOL_CLIENT=native|shim in `run`'s environment) chooses one: an explicit `native` that cannot be built is one
line and exit 1. With --cuda as well, the CUDA mapping runs on the chosen client.

Exit codes of its own: 2 bad usage, 1 no lease (e.g. RESOURCE_EXHAUSTED), 127 command not found.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from types import FrameType

from gpupool import tls
from gpupool.config import UnsafeCacheDir, add_flag, format_size, setup_logging, size_arg
from gpupool.errors import GpupoolError
from gpupool.protocol import Policy

from . import native
from .cuda import hint as cuda_hint  # (imports no torch)
from .pool import lease

log = logging.getLogger("gpupool.run")
STOP_GRACE = 5.0
CLIENTS = ("native", "shim")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpupool run",
        description="Run a command on leased GPUs: gpupool run -n 1 -p 0.5 -- python train.py",
    )
    p.add_argument("-n", "--gpus", type=int, default=1, help="number of GPUs (default 1)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("-p", "--fraction", type=float, help="fraction of each GPU in (0, 1] (default: a whole GPU)")
    size.add_argument("-m", "--memory", type=size_arg, help="memory of each GPU instead, e.g. 6GiB")
    add_flag(p, "--wait", type=float, default=0.0, help="seconds to wait in line when the pool is full")
    add_flag(p, "--scheduler", default="", help="scheduler HOST:PORT[,HOST:PORT...] (none given: 127.0.0.1:50050)")
    add_flag(
        p,
        "--tenant",
        default="",
        help="tenant to allocate for (operators only; credentials name tenants; an operator's certificate naming "
        "none allocates its own lease, bound to that certificate; an API token naming none: the OS user)",
    )
    p.add_argument(
        "--policy", default="", choices=[p.value for p in Policy], help="placement policy (default: the scheduler's)"
    )
    p.add_argument("--ttl", type=float, default=0.0, help="lease TTL in seconds (default: the scheduler's)")
    tls.add_client_flags(p)
    add_flag(
        p, "--cuda", action="store_true", help="the leased GPUs appear as CUDA to an unmodified script (docs/cuda.md)"
    )
    p.add_argument(
        "--client",
        choices=CLIENTS,
        default=None,
        help="the client behind the child's `gpupool` device: native, the C++ client (fewer instructions per op; eager "
        "ops, step capture, several GPUs, collectives, --cuda), or shim, the Python client (also attach(), "
        "RemoteTensor); default: native where it is built or can be built (g++ and ninja, once: ~30 s of CPU, "
        "minutes under load, a progress line every 15 s), else shim with one line saying why (also "
        "$GPUPOOL_CLIENT=native|shim; docs/native-client.md)",
    )
    p.add_argument(
        "--native-client", dest="client", action="store_const", const="native", help="the same as --client native"
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    return p


def _choose_client(args: argparse.Namespace) -> tuple[str, int]:
    """The child's client (`native` or `shim`) and 0, or ("", exit code) after one line saying why. The C++ client is
    built here, before the lease (the build must not hold a GPU); the default falls back to the shim where it cannot
    be built, an explicit `native` does not."""
    choice = args.client
    if choice is None:
        choice = os.environ.get(native.ENV, "").strip().lower() or None
        if choice is not None and choice not in CLIENTS:
            print(f"gpupool run: ${native.ENV}={choice!r} is not a client (native or shim)", file=sys.stderr)
            return "", 2
    if choice == "shim":
        return "shim", 0
    from .native import build  # not backend: that imports torch (seconds), which only the child needs

    try:
        build.build(retry_failed=choice == "native")  # the default: not again after a failed build (its marker)
    except (build.BuildError, UnsafeCacheDir) as exc:  # unsafe: another user could replace the library there
        if choice == "native":
            hint = "install g++ and ninja, or " if build.compiler_missing() else ""
            print(f"gpupool run: {exc}; {hint}{native.WAY_OUT}", file=sys.stderr)
            return "", 1
        log.warning("using the Python client (--client shim): %s", exc)
        return "shim", 0
    return "native", 0


def more_memory(need: int, quota: int, share: float) -> str:
    """The `gpupool run` size flags that lease `need` bytes of a device with room to spare (a quarter more, for what a
    script's estimate leaves out: a batch's activations), for a script whose lease of `quota` bytes (`share` of its
    device, as $GPUPOOL_LEASE says: the device is quota / share) is too small: '-p 0.5 (or -m 3GiB)' (-m in whole
    16 MiB under a GiB); '-m 3GiB' alone where the share says nothing of the device; where no fraction of one device
    would do, that too."""
    want = need * 1.25
    if want > 2**30:
        by_memory = f"-m {math.ceil(want / 2**30)}GiB"
    else:  # (whole 16 MiB)
        by_memory = f"-m {16 * max(1, math.ceil(want / 2**24))}MiB"
    if share <= 0 or quota <= 0:
        return by_memory
    device = quota / share
    fraction = math.ceil(want / device * 4) / 4  # the next quarter of a GPU
    if fraction <= 1:
        return f"-p {fraction:g} (or {by_memory})"
    return f"{by_memory}: more than one of these GPUs holds ({format_size(device)})"


def _terminal_sent_both(child: int) -> bool:
    """Whether a SIGINT we got is the terminal's Ctrl-C, which it sent the child as well: we are in the foreground
    process group of our controlling terminal and the child is in our group. Forwarding it too interrupted the child
    twice: a Python child's second KeyboardInterrupt hit its `finally` blocks and atexit handlers (the client's
    Detach: "Exception ignored in atexit callback"). A SIGINT from `kill` to `run` alone while it is in a terminal's
    foreground is not forwarded either (Python's handlers do not say who sent a signal): SIGTERM is."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal: the SIGINT was someone's kill, never a Ctrl-C
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp() == os.getpgid(child)
    except OSError:  # (the child gone meanwhile)
        return False
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("gpupool run: no command given (gpupool run -n 1 -p 0.5 -- python train.py)", file=sys.stderr)
        return 2
    setup_logging("gpupool-run", os.environ.get("GPUPOOL_LOG_LEVEL", "WARNING"))
    client, code = _choose_client(args)
    if code:
        return code
    tls.export_client_args(args)  # the library, and the child through os.environ, use the same credentials
    try:
        held = lease(
            args.gpus,
            args.fraction,
            args.memory,
            scheduler=args.scheduler or None,
            wait=args.wait,
            tenant=args.tenant or None,  # (None: `default_tenant`, an operator's own lease included)
            policy=args.policy,
            ttl=args.ttl or None,
        )
    except GpupoolError as exc:
        print(f"gpupool run: no lease: {exc}", file=sys.stderr)
        return 1
    hint_dir = ""
    with held:
        where = ", ".join(f"{d.host_id}/{d.device} ({d.share:g})" for d in held.devices)
        log.info("lease %s on %s", held.lease_id, where)
        try:
            env = {**os.environ, **held.to_env(), **({"GPUPOOL_CUDA": "1"} if args.cuda else {})}
            env[native.ENV] = client  # the child's torch entry point loads the C++ client for `native`
            # gRPC's fork handlers: once a session streams, every fork (a DataLoader's workers) skipped them anyway
            # and gRPC logged "fork_posix.cc:71] Other threads are currently calling into gRPC, skipping fork()
            # handlers" once a worker; the workers never use gRPC. Off unless the user's environment says otherwise.
            env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
            if not args.cuda:  # a CUDA script's `--cuda` hint: once a run, not once a torchrun rank (cuda/hint.py)
                hint_dir = tempfile.mkdtemp(prefix="gpupool-run-")
                env[cuda_hint.DIR_ENV] = hint_dir
            child = subprocess.Popen(command, env=env)
        except OSError as exc:
            if hint_dir:
                shutil.rmtree(hint_dir, ignore_errors=True)
            print(f"gpupool run: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
            return 127

        def forward(signum: int, _frame: FrameType | None) -> None:
            if child.poll() is None and not (signum == signal.SIGINT and _terminal_sent_both(child.pid)):
                child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while child.poll() is None and not held.lost.wait(0.2):
                pass
            if child.poll() is None:  # the lease is gone while the command runs: stop it now
                print(f"gpupool run: the lease was lost, stopping the command: {held.error}", file=sys.stderr)
                child.terminate()
                try:
                    child.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    child.kill()
                child.wait()
                return 1
            code = child.wait()
            # a command that succeeded without attaching (a device-agnostic script that ran on the CPU): say so after
            # its output; not after a failure (its own error is the last line) nor after the `--cuda` hint
            unused = bool(hint_dir) and code == 0 and cuda_hint.unused(hint_dir)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if hint_dir:
                shutil.rmtree(hint_dir, ignore_errors=True)
        if held.lost.is_set():
            print(f"gpupool run: the lease was lost while the command ran: {held.error}", file=sys.stderr)
        elif unused:
            print(cuda_hint.UNUSED, file=sys.stderr)
    return 128 - code if code < 0 else code
