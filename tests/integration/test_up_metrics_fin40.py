"""`gpupool up`'s metrics lines over HTTPS (round 40, fin40's review of met40): the pages it prints, and the curl line
with Prometheus' certificate, work as printed for a metrics port on another address than the gRPC ports' or on the
wildcard address. Until fin40 the servers' certificates named only the gRPC ports' hosts and loopback, and `up`
printed the wildcard host as the programs log it (https://0.0.0.0:PORT/metrics): with plain HTTP (before met40)
both worked; over HTTPS the name check failed (the certificate names neither 127.0.0.2 nor 0.0.0.0)."""

from __future__ import annotations

import re
import shlex
import ssl
import urllib.request
from pathlib import Path

import pytest
from scheduler_fixtures import Proc

pytestmark = pytest.mark.slow


def test_up_s_printed_metrics_pages_and_curl_line_scrape_with_the_name_checked(tmp_path: Path) -> None:
    up = Proc(
        ["up", "--fake-gpus", "1", "--fake-gpu-memory", "256MiB", "--scheduler-listen", "127.0.0.1:0",
         "--listen", "127.0.0.1:0", "--state", str(tmp_path / "state" / "scheduler.db"),
         "--scheduler-metrics-listen", "127.0.0.2:0", "--metrics-listen", "0.0.0.0:0"]
    )  # fmt: skip
    try:
        up.wait_for(r"export GPUPOOL_SCHEDULER=", timeout=180)
        pages = [up.wait_for(rf"^\s+{who}\s+\S+\s+metrics (\S+)").group(1) for who in ("scheduler", "daemon")]
        curl = shlex.split(up.wait_for(r"^\s+curl .*").group(0))
        flags = dict(zip(curl[1:-1:2], curl[2:-1:2], strict=True))
        assert pages[0].startswith("https://127.0.0.2:") and curl[-1] == pages[0], (pages, curl)
        context = ssl.create_default_context(cafile=flags["--cacert"])  # the host name checked, as curl does
        context.load_cert_chain(flags["--cert"], flags["--key"])
        for url, what in ((pages[0], "gpupool_lease_events_total"), (pages[1], "gpupool_device_info{")):
            with urllib.request.urlopen(url, timeout=30, context=context) as resp:
                assert what in resp.read().decode(), url
        assert re.fullmatch(r"https://127\.0\.0\.1:\d+/metrics", pages[1]), pages  # (e55d4f7: https://0.0.0.0:...)
    finally:
        up.stop()
