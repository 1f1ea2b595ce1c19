"""`gpupool smi` (the pool at a glance, like nvidia-smi; `--watch` keeps a live view) and `gpupool list-gpus`.

The devices and leases come from the scheduler (`ListPool`); the per-tenant view (memory, share, busy %, ops/s
of every session) from each up host's daemon (`Device.Status`), rates being differences between two polls.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gpupool import protocol, tls
from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2
from gpupool.config import add_flag, format_size
from gpupool.errors import GpupoolError
from gpupool.protocol import HostState

from .cuda import hint as cuda_hint  # (imports no torch)
from .pool import LEASE_ENV, Lease, SchedulerClient

STATE_STYLE: dict[str, str] = {HostState.UP: "green", HostState.DOWN: "red", HostState.DRAINING: "yellow"}
STATUS_TIMEOUT_S = 5.0
WIDEST = 1000  # columns `show` measures the tables in, off a terminal
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
NO_SESSIONS = (
    "none shown to you: a daemon shows an operator (an admin credential of the scheduler: certificate or API token) "
    "every session, a tenant's certificate its own (under --tls-client-auth require, as gpupool up's), and the "
    f"sessions of the lease whose tokens smi presents (those of ${LEASE_ENV}, as in a `gpupool run` command); to "
    "anyone else none"
)
# The tenants table's caption where no lease is active (ListPool lists every tenant's): no session can be, and
# NO_SESSIONS ("none shown to you ...") read as a credential problem, an operator's too (round 42's demo ended on it).
IDLE = "none: no lease is active (a session is a leased GPU in use by a program)"
FREE = "free (measured)"  # (smi54) the operator's column: ListPool's `DeviceState.measured_free_bytes`
HIDDEN_USED = (
    "memory used (hidden): another tenant also holds a lease on the device, and its total less yours would be "
    "that tenant's usage; your own sessions' memory is in the tenants table"
)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.set_defaults(prog=prog)  # (the start of its one-line errors: `_fetch`)
    add_flag(p, "--scheduler", default="", help="scheduler HOST:PORT[,HOST:PORT...] (none given: 127.0.0.1:50050)")
    tls.add_client_flags(p)
    return p


def _fetch(args: argparse.Namespace) -> scheduler_pb2.PoolState | None:
    tls.export_client_args(args)
    client = SchedulerClient(args.scheduler or None)
    try:
        return client.list_pool()
    except GpupoolError as exc:  # "gpupool smi: ...", as every command's one-line error (until round 53 "gpupool: ")
        print(f"{args.prog}: {exc}", file=sys.stderr)
        return None
    finally:
        client.close()


def daemon_channel(address: str) -> grpc.Channel:
    """The one place smi connects to a daemon: TLS as GPUPOOL_TLS_* (or smi's flags) say; Status needs no token."""
    return tls.channel(address, token=False)


def held_tokens(environ: Mapping[str, str] = os.environ) -> dict[str, list[str]]:
    """The lease tokens this process holds, by daemon address: those of ${LEASE_ENV}, the lease `gpupool run` hands
    its command (`gpupool run -- gpupool smi`, or smi run from such a command). A daemon under `--tls-client-auth
    none` (serve's default) shows a caller only the sessions it proves it holds: without them a tenant's smi showed
    none of its own. None there, or one that is not a lease: no tokens (smi shows what the daemons show anyone)."""
    try:
        lease = Lease.from_env(environ)
    except GpupoolError:
        return {}
    if lease is not None:
        cuda_hint.mark_attached("looked")  # (`gpupool run -- gpupool smi` used its lease: no "ran on the CPU" note)
    held: dict[str, list[str]] = defaultdict(list)
    for d in lease.devices if lease is not None else ():
        if d.token and d.token not in held[d.address]:
            held[d.address].append(d.token)
    return held


def _daemon_status(address: str, status_token: str = "") -> device_pb2.StatusReply | None:
    """A daemon's Status, presenting the operator's status token for its host (`status_token`: the scheduler's
    ListPool gives one to an admin, none to others) and the lease tokens held for it (`held_tokens`), or None when it
    does not answer (the table then shows its sessions as unknown). A token it refuses (a status token it cannot
    verify; an expired or revoked lease's: the lease is over) costs only what it showed: smi asks again without the
    status token, then without any."""
    channel = daemon_channel(address)
    stub = device_pb2_grpc.DeviceStub(channel)
    leases = tuple((protocol.LEASE_TOKEN_METADATA, t) for t in held_tokens().get(address, ()))
    operator = ((protocol.STATUS_TOKEN_METADATA, status_token),) if status_token else ()
    attempts = [md for md in (operator + leases, leases) if md]
    try:
        for attempt in dict.fromkeys([*attempts, ()]):
            try:
                return stub.Status(device_pb2.StatusRequest(), timeout=STATUS_TIMEOUT_S, metadata=attempt)
            except grpc.RpcError as err:  # noqa: PERF203 - once more without a refused token
                if not attempt or err.code() not in REFUSED:  # type: ignore[attr-defined]
                    return None
        return None
    finally:
        channel.close()


@dataclass
class Sample:
    """One poll of the pool: the scheduler's view plus each reachable daemon's sessions, at a monotonic time."""

    pool: scheduler_pb2.PoolState
    sessions: dict[tuple[str, str], device_pb2.SessionUsage] = field(default_factory=dict)  # (host, tag) ->
    at: float = field(default_factory=time.monotonic)


StatusFn = Callable[[str, str], device_pb2.StatusReply | None]  # (address, status token)


def sample(pool: scheduler_pb2.PoolState, status: StatusFn = _daemon_status) -> Sample:
    """Poll every host that is not down for its sessions (with the operator's status token the scheduler gave for
    it, if any)."""
    s = Sample(pool)
    for h in pool.hosts:
        reply = status(h.address, h.status_token) if h.state != HostState.DOWN else None
        for u in reply.sessions if reply is not None else ():
            s.sessions[(h.host_id, u.session_id)] = u
    return s


def safe(value: str) -> str:
    """A string from the pool (a host's model, UUID or address, a daemon's Status) as it may reach a terminal: each
    non-printable character (ESC, a right-to-left override, a line break) as its escape (`\\x1b`). A host decides
    these strings, and round 35 printed them raw: escape sequences wrote to the reader's terminal (an OSC 52 sets
    the clipboard)."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def _cell(value: str) -> Text:
    """A table cell of a pool's string: plain text, never rich markup (a model `[/bold]` ended `gpupool smi` with a
    MarkupError for everyone until round 35, `[link=...]` made a link), non-printables escaped (`safe`)."""
    return Text(safe(value))


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def operators_view(pool: scheduler_pb2.PoolState) -> bool:
    """(smi54) Whether `pool` is an operator's view (ListPool gives an admin a status token for each host not down, and
    the measure), which shows each device's free memory as its daemon last measured it (`measured_free`)."""
    return any(h.status_token or any(d.HasField("measured_free_bytes") for d in h.devices) for h in pool.hosts)


