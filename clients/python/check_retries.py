"""Checks which requests Cluster retries after a broken connection, against fake_node.py (LOG is the
file it notes requests in; what is there already is not counted).
Exits non-zero on the first failure.

    python3 check_retries.py --node 127.0.0.1:PORT --log LOG
"""
import argparse
import sys

from shardfs_client import Cluster, Closed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--node", required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args()

    def sent(op):
        try:
            with open(a.log) as f:
                return sum(1 for line in f if line.strip() == op)
        except FileNotFoundError:
            return 0

    c = Cluster([a.node], deadline=1.0)
    for name, call, op, retried in [
        ("put", lambda: c.put("o", 1, "k", b"v"), "02", True),
        ("batch_put", lambda: c.batch_put("o", 1, [("k", b"v")]), "05", True),
        ("get", lambda: c.get(1, "k"), "03", True),
        ("close_shard", lambda: c.close_shard("o", 1), "0a", True),
        ("delete", lambda: c.delete("o", 1, "k"), "04", False),
        ("delete_shard", lambda: c.delete_shard("o", 1), "0b", False),
        ("new_shard", lambda: c.new_shard("o"), "09", False),
    ]:
        before = sent(op)
        try:
            call()
            raise AssertionError("%s succeeded against a node that hangs up" % name)
        except (Closed, OSError) as e:
            if not retried:
                assert "not retried" in str(e), (name, e)
        n = sent(op) - before
        assert (n >= 2) if retried else (n == 1), "%s was sent %d times" % (name, n)
    print("python retry check passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("FAILED:", e, file=sys.stderr)
        sys.exit(1)
