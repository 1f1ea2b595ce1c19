"""What an admin's ListPool pays for status tokens (ops43: one minted for each host that is not down) beside a
tenant's ListPool of the same pool (none minted), and what each is handed: a real scheduler in this process,
plaintext with a credentials file (an admin's and a tenant's API token), N hosts registered (one device each); the
median of --rounds calls of the whole pool (every page, page size 5000) as each. An `--insecure` scheduler without a
credentials file answers every caller as the admin (opsrev43, docs/security.md).

    nice -n 5 .venv/bin/python bench/listpool_status_tokens.py --hosts 2000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from gpupool.scheduler.auth import credential_line
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer

from gpupool import tls, tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc

ADMIN, TENANT = (("authorization", "Bearer bench-admin"),), (("authorization", "Bearer bench-tenant"),)


def whole_pool(stub: scheduler_pb2_grpc.SchedulerStub, md: tuple[tuple[str, str], ...]) -> tuple[float, int, int]:
    """Seconds for every page of ListPool as `md`'s caller, the hosts listed and the status tokens handed."""
    start, token, hosts, minted = time.perf_counter(), "", 0, 0
    while True:
        page = stub.ListPool(scheduler_pb2.ListPoolRequest(page_token=token, page_size=5000), metadata=md)
        hosts += len(page.hosts)
        minted += sum(1 for h in page.hosts if h.status_token)
        token = page.next_page_token
        if not token:
            return time.perf_counter() - start, hosts, minted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    creds = Path(tempfile.mkdtemp()) / "credentials"
    creds.write_text(credential_line("admin", "ops", "bench-admin") + credential_line("tenant", "t", "bench-tenant"))
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0", tls=tls.TlsConfig(insecure=True),
        credentials=str(creds),
    )  # fmt: skip
    server = SchedulerServer(config, tokens.Signer.from_seed(b"bench-listpool")).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            for i in range(a.hosts):
                device = device_pb2.DeviceInfo(index=0, uuid=f"GPU-{i}", model="fake", memory_bytes=1 << 30)
                request = scheduler_pb2.RegisterRequest(host_id=f"h{i:05d}", address=f"127.0.0.1:{1024 + i}")
                request.devices.append(device)
                stub.Register(request, metadata=ADMIN)
            rows = {}
            for who, md in (("admin", ADMIN), ("tenant", TENANT)):
                runs = [whole_pool(stub, md) for _ in range(a.rounds)]
                rows[who] = (statistics.median(r[0] for r in runs) * 1e3, runs[0][1], runs[0][2])
    finally:
        server.stop(grace=0.5)
    print(f"ListPool of {a.hosts} hosts, median of {a.rounds}:")
    for who, (ms, hosts, minted) in rows.items():
        print(f"  {who:7s} {ms:8.1f} ms  {hosts} hosts, {minted} status tokens")
    extra = rows["admin"][0] - rows["tenant"][0]
    print(f"  admin / tenant {rows['admin'][0] / rows['tenant'][0]:.2f}x; {extra * 1e3 / a.hosts:.0f} us a host more")


if __name__ == "__main__":
    main()