def measured_free(d: scheduler_pb2.DeviceState) -> str:
    """A device's free memory by its daemon's last measure, "-" where not measured (or its host down)."""
    return format_size(d.measured_free_bytes) if d.HasField("measured_free_bytes") else "-"


def devices_table(pool: scheduler_pb2.PoolState) -> Table:
    holders: dict[tuple[str, int], list[str]] = defaultdict(list)
    shared: set[tuple[str, int]] = set()  # devices where the scheduler hid the memory used (`hidden_used`)
    for lease in pool.leases:
        for ld in lease.devices:
            holders[(ld.host_id, ld.device)].append(f"{safe(lease.tenant) or '?'} {ld.share:.2g}")
            if not lease.lease_id:  # another tenant's lease (ListPool names only the caller's own)
                shared.add((ld.host_id, ld.device))
    hidden = {(h.host_id, d.info.index) for h in pool.hosts for d in h.devices if d.used_bytes == 0} & shared
    devices = Table(
        title="gpupool devices",
        title_justify="left",
        caption=HIDDEN_USED if hidden else None,
        caption_justify="left",
    )
    operator = operators_view(pool)
    columns = ["host", "state", "gpu", "model", "memory used", *([FREE] if operator else []), "allocated", "capacity"]
    for col in (*columns, "share", "tenants"):
        devices.add_column(
            col, justify="right" if col in ("gpu", "memory used", FREE, "allocated", "capacity") else "left"
        )
    for h in pool.hosts:
        style = STATE_STYLE.get(h.state, "")
        for i, d in enumerate(h.devices):
            free = [measured_free(d)] if operator else []
            devices.add_row(
                _cell(h.host_id if i == 0 else ""),
                Text(safe(h.state), style=style) if i == 0 else "",
                str(d.info.index),
                _cell(d.info.model),
                "(hidden)" if (h.host_id, d.info.index) in hidden else format_size(d.used_bytes),
                *free,
                format_size(d.allocated_bytes),
                format_size(d.info.memory_bytes),
                _pct(d.allocated_share),
                Text(", ".join(holders.get((h.host_id, d.info.index), [])) or "-"),
            )
    return devices


