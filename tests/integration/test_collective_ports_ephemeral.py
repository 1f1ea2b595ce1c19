"""--collective-ports and the kernel's ephemeral ports (round 42 review): a daemon listening on port 0 gets a port of
net.ipv4.ip_local_port_range, which on some hosts holds the collective range (Linux's default, 32768-60999, does
not). A worker granted network may connect to every port of the range, so such a daemon must not start."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

# Its own network namespace (loopback up), whose ephemeral ports are exactly the default --collective-ports
_EPHEMERAL_IN_RANGE = [
    "unshare", "-n", "sh", "-c",
    'ip link set lo up && echo "30100 30355" > /proc/sys/net/ipv4/ip_local_port_range && exec "$@"', "sh",
]  # fmt: skip


def _can_unshare_net() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run([*_EPHEMERAL_IN_RANGE, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_net(), reason="needs unshare -n, ip(8) and CAP_SYS_ADMIN")
def test_a_port_the_kernel_picks_inside_the_range_stops_the_start(serve_process: Any) -> None:
    """`--listen 127.0.0.1:0` on a host whose ephemeral ports are 30100-30355: the daemon refuses to start and names
    the flag, the port and the way out. On 74c1f9f it started and listened on a port of the range (its start check
    read the flag's text, "0", only)."""
    with pytest.raises(RuntimeError, match=r"--listen 127\.0\.0\.1:0: its port 30[123]\d\d is in --collective-ports "
                       r"30100-30355.*ip_local_reserved_ports"):  # fmt: skip
        serve_process("--fake-gpus", "1", "--worker-network", "on", wrap=_EPHEMERAL_IN_RANGE)
