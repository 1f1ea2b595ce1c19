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


def test_push_out_never_takes_a_held_connection_and_turns_the_newcomer_away_instead() -> None:
    """(link56) Connections that vouched for themselves (rank 0's store front: a keyed hello) are held: a newcomer
    pushes out the oldest one not held, of its source or (full) of the busiest source with one, else is turned away
    (-1). And the caps grow with the group as the secure hub's (`grown_caps`)."""
    held = [True, False, True, False]
    assert push_out(["a", "a", "a", "a"], "a", per_source=4, total=8, held=held) == (1, True)
    assert push_out(["a", "a"], "a", per_source=2, total=8, held=[True, True]) == (-1, True)
    assert push_out(["a", "b", "b", "c"], "c", per_source=4, total=4, held=[False, True, True, False]) == (0, False)
    assert push_out(["a", "b"], "c", per_source=4, total=2, held=[True, True]) == (-1, False)
    assert push_out(["a", "a"], "a", per_source=2, total=8) == (0, True)  # (nothing held: as before)
    from gpupool.peers import grown_caps

    assert grown_caps(1, 8, 16, 32) == (8, 16) and grown_caps(12, 8, 16, 32) == (12, 24)
    assert grown_caps(1024, 8, 16, 32) == (32, 64) and grown_caps(31, 8, 32, 32) == (31, 78)
