"""A small client of the ShardFS batch protocol, written from docs/PROTOCOL.md.

Synchronous. Client talks to one node; requests may be pipelined with
send()/frame() and matched by ID. Cluster talks to several nodes and sends each
request to its shard's primary (docs/PROTOCOL.md, "Client routing").
"""
import random
import socket
import struct
import time

OPS = dict(hello=0x01, put=0x02, get=0x03, delete=0x04, batch_put=0x05, batch_get=0x06, list=0x07,
           find=0x08, new_shard=0x09, close_shard=0x0A, delete_shard=0x0B, list_shards=0x0C, stat=0x0D, locate=0x0E)
ITEM, ERROR = 0x90, 0xFF
STATUS = ["OK", "CLIENT_ID_REQUIRED", "SHARD_NOT_FOUND", "SHARD_FENCED", "ENTRY_NOT_FOUND", "READ_EXCEPTION",
          "METADATA_EXCEPTION", "WRITE_EXCEPTION", "NO_NODE_AVAILABLE", "DEVICE_EXCEPTION", "NOT_SHARD_LEADER",
          "SHARD_CLOSED", "SHARD_FULL", "INVALID_KEY", "INVALID_INDEX", "INVALID_ARGUMENT", "SHARD_ID_TAKEN",
          "WRITE_TOO_LARGE", "FRAME_TOO_LARGE", "UNAUTHORISED", "INVALID_REQUEST", "UNSUPPORTED_VERSION",
          "TIMEOUT", "TOO_MANY_CONNECTIONS", "SHUTTING_DOWN"]


def status_name(code):
    return STATUS[code] if code < len(STATUS) else "STATUS_%d" % code


NOT_SHARD_LEADER = 10


class StatusError(Exception):
    """A non-OK answer. After NOT_SHARD_LEADER, `leader` is the primary's "host:port" ("" if unknown)."""

    def __init__(self, code, message, leader=""):
        text = "%s: %s" % (status_name(code), message)
        super().__init__(text + (" (the primary is at %s)" % leader if leader else ""))
        self.code, self.name, self.message, self.leader = code, status_name(code), message, leader


class Closed(Exception):
    pass


# Field encoders
def u16(n): return struct.pack(">H", n)
def u32(n): return struct.pack(">I", n)
def u64(n): return struct.pack(">Q", n)
def s(text): b = text.encode(); return u16(len(b)) + b
def blob(b): return u32(len(b)) + bytes(b)
def key(k): k = k.encode() if isinstance(k, str) else bytes(k); return u16(len(k)) + k
def indexes(pairs): return u16(len(pairs)) + b"".join(s(n) + blob(v) for n, v in pairs)
def after(k): return b"\x00" if k is None else b"\x01" + key(k)


class Reader:
    def __init__(self, data): self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise Closed("short frame")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self): return self.take(1)[0]
    def u16(self): return struct.unpack(">H", self.take(2))[0]
    def u32(self): return struct.unpack(">I", self.take(4))[0]
    def u64(self): return struct.unpack(">Q", self.take(8))[0]
    def i64(self): return struct.unpack(">q", self.take(8))[0]
    def str(self): return self.take(self.u16()).decode()
    def key(self): return self.take(self.u16())
    def blob(self): return self.take(self.u32())
    def status(self): return self.u16(), self.str()
    def indexes(self): return [(self.str(), self.blob()) for _ in range(self.u16())]
    def entry(self): return dict(value=self.blob(), indexes=self.indexes(), mtime=self.i64())

    def node(self): return dict(node=self.str(), address=self.str())

    def location(self):
        out = dict(shard=self.u64(), volume=self.str(), epoch=self.u64(), closed=self.u8() == 1, primary=self.node())
        out["backups"] = [self.node() for _ in range(self.u16())]
        out["answered_by"] = self.str()
        return out

    def failure(self, code, msg):
        """The StatusError for a non-OK status just read (NOT_SHARD_LEADER is followed by the leader's address)."""
        return StatusError(code, msg, self.str() if code == NOT_SHARD_LEADER else "")

    def shard(self):
        info = dict(id=self.u64(), owner=self.str(), closed=self.u8() == 1, volume=self.str(), primary=self.str())
        if self.u8():
            info.update(entries=self.u64(), used=self.u64(), limit=self.u64())
        return info


