"""Round 42's red team (hostile42) through real daemons: an op's tensor list argument of thousands of entries (at
most `guards.MAX_TENSORS`, 65,536) was sized for the quota by its meta kernel, which for `_foreach_*`, `block_diag`,
`stack` and `cat` is torch's Python, element by element (~250-540 us each here): one small command (16,384 handles of
one zero-element tensor, ~80 KB) held the device's thread 4.4 s (`_foreach_neg`) and 9.3 s (`block_diag`), every
other session of the device waiting (load 10, process isolation), 65,536 about four times that; nothing in the cost
model (`--max-op-flops`) counted it. Now such lists are sized from their entries' layouts (server/sizing.py
`MetaSizer._per_element`, `_LONG_LISTS`): 0.55 s and 0.28 s for the same commands, and a `_foreach_` list of more
than `sizing.MAX_LIST_LAYOUTS` distinct layouts is refused (RESOURCE_EXHAUSTED). The tests count the elements the
meta kernels are run on (no timed assertion); what the ops compute and what the quota refuses is pinned beside.

And the side port on IPv6: bound as IPv4 whatever `--bulk-listen` said, it stopped a daemon given an IPv6 address at
its start; it now listens there and counts its strangers by their /64. And an out= op whose size the caches had
learned for another output's storage (layouts only) grew past the quota unchecked."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import sizing

from gpupool import errors

MiB = 1024**2
N = 4096  # entries of the hostile lists (past `_too_long`'s 256: the uncached path)


@pytest.fixture
def sized(monkeypatch: Any) -> list[int]:
    """The list entries each meta run of the sizer was given (a spy that calls through; in-process daemons)."""
    seen: list[int] = []
    real = sizing._meta_new_bytes

    def spy(op: Any, args: Any, kwargs: Any) -> int:
        seen.append(max([len(a) for a in [*args, *kwargs.values()] if isinstance(a, list | tuple)], default=0))
        return real(op, args, kwargs)

    monkeypatch.setattr(sizing, "_meta_new_bytes", spy)
    return seen


@pytest.mark.parametrize(
    "name", ["aten::block_diag.default", "aten::_foreach_neg.default", "aten::stack.default", "aten::cat.default"]
)
def test_a_long_tensor_list_is_sized_without_a_meta_run_per_entry(
    daemon_factory: Any, sized: list[int], name: str
) -> None:
    """One command whose list names one zero-element tensor N times: its sizing runs no meta kernel over the N
    entries (on ca5fb68 one meta run took all N: `sized` held N), and it computes what torch computes."""
    d = daemon_factory(isolation="thread")
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        x = Handle(s.upload(torch.ones(0)))
        s.sync()
        sized.clear()
        outs = s.call(name, [x] * N, outputs=N if "foreach" in name else 1)
        s.sync()
        assert max(sized, default=0) <= 1, f"a meta run over {max(sized)} list entries"
        want = getattr(torch.ops.aten, name.split("::")[1].split(".")[0]).default([torch.ones(0)] * N)
        want = want if isinstance(want, list) else [want]
        assert len(outs) == len(want)
        for h, w in [*zip(outs, want, strict=True)][:: max(1, len(outs) // 4)]:
            g = s.download(h)
            assert g.shape == w.shape and g.dtype == w.dtype


def test_a_foreach_list_of_too_many_distinct_layouts_is_refused(daemon_factory: Any) -> None:
    """A `_foreach_` list of more than MAX_LIST_LAYOUTS distinct shapes is RESOURCE_EXHAUSTED (each would take a
    meta run; on ca5fb68 all of them ran), and the session goes on; one within the bound computes as torch does."""
    d = daemon_factory(isolation="thread")
    limit = sizing.MAX_LIST_LAYOUTS
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        many = [torch.zeros(0, k) for k in range(limit + 1)]
        hs = [Handle(s.upload(t)) for t in many]
        s.sync()
        s.call("aten::_foreach_neg.default", hs, outputs=len(hs))
        with pytest.raises(errors.ResourceExhausted, match=f"more than {limit} distinct shapes"):
            s.sync()
        xs = [torch.arange(k % 7, dtype=torch.float32) + k for k in range(300)]
        hx = [Handle(s.upload(t)) for t in xs]
        outs = s.call("aten::_foreach_neg.default", hx, outputs=len(hx))
        for h, t in zip(outs, xs, strict=True):
            assert torch.equal(s.download(h), -t)


def test_long_lists_still_meet_the_quota(daemon_factory: Any) -> None:
    """Sized from their layouts, long lists are refused past the quota as before (pins what held on ca5fb68):
    block_diag of N one-element blocks (an N x N output), cat and stack of N 4 KiB tensors past a 4 MiB quota, a
    foreach over N tensors of two layouts, and an out= foreach whose outputs would grow; the session goes on."""
    d = daemon_factory(isolation="thread")
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=4 * MiB)) as s:
        one = Handle(s.upload(torch.ones(1)))
        k4 = Handle(s.upload(torch.ones(1024)))
        k2 = Handle(s.upload(torch.ones(512, dtype=torch.float64)))
        empties = [Handle(s.upload(torch.ones(0))) for _ in range(N)]
        s.sync()
        for name, args, kwargs in [
            ("aten::block_diag.default", ([one] * N,), {}),
            ("aten::cat.default", ([k4] * N,), {}),
            ("aten::stack.default", ([k4] * N,), {}),
            ("aten::_foreach_neg.default", ([k4, k2] * (N // 2),), {}),
            ("aten::_foreach_neg.out", ([k4] * N,), {"out": empties}),
        ]:
            s.call(name, *args, outputs=N if "foreach_neg.default" in name else 0 if ".out" in name else 1, **kwargs)
            with pytest.raises(errors.ResourceExhausted, match="quota"):
                s.sync()
        [h] = s.call("aten::block_diag.default", [one] * 300)
        assert torch.equal(s.download(h), torch.eye(300))


def _ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_an_ipv6_side_port_serves_and_counts_its_strangers_by_their_64(daemon_factory: Any, monkeypatch: Any) -> None:
    """`--listen [::1]:0 --bulk-listen [::1]:0`: the daemon starts (on ca5fb68 the side port was bound as IPv4, and
    the daemon stopped at its start: OSError, address family not supported), names itself in brackets, carries a
    session's frames and bulk bytes on its side socket, and counts a stranger's connection that sends no hello
    under its IPv6 /64 (`peers.source_key`, as the gRPC port's slow calls), so that one host's addresses are one
    source of `MAX_PENDING_PER_SOURCE` pending connections, not 2^64 of them."""
    d = daemon_factory(listen="[::1]:0", bulk_listen="[::1]:0")
    assert d.address.startswith("[::1]:")
    port = d.running.bulk.port
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1")
    with Session.attach(d.address, d.token()) as s:
        assert s._carrier is not None, "the session's frames should travel on its side socket"
        big = torch.arange(3 * MiB, dtype=torch.int32)
        assert torch.equal(s.download(s.upload(big)), big)
        with socket.create_connection(("::1", port)):
            deadline = time.monotonic() + 10
            while not d.running.bulk._pending and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [p.source for p in d.running.bulk._pending] == ["::/64"]


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_an_out_op_is_sized_by_its_outputs_storage_not_a_cached_layout(daemon_factory: Any, isolation: str) -> None:
    """An out= op's growth depends on its output's storage, which the sizer's cache and the verdict cache keyed
    by layout only: `neg.out` into an empty view of a 12 MiB tensor (room: grows nothing) taught them 0 bytes, and
    the same call into a fresh zero-element tensor then skipped the quota check, grew it 12 MiB past a 16 MiB quota
    and left it bound (on ca5fb68: refused only after the kernel, the session counted at 24 MiB and refusing even a
    1 MiB upload until it freed). Now it is refused before the kernel, and the session stays within its quota."""
    d = daemon_factory(isolation=isolation)
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        x = Handle(s.upload(torch.ones(3 * MiB)))  # 12 MiB
        [room] = s.call("aten::slice.Tensor", x, 0, 0, 0)
        s.call("aten::neg.out", x, out=Handle(room), outputs=0)
        s.sync()
        fresh = Handle(s.upload(torch.ones(0)))
        s.call("aten::neg.out", x, out=fresh, outputs=0)
        with pytest.raises(errors.ResourceExhausted, match="12582912 bytes requested"):
            s.sync()
        small = torch.arange(256 * 1024, dtype=torch.float32)  # 1 MiB
        assert torch.equal(s.download(s.upload(small)), small)
