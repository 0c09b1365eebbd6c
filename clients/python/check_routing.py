"""Checks redirects, Locate and Cluster routing against two running nodes sharing one metadata store,
through shardfs_client.py. Exits non-zero on the first failure.

    python3 check_routing.py --other HOST:PORT --primary HOST:PORT --primary-node ID --shard N --owner C [--dead HOST:PORT]

--shard N lives on the node at --primary (node ID --primary-node); --other is another node;
--dead is an address where nothing listens any more.
"""
import argparse
import sys
import time

from shardfs_client import Client, Cluster, StatusError, Closed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--other", required=True)
    p.add_argument("--primary", required=True)
    p.add_argument("--primary-node", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--owner", required=True)
    p.add_argument("--dead")
    p.add_argument("--skip-live", action="store_true", help="only the --dead check (the primary is down)")
    a = p.parse_args()
    if not a.skip_live:
        check_live(a)
    if a.dead:
        check_dead(a)
    print("python routing check passed")


def check_live(a):
    host, port = a.other.rsplit(":", 1)

    # The other node redirects writes and reads of a shard it does not hold to its primary.
    b = Client(host=host, port=int(port))
    for call in (lambda: b.put(a.owner, a.shard, "direct", b"v"), lambda: b.get(a.shard, "direct")):
        try:
            call()
            raise AssertionError("the other node served a shard it does not hold")
        except StatusError as e:
            assert e.name == "NOT_SHARD_LEADER" and e.leader == a.primary, e
    loc = b.locate(a.shard)
    assert loc["primary"] == dict(node=a.primary_node, address=a.primary), loc
    assert loc["shard"] == a.shard and not loc["closed"] and loc["epoch"] >= 1 and loc["volume"], loc
    try:
        b.locate(2 ** 63)
        raise AssertionError("Locate of a shard that does not exist succeeded")
    except StatusError as e:
        assert e.name == "SHARD_NOT_FOUND", e
    b.close()

    # A cluster client given only the other node follows the redirect.
    c = Cluster([a.other], deadline=10)
    c.put(a.owner, a.shard, "py-1", b"one")
    assert c.known_primary(a.shard) == a.primary, c.known_primary(a.shard)
    assert c.get(a.shard, "py-1")["value"] == b"one"
    assert [code for code, _ in c.batch_put(a.owner, a.shard, [("py-2", b"two"), ("py-3", b"three")])] == [0, 0]
    items = c.batch_get(a.shard, ["py-1", "py-2", "nope"])
    assert [(pos, code) for pos, code, _, _ in items] == [(0, 0), (1, 0), (2, 4)], items
    rows, _ = c.list(a.shard)
    assert {b"py-1", b"py-2", b"py-3"} <= {k for k, _, _ in rows}, rows
    assert c.locate(a.shard)["primary"]["address"] == a.primary
    c.close()


def check_dead(a):
    # The first node is dead: the cluster client reaches the other within its deadline.
    started = time.monotonic()
    d = Cluster([a.dead, a.other], deadline=10)
    shard = d.new_shard("py-dead")
    d.put("py-dead", shard, "k", b"v")
    assert d.get(shard, "k")["value"] == b"v"
    assert d.known_primary(shard) == a.other, d.known_primary(shard)
    assert time.monotonic() - started < 10, time.monotonic() - started
    # A shard whose primary is dead: the call gives up at its deadline.
    short = Cluster([a.dead, a.other], deadline=2)
    started = time.monotonic()
    try:
        short.put(a.owner, a.shard, "k", b"v")
        raise AssertionError("a write to a dead primary succeeded")
    except (OSError, StatusError) as e:
        assert isinstance(e, OSError) or e.name == "NOT_SHARD_LEADER", e
    waited = time.monotonic() - started
    assert 1 <= waited < 8, waited
    d.close()
    short.close()


if __name__ == "__main__":
    try:
        main()
    except (AssertionError, StatusError, Closed, OSError) as e:
        print("FAILED:", repr(e), file=sys.stderr)
        sys.exit(1)
