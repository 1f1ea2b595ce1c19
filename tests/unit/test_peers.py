"""gpupool/peers.py: the unit per-address limits count by."""

from __future__ import annotations

from gpupool.peers import grpc_source, push_out, source_key


def test_source_key_groups_ipv6_by_64_and_unmaps_ipv4() -> None:
    assert source_key("10.1.2.3") == "10.1.2.3"
    assert source_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::7") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("not-an-address") == "not-an-address"
    assert source_key("2001:db8:1:2::1", v6_prefix=128) == "2001:db8:1:2::1/128"
    assert source_key("::ffff:10.1.2.3", v6_prefix=128) == "10.1.2.3"


def test_grpc_source_reads_the_peer_strings_grpc_gives() -> None:
    assert grpc_source("ipv4:127.0.0.2:50123") == "127.0.0.2"
    assert grpc_source("ipv6:[::1]:50123") == "::/64"
    assert grpc_source("ipv6:%5B2001:db8::5%5D:443") == "2001:db8::/64"
    assert grpc_source("ipv6:[::ffff:10.0.0.7]:443") == "10.0.0.7"
    assert grpc_source("unix:/run/gpupool.sock") == "unix:/run/gpupool.sock"


def test_push_out_takes_the_own_sources_oldest_then_the_busiest_sources_oldest() -> None:
    assert push_out(["a", "b"], "a", per_source=3, total=4) is None  # under both caps: nobody
    assert push_out(["b", "a", "a", "a"], "a", per_source=3, total=8) == (1, True)  # its own oldest
    assert push_out(["c", "b", "b", "a"], "a", per_source=3, total=4) == (1, False)  # full: the busiest's oldest