def leases_table(pool: scheduler_pb2.PoolState) -> Table:
    leases = Table(title=f"leases ({len(pool.leases)} active, {pool.waiting} waiting)", title_justify="left")
    for col in ("lease", "tenant", "devices", "quota", "share", "expires in"):
        leases.add_column(col)
    now = time.time()
    for lease in pool.leases:
        leases.add_row(
            _cell(lease.lease_id[:12] or "(other tenant)"),
            _cell(lease.tenant),
            _cell(", ".join(f"{ld.host_id}/{ld.device}" for ld in lease.devices)),
            ", ".join(format_size(ld.quota_bytes) for ld in lease.devices),
            ", ".join(f"{ld.share:.2g}" for ld in lease.devices),
            f"{max(0.0, lease.expires_at - now):.0f} s",
        )
    return leases


def tenants_table(now: Sample, before: Sample | None) -> Table:
    """One row per session: memory used/limit, captured graphs' host memory/limit, share, and busy % and ops/s
    since the previous sample."""
    # A daemon shows a caller only the sessions its credentials hold (docs/security.md, "Credentials and what they
    # grant"): an empty table may be the caller's view, not an idle pool.
    caption = None if now.sessions else NO_SESSIONS if now.pool.leases else IDLE
    table = Table(
        title="tenants (sessions on the daemons)", title_justify="left", caption=caption, caption_justify="left"
    )
    for col in ("host/gpu", "tenant", "lease", "session", "memory", "limit", "graphs", "share", "busy", "ops/s"):
        table.add_column(col, justify="left" if col in ("host/gpu", "tenant", "lease", "session") else "right")
    for (host, tag), u in sorted(now.sessions.items()):
        busy, ops = rates(now, before, (host, tag))  # ("..." in the first sample: nothing to compare with)
        table.add_row(_cell(f"{host}/{u.device}"), _cell(u.tenant), _cell(u.lease_id[:12]), _cell(tag),
                      format_size(u.used_bytes), format_size(u.limit_bytes), graphs(u), f"{u.share:.2g}", busy,
                      ops)  # fmt: skip
    return table


def graphs(u: device_pb2.SessionUsage) -> str:
    """The host memory a session's captured graphs hold, estimated, of its limit (`--max-graph-memory`; Status
    fields 52 and 53 since round 36): "off" where capture is off (a limit of 0, also what a daemon before round 36
    reports)."""
    if u.graph_limit_bytes <= 0:
        return "off"
    return f"{format_size(u.graph_bytes)}/{format_size(u.graph_limit_bytes)}"