def tls_context(ca=None, cert=None, key=None):
    """A client TLS context for TCP nodes: trusting `ca` (a PEM file; None: the
    system's CAs), presenting `cert`/`key` to nodes that ask (mutual TLS)."""
    import ssl
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        context.load_cert_chain(cert, key)
    return context


class Client:
    def __init__(self, unix=None, host=None, port=None, token="", timeout=30, connect_timeout=None, tls=None):
        """`tls`: an ssl.SSLContext (see tls_context) for TCP; a Unix socket is always plain."""
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(unix)
        else:
            self.sock = socket.create_connection((host, port), timeout=connect_timeout or timeout)
            if tls is not None:
                self.sock = tls.wrap_socket(self.sock, server_hostname=host)
        self.sock.settimeout(timeout)
        self.next_id = 1
        self.buf = b""
        # Version 2: CloseShard and DeleteShard name the owner's client ID.
        self.send(OPS["hello"], b"SHFS" + u16(2) + s(token), rid=0)
        t, rid, r = self.frame()
        if t == ERROR:
            code, msg = r.status()
            raise StatusError(code, msg)
        code, msg = r.status()
        self.version, self.max_frame, self.max_in_flight = r.u16(), r.u32(), r.u32()

    def close(self): self.sock.close()

    def send(self, op, body, rid=None):
        if rid is None:
            rid, self.next_id = self.next_id, self.next_id + 1
        self.sock.sendall(u32(5 + len(body)) + bytes([op]) + u32(rid) + body)
        return rid

    def frame(self):
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    f, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return f[0], struct.unpack(">I", f[1:5])[0], Reader(f[5:])
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed("connection closed")
            self.buf += chunk

    def call(self, op, body):
        """Sends one request and returns a Reader positioned after an OK status."""
        rid = self.send(op, body)
        t, got, r = self.frame()
        code, msg = r.status()
        if t == ERROR:
            raise Closed("%s: %s" % (status_name(code), msg))
        assert got == rid and t == op | 0x80, "answer to %d (type %x) for %d" % (got, t, rid)
        if code != 0:
            raise r.failure(code, msg)
        return r

    def put(self, client, shard, k, value, idx=()):
        self.call(OPS["put"], s(client) + u64(shard) + key(k) + blob(value) + indexes(list(idx)))

    def get(self, shard, k):
        return self.call(OPS["get"], u64(shard) + key(k)).entry()

    def delete(self, client, shard, k):
        self.call(OPS["delete"], s(client) + u64(shard) + key(k))

    def batch_put(self, client, shard, items):
        body = s(client) + u64(shard) + u32(len(items))
        body += b"".join(key(k) + blob(v) + indexes([]) for k, v in items)
        r = self.call(OPS["batch_put"], body)
        return [r.status() for _ in range(r.u32())]

    def batch_get(self, shard, keys):
        """Yields (position, status code, message, entry or None) as items stream in."""
        rid = self.send(OPS["batch_get"], u64(shard) + u32(len(keys)) + b"".join(key(k) for k in keys))
        while True:
            t, got, r = self.frame()
            assert got == rid
            if t == ITEM:
                pos = r.u32()
                code, msg = r.status()
                yield pos, code, msg, (r.entry() if code == 0 else None)
            else:
                code, msg = r.status()
                if code != 0:
                    raise r.failure(code, msg)
                assert r.u32() == len(keys)
                return

    def list(self, shard, after_key=None, limit=0):
        r = self.call(OPS["list"], u64(shard) + after(after_key) + u32(limit))
        rows = [(r.key(), r.u64(), r.i64()) for _ in range(r.u32())]
        return rows, r.u8() == 1

    def find(self, shard, name, value, after_key=None, limit=0):
        r = self.call(OPS["find"], u64(shard) + s(name) + blob(value) + after(after_key) + u32(limit))
        keys = [r.key() for _ in range(r.u32())]
        return keys, r.u8() == 1

    def new_shard(self, owner, shard_id=0, size_limit=0):
        return self.call(OPS["new_shard"], s(owner) + u64(shard_id) + u64(size_limit)).u64()

    def close_shard(self, client, shard): self.call(OPS["close_shard"], s(client) + u64(shard))
    def delete_shard(self, client, shard): self.call(OPS["delete_shard"], s(client) + u64(shard))

    def list_shards(self):
        r = self.call(OPS["list_shards"], b"")
        return [r.shard() for _ in range(r.u32())]

    def stat(self, shard): return self.call(OPS["stat"], u64(shard)).shard()

    def locate(self, shard):
        """Where a shard is served: dict(shard, volume, epoch, closed, primary, backups, answered_by),
        nodes as dict(node, address)."""
        return self.call(OPS["locate"], u64(shard)).location()


