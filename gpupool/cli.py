"""`gpupool` command: dispatches to each program's own CLI module, imported lazily so that
`gpupool serve` never loads the client and `gpupool smi` never loads the daemon."""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gpupool.server.cli", "run the daemon on a GPU host"),
    "scheduler": ("gpupool.scheduler.cli", "run the pool scheduler"),
    "up": ("gpupool.up", "run a scheduler and a daemon on this machine (fake GPUs without CUDA)"),
    "down": ("gpupool.down", "stop the pool `gpupool up` runs (its --state) from another shell"),
    "run": ("gpupool.client.run", "run a command on leased GPUs: gpupool run -n 1 -p 0.5 -- python train.py"),
    "smi": ("gpupool.client.smi", "show the pool: hosts, devices, memory, shares, leases"),
    "list-gpus": ("gpupool.client.smi", "list the pool's GPUs, one line each"),
    "host": ("gpupool.client.admin", "operators: drain, undrain or remove a host of the pool"),
    "lease": (
        "gpupool.client.admin",
        "release leases now (a tenant's own; operators: any, --tenant NAME) or change their terms (operators: terms)",
    ),
    "cert": ("gpupool.client.admin", "operators: revoke client certificates (revoke, unrevoke, list)"),
    "token": ("gpupool.tokencli", "keys (keygen, public-key), API tokens (api-token), a lease token by hand (mint)"),
}

CLIENTS = ("run", "smi", "list-gpus", "host", "lease", "cert")  # a client's commands (not the programs' nor `up`'s)

# Commands a user tries that gpupool has not, and what does it instead (a journey of round 41 typed `gpupool down`,
# a command since round 51).
HINTS: dict[str, str] = {
    "status": "the pool: `gpupool smi` (or `gpupool list-gpus`)",
    "ls": "the pool: `gpupool smi` (or `gpupool list-gpus`)",
    "ps": "the pool's leases and sessions: `gpupool smi`",
}


def usage() -> str:
    lines = ["usage: gpupool COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    # (until round 55 "every flag can also be set as GPUPOOL_<FLAG>": not `run`'s size, policy and ttl, nor smi's view)
    lines += ["", "gpupool COMMAND --help shows the flags of each; one whose help ends [env NAME] can also be set by",
              "that variable (most as GPUPOOL_<FLAG>: --fake-gpus as GPUPOOL_FAKE_GPUS)."]  # fmt: skip
    return "\n".join(lines)


def standard_descriptors() -> None:
    """Descriptors 0, 1 and 2 that a parent closed (`gpupool serve 2>&-`) opened again on /dev/null, before anything
    else opens one: otherwise the first descriptor the program opens took the number, and what it wrote to its
    stderr went there (until round 40 the daemon's log lines went into its zygote's control socket: the zygote
    died, no session started)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # (the lowest number free: `fd` itself)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's own, never closed
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - the process's own, never closed


def main(argv: list[str] | None = None) -> int:
    standard_descriptors()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        hint = f"\n{HINTS[name]}" if name in HINTS else ""
        print(f"gpupool: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    if name in CLIENTS:
        # gRPC's core logs a failed TLS handshake at INFO to stderr (grpc 1.85: "I1207 ... Handshake failed with error
        # SSL_ERROR_SSL ..."), a line before the client's own one-line error; the programs it runs (`gpupool run`'s)
        # inherit it
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    module = importlib.import_module(COMMANDS[name][0])
    try:
        if name == "list-gpus":
            return int(module.list_gpus_main(rest))
        if name == "lease":
            return int(module.lease_main(rest))
        if name == "cert":
            return int(module.cert_main(rest))
        return int(module.main(rest))
    except Exception as exc:
        from gpupool.config import UnsafeFile  # lazily, as the programs' modules are
        from gpupool.errors import GpupoolError

        if not isinstance(exc, GpupoolError | UnsafeFile):
            raise  # a bug: its traceback
        # A refusal the program words for its user (a credential file others may read, a CA key of `up --ca-dir`,
        # an unusable setting): one line, as `gpupool serve` and `gpupool scheduler` print theirs. Until round 33
        # `gpupool up` and `gpupool smi` showed it as a traceback of 30 lines.
        print(f"gpupool {name}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