def view(now: Sample, before: Sample | None, log: Path | None = None, log_lines: int = 8) -> RenderableType:
    """The whole live view: devices, tenants, leases, and optionally the last lines of a log file."""
    parts: list[RenderableType] = [devices_table(now.pool), tenants_table(now, before), leases_table(now.pool)]
    if log is not None:
        try:
            tail = log.read_text(errors="replace").splitlines()[-log_lines:]
        except OSError:
            tail = []
        parts.append(Panel(Text("\n".join(tail)), title=str(log), title_align="left"))
    return Group(*parts)


def show(console: Console, frame: RenderableType) -> None:
    """Print `frame` (a `view`) whole: off a terminal (`gpupool smi | cat`, `| tee`, a log) as wide as its tables'
    natural width, where rich used 80 columns and cut each header and cell past them ("alloc…", "capaci…": round 53);
    on a terminal, or where COLUMNS is set, at that width as before."""
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        wide = console.options.update(width=WIDEST)
        parts = frame.renderables if isinstance(frame, Group) else [frame]
        tables = [Measurement.get(console, wide, part).maximum for part in parts if isinstance(part, Table)]
        console.width = max([console.width, *tables])
    console.print(frame)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rates(now: Sample, before: Sample | None, key: tuple[str, str]) -> tuple[str, str]:
    """A session's busy % and ops/s since the previous sample ("..." for both where there is none to compare)."""
    u, dt = now.sessions[key], now.at - before.at if before is not None else 0.0
    prev = before.sessions.get(key) if before is not None else None
    if prev is None or dt <= 0:
        return "...", "..."
    busy = 100 * min(1.0, max(0.0, (u.busy_seconds - prev.busy_seconds) / dt))
    return f"{busy:.1f}%", f"{max(0, u.ops - prev.ops) / dt:,.0f}"


def summary(now: Sample, before: Sample | None) -> str:
    """The view in one line (what --watch prints each interval off a terminal, where a redrawn frame cannot be
    seen): hosts up, devices, leases, in an operator's view each device's measured free memory (quota55, as the
    devices table's "free (measured)"), and each session shown: memory of its limit, busy %, ops/s."""
    hosts = now.pool.hosts
    up = sum(h.state == HostState.UP for h in hosts)
    gpus = sum(len(h.devices) for h in hosts)
    head = (f"{time.strftime('%H:%M:%S')} pool: {up}/{len(hosts)} host(s) up, {gpus} GPU(s), "
            f"{len(now.pool.leases)} lease(s), {now.pool.waiting} waiting")  # fmt: skip
    if operators_view(now.pool):
        head += f"; {FREE}: " + ", ".join(
            f"{safe(h.host_id)}/{d.info.index} {measured_free(d)}" for h in hosts for d in h.devices
        )
    rows = []
    for key, u in sorted(now.sessions.items()):
        busy, ops = rates(now, before, key)
        rows.append(f"{safe(u.tenant) or '?'} on {safe(key[0])}/{u.device}: memory {format_size(u.used_bytes)}/"
                    f"{format_size(u.limit_bytes)}, share {u.share:.2g}, busy {busy}, {ops} ops/s")  # fmt: skip
    if not rows:
        rows = [
            # (until round 55 "none open yet": also after its program's session had closed, while its lease lived
            # on until `gpupool run` released it, seconds at the demo's end)
            "sessions: none shown to you (none open now - not yet, or no longer -, or not yours to see)"
            if now.pool.leases
            else "sessions: none (no lease is active)"
        ]
    return "; ".join([head, *rows])


class LogFollower:
    """The lines a file gained since the last read (`tail -f` by polls; a partial last line waits for its end)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_lines(self, final: bool = False) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = len(data) if final else data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()


def watch(args: argparse.Namespace, console: Console) -> int:
    """Refresh the view every --interval seconds until --count refreshes, --until-pid exits, or Ctrl-C.

    Off a terminal (a pipe, `| tee`, a CI log, a notebook) a redrawn frame shows nothing until the last one (round
    49: the piped demo sat 144-416 s silent while it trained): there each interval prints one line (`summary`), the
    --log file's new lines as they come, and the full view once at the end."""
    if console.is_terminal:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            return _refresh(args, lambda now, before, _: live.update(view(now, before, args.log), refresh=True))
    follow = LogFollower(args.log) if args.log is not None else None

    def lines(now: Sample, before: Sample | None, last: bool) -> None:
        for line in follow.new_lines(final=last) if follow is not None else ():
            print(line)
        print(summary(now, before), flush=True)
        if last:
            show(console, view(now, before, args.log))

    return _refresh(args, lines)