class Cluster:
    """A client of several nodes that sends each request to its shard's primary.

    nodes: "host:port" strings or Unix socket paths (anything with a "/"). The
    primary is learnt from Locate or a NOT_SHARD_LEADER redirect; a node that is
    down, or a redirect with no address, makes the call try the other nodes and
    ask again, with backoff, until `deadline` seconds have passed. After a
    connection broke mid-request only calls that are harmless to repeat are
    retried: reads, locate, close_shard, put and batch_put (a repeated put
    overwrites with the same value; docs/PROTOCOL.md). delete, delete_shard and
    new_shard then raise Closed: whether they were applied is unknown.
    """

    def __init__(self, nodes, token="", deadline=30.0, max_redirects=4, connect_timeout=5.0, tls=None):
        if not nodes:
            raise ValueError("no node to connect to")
        self.nodes, self.token, self.deadline, self.tls = list(nodes), token, deadline, tls
        self.max_redirects, self.connect_timeout = max_redirects, connect_timeout
        self.conns, self.primaries, self.node_at, self.preferred = {}, {}, {}, 0

    def close(self):
        for c in self.conns.values():
            c.close()
        self.conns = {}

    def _connect(self, node):
        c = self.conns.get(node)
        if c is None:
            if "/" in node:
                c = Client(unix=node, token=self.token)
            else:
                host, port = node.rsplit(":", 1)
                c = Client(host=host.strip("[]"), port=int(port), token=self.token, connect_timeout=self.connect_timeout,
                           tls=self.tls)
            self.conns[node] = c
        return c

    def _drop(self, node):
        c = self.conns.pop(node, None)
        if c is not None:
            c.close()

    def _failed(self, node):
        self._drop(node)
        self.primaries = {k: v for k, v in self.primaries.items() if v != node}
        self.node_at = {k: v for k, v in self.node_at.items() if v != node}
        if node in self.nodes and self.nodes.index(node) == self.preferred:
            self.preferred = (self.preferred + 1) % len(self.nodes)

    def _rotation(self):
        return self.nodes[self.preferred:] + self.nodes[:self.preferred]

    def _locate_primary(self, shard):
        last = None
        for node in self._rotation():
            try:
                loc = self._connect(node).locate(shard)
            except StatusError as e:
                if e.name == "SHARD_NOT_FOUND":
                    raise
                return None
            except (OSError, Closed) as e:
                self._failed(node)
                last = e
                continue
            self.preferred = self.nodes.index(node)
            if loc["answered_by"]:
                self.node_at[loc["answered_by"]] = node
            primary = loc["primary"]
            if not primary["node"]:
                return None
            if primary["node"] == loc["answered_by"]:
                return node
            return self.node_at.get(primary["node"]) or primary["address"] or None
        raise _Retry(last or Closed("no node answered"))

    def _attempt(self, shard, writes, idempotent, next_node_on, fn):
        target = None
        if shard is not None:
            target = self.primaries.get(shard) or self._locate_primary(shard)
        proven = target is not None
        candidates, redirects, last = self._rotation(), 0, None
        while True:
            if target is not None:
                node = target
            elif candidates:
                node = candidates.pop(0)
            else:
                raise _Retry(last)
            try:
                c = self._connect(node)
            except (OSError, Closed, StatusError) as e:
                self._failed(node)
                if target is None:
                    last = e
                    continue
                raise _Retry(e)
            try:
                result = fn(c)
            except StatusError as e:
                if e.name == "NOT_SHARD_LEADER":
                    self.primaries.pop(shard, None)
                    if e.leader and redirects < self.max_redirects:
                        redirects, target, proven = redirects + 1, e.leader, True
                        continue
                    last = e
                    if target is None and candidates and not e.leader:
                        continue
                    raise _Retry(e)
                if e.name in next_node_on:
                    last = e
                    if target is None and candidates:
                        continue
                    raise _Retry(e)
                raise
            except (OSError, Closed) as e:
                self._failed(node)
                if not idempotent:
                    raise Closed("%s: the request may or may not have been applied; not retried" % e)
                raise _Retry(e)
            if node in self.nodes:
                self.preferred = self.nodes.index(node)
            if shard is not None and (proven or writes):
                self.primaries[shard] = node
            return result

    def _call(self, fn, shard=None, writes=False, idempotent=True, next_node_on=()):
        end = time.monotonic() + self.deadline
        backoff = 0.05
        while True:
            try:
                return self._attempt(shard, writes, idempotent, next_node_on, fn)
            except _Retry as r:
                pause = backoff * random.uniform(0.5, 1.0)
                if time.monotonic() + pause >= end:
                    raise r.error
                time.sleep(pause)
                backoff = min(backoff * 2, 1.0)

    def known_primary(self, shard):
        return self.primaries.get(shard)

    def put(self, client, shard, k, value, idx=()):
        self._call(lambda c: c.put(client, shard, k, value, idx), shard, writes=True)

    def get(self, shard, k):
        return self._call(lambda c: c.get(shard, k), shard)

    def delete(self, client, shard, k):
        self._call(lambda c: c.delete(client, shard, k), shard, writes=True, idempotent=False)

    def batch_put(self, client, shard, items):
        return self._call(lambda c: c.batch_put(client, shard, items), shard, writes=True)

    def batch_get(self, shard, keys):
        """The items as a list (retried whole, like any read)."""
        return self._call(lambda c: list(c.batch_get(shard, keys)), shard)

    def list(self, shard, after_key=None, limit=0):
        return self._call(lambda c: c.list(shard, after_key, limit), shard)

    def find(self, shard, name, value, after_key=None, limit=0):
        return self._call(lambda c: c.find(shard, name, value, after_key, limit), shard)

    def new_shard(self, owner, shard_id=0, size_limit=0):
        made = {}

        def create(c):
            made["id"] = c.new_shard(owner, shard_id, size_limit)
            made["node"] = next(n for n, conn in self.conns.items() if conn is c)
            return made["id"]
        shard = self._call(create, idempotent=False, next_node_on=("NO_NODE_AVAILABLE", "NOT_SHARD_LEADER"))
        self.primaries[shard] = made["node"]
        return shard

    def close_shard(self, client, shard):
        self._call(lambda c: c.close_shard(client, shard), shard, writes=True)

    def delete_shard(self, client, shard):
        self._call(lambda c: c.delete_shard(client, shard), shard, writes=True, idempotent=False)
        self.primaries.pop(shard, None)

    def list_shards(self):
        return self._call(lambda c: c.list_shards())

    def stat(self, shard):
        return self._call(lambda c: c.stat(shard), shard)

    def locate(self, shard):
        return self._call(lambda c: c.locate(shard))


class _Retry(Exception):
    """Something a later attempt may overcome."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error if error is not None else Closed("no node to try")
