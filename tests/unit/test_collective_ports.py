"""`gpupool serve --collective-ports` (round 42): the TCP ports a session worker granted network listens on and
connects to for its collective groups; the daemon refuses to start with one of its own ports in the range."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpupool.server.cli import build_parser, config_from_args
from gpupool.server.daemon import DaemonConfig, check_collective_ports, ephemeral_overlap
from support import public_key_file

from gpupool.errors import InvalidArgument
from gpupool.protocol import COLLECTIVE_PORTS, port_range


def test_the_range_parses_and_bad_ones_are_refused() -> None:
    assert port_range("30100-30355") == (30100, 30355) == COLLECTIVE_PORTS
    assert port_range("40000") == (40000, 40000)
    for bad in ("", "a-b", "30100-", "80-90", "30355-30100", "70000-70001", "20000-30000"):
        with pytest.raises(ValueError):
            port_range(bad)


def test_the_flag_reaches_the_daemons_config_and_its_help_names_it(token_key_file: Path) -> None:
    keys = ["--token-public-keys", str(public_key_file(token_key_file))]
    args = build_parser().parse_args([*keys, "--collective-ports", "41000-41015"])
    assert config_from_args(args).collective_ports == (41000, 41015)
    assert config_from_args(build_parser().parse_args(keys)).collective_ports == COLLECTIVE_PORTS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--collective-ports", "80-90"])
    assert "--collective-ports" in build_parser().format_help()


def test_round_43s_flags_reach_the_daemons_config(token_key_file: Path) -> None:
    """--collective-ports-per-tenant (each tenant's share of the host's range) and --gloo-connect-anywhere (gloo's
    workers granted network connect anywhere): neither flag existed on 7b5ed4d."""
    keys = ["--token-public-keys", str(public_key_file(token_key_file))]
    config = config_from_args(build_parser().parse_args(keys))
    assert (config.collective_ports_per_tenant, config.gloo_connect_anywhere) == (64, False)
    flags = ["--collective-ports-per-tenant", "16", "--gloo-connect-anywhere", "on"]
    config = config_from_args(build_parser().parse_args([*keys, *flags]))
    assert (config.collective_ports_per_tenant, config.gloo_connect_anywhere) == (16, True)


def test_a_daemon_port_inside_the_range_is_refused_at_start() -> None:
    """A worker granted network may connect to every port of the range: the daemon's own gRPC, bulk and metrics
    ports must stay out of it."""
    check_collective_ports(DaemonConfig(listen="127.0.0.1:50051"))  # the defaults are apart
    check_collective_ports(DaemonConfig(listen="127.0.0.1:0"))  # (a port the kernel picks: checked once bound)
    for field in ("listen", "bulk_listen", "metrics_listen", "health_listen"):
        with pytest.raises(InvalidArgument, match="is in --collective-ports 30100-30355"):
            check_collective_ports(DaemonConfig(**{field: "127.0.0.1:30200"}))  # type: ignore[arg-type]


def test_the_kernels_ephemeral_ports_inside_the_range_are_named(tmp_path: Path) -> None:
    """`ephemeral_overlap`: what of the range the kernel may hand out (a port-0 listener's port, an outgoing
    connection's own), less its reserved ports; this host's default ephemeral range is apart."""
    proc = tmp_path

    def kernel(ephemeral: str, reserved: str) -> str:
        (proc / "ip_local_port_range").write_text(ephemeral + "\n")
        (proc / "ip_local_reserved_ports").write_text(reserved + "\n")
        return ephemeral_overlap(COLLECTIVE_PORTS, str(proc))

    assert kernel("32768\t60999", "") == ""
    assert kernel("1024\t65535", "").startswith("256 of its ports are in the kernel's ephemeral ports 1024-65535")
    assert kernel("30300\t40000", "30350-30355").startswith("50 of its ports")
    assert kernel("1024\t65535", "22,30100-30355") == ""
    assert ephemeral_overlap(COLLECTIVE_PORTS, str(tmp_path / "none")) == ""  # unreadable: nothing said