def _refresh(args: argparse.Namespace, show: Callable[[Sample, Sample | None, bool], None]) -> int:
    """--watch's loop: `show(now, before, last)` a sample every --interval s; 130 on Ctrl-C, 1 where no pool."""
    before: Sample | None = None
    shown = 0
    try:
        while True:
            pool = _fetch(args)
            if pool is None:
                return 1
            now = sample(pool)
            shown += 1
            last = bool(args.count and shown >= args.count) or bool(args.until_pid and not _alive(args.until_pid))
            show(now, before, last)
            if last:
                return 0
            before = now
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 130  # (Ctrl-C: 128 + SIGINT, so that a script running the watch, scripts/demo.sh, can tell)


def main(argv: list[str]) -> int:
    p = _parser(
        "gpupool smi",
        "Show the pool: hosts, devices, memory, shares, leases, and the sessions' usage the daemons show you (each "
        "session to an operator: smi presents the status tokens the scheduler gives an admin credential, certificate "
        "or API token; a tenant's own to its certificate, where daemons require certificates; anywhere, the sessions "
        f"of the lease whose tokens ${LEASE_ENV} holds, as in `gpupool run -- gpupool smi`). "
        "A device's memory used is (hidden) to a tenant where another tenant also holds a lease on it. An "
        f"operator's view adds a \"{FREE}\" column: each device's free memory as its daemon last measured it (the "
        'driver\'s count on a real GPU, where memory used outside the pool shows), "-" where not measured.',
    )
    p.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="keep a live view, refreshed every --interval s (off a terminal - a pipe, a log - a line of the pool "
        f"each interval, an operator's with each device's \"{FREE}\", --log's new lines as they come and the full "
        "view at the end)",
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch (default 2)")
    p.add_argument("--count", type=int, default=0, help="with --watch: stop after N refreshes (default: until Ctrl-C)")
    p.add_argument("--until-pid", type=int, default=0, help="with --watch: stop when process PID has exited")
    p.add_argument(
        "--log",
        type=Path,
        default=None,
        help="with --watch: also show the last lines of this file (off a terminal: each new line)",
    )
    args = p.parse_args(argv)
    if args.interval <= 0:
        p.error("--interval must be > 0")
    console = Console()
    if args.watch:
        return watch(args, console)
    pool = _fetch(args)
    if pool is None:
        return 1
    show(console, view(sample(pool), None))
    return 0


def list_gpus(pool: scheduler_pb2.PoolState) -> list[str]:
    """`gpupool list-gpus`'s lines: one a device; in an operator's view with its measured free memory (quota55)."""
    operator = operators_view(pool)
    return [
        f"{safe(h.host_id)}/{d.info.index}: {safe(d.info.model)}{' (fake)' if d.info.fake else ''} "
        f"(UUID: {safe(d.info.uuid)}) {format_size(d.info.memory_bytes)}, "
        f"{_pct(d.allocated_share)} allocated, {f'{FREE} {measured_free(d)}, ' if operator else ''}"
        f"{safe(h.state)}, {safe(h.address)}"
        for h in pool.hosts
        for d in h.devices
    ]


def list_gpus_main(argv: list[str]) -> int:
    args = _parser(
        "gpupool list-gpus",
        f"List the pool's GPUs, one line each. An operator's (an admin credential's) lines add \"{FREE} SIZE\": "
        "each device's free memory as its daemon last measured it (the driver's count on a real GPU), \"-\" where "
        "not measured.",
    ).parse_args(argv)
    pool = _fetch(args)
    if pool is None:
        return 1
    for line in list_gpus(pool):
        print(line)
    return 0
