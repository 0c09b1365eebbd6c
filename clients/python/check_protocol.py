"""Exercises every operation, and the status codes a client can provoke, of a running server through
shardfs_client.py. Exits non-zero on the first failure.

    python3 check_protocol.py --socket PATH [--tcp HOST:PORT --token T]
"""
import argparse
import sys

from shardfs_client import Client, StatusError, Closed


def expect_status(name, fn, *args):
    try:
        fn(*args)
    except StatusError as e:
        assert e.name == name, "expected %s, got %s" % (name, e)
        return
    raise AssertionError("expected %s, got OK" % name)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--tcp")
    p.add_argument("--token", default="")
    a = p.parse_args()
    c = Client(unix=a.socket)
    assert c.version == 2

    shard = c.new_shard("py")
    expect_status("SHARD_ID_TAKEN", c.new_shard, "py", shard)
    expect_status("CLIENT_ID_REQUIRED", c.new_shard, "")
    expect_status("INVALID_ARGUMENT", c.new_shard, "py", 0, 1000)
    # A limit no volume can hold is refused before an ID is taken: the next shard is shard + 1.
    expect_status("INVALID_ARGUMENT", c.new_shard, "py", 0, 1 << 48)

    c.put("py", shard, "1", b"one", [("kind", b"odd")])
    e = c.get(shard, "1")
    assert e["value"] == b"one" and e["indexes"] == [("kind", b"odd")], e
    expect_status("ENTRY_NOT_FOUND", c.get, shard, "2")
    expect_status("SHARD_NOT_FOUND", c.get, 999999, "1")
    expect_status("SHARD_FENCED", c.put, "intruder", shard, "x", b"v")
    expect_status("CLIENT_ID_REQUIRED", c.put, "", shard, "x", b"v")
    expect_status("INVALID_KEY", c.put, "py", shard, "a/b", b"v")
    expect_status("INVALID_INDEX", c.put, "py", shard, "x", b"v", [("", b"v")])

    statuses = c.batch_put("py", shard, [("2", b"two"), ("..", b"bad"), ("3", b"three")])
    assert [code for code, _ in statuses] == [0, 13, 0], statuses

    items = list(c.batch_get(shard, ["1", "missing", "2", "3", "/"]))
    assert [(pos, code) for pos, code, _, _ in items] == [(0, 0), (1, 4), (2, 0), (3, 0), (4, 13)], items
    assert items[2][3]["value"] == b"two"
    try:
        list(c.batch_get(999999, ["1"]))
        raise AssertionError("batch_get of a missing shard succeeded")
    except StatusError as e:
        assert e.name == "SHARD_NOT_FOUND"

    rows, more = c.list(shard, limit=2)
    assert [k for k, _, _ in rows] == [b"1", b"2"] and more, rows
    rows, more = c.list(shard, after_key=b"2", limit=2)
    assert [k for k, _, _ in rows] == [b"3"] and not more, rows
    keys, more = c.find(shard, "kind", b"odd")
    assert keys == [b"1"] and not more, keys

    c.delete("py", shard, "3")
    expect_status("ENTRY_NOT_FOUND", c.delete, "py", shard, "3")

    info = c.stat(shard)
    assert info["owner"] == "py" and info["entries"] == 2 and not info["closed"], info
    assert any(s["id"] == shard for s in c.list_shards())

    # Closing and deleting are the owner's.
    expect_status("SHARD_FENCED", c.close_shard, "intruder", shard)
    expect_status("SHARD_FENCED", c.delete_shard, "intruder", shard)
    expect_status("CLIENT_ID_REQUIRED", c.delete_shard, "", shard)
    c.close_shard("py", shard)
    expect_status("SHARD_CLOSED", c.put, "py", shard, "4", b"v")
    assert c.stat(shard)["closed"]
    small = c.new_shard("py", 0, 256 * 1024)
    assert small == shard + 1, (shard, small)
    expect_status("SHARD_FULL", c.put, "py", small, "big", b"x" * (300 * 1024))
    c.delete_shard("py", shard)
    expect_status("SHARD_NOT_FOUND", c.stat, shard)

    if a.tcp:
        host, port = a.tcp.rsplit(":", 1)
        try:
            Client(host=host, port=int(port), token="wrong")
            raise AssertionError("a wrong token was accepted")
        except StatusError as e:
            assert e.name == "UNAUTHORISED", e
        t = Client(host=host, port=int(port), token=a.token)
        assert t.stat(small)["limit"] == 256 * 1024
        t.close()
    c.close()
    print("python protocol check passed")


if __name__ == "__main__":
    try:
        main()
    except (AssertionError, StatusError, Closed) as e:
        print("FAILED:", e, file=sys.stderr)
        sys.exit(1)
