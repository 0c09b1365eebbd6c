"""A small client of the ShardFS batch protocol, written from docs/PROTOCOL.md.

Synchronous; requests may be pipelined with send()/frame() and matched by ID.
"""
import socket
import struct

OPS = dict(hello=0x01, put=0x02, get=0x03, delete=0x04, batch_put=0x05, batch_get=0x06, list=0x07,
           find=0x08, new_shard=0x09, close_shard=0x0A, delete_shard=0x0B, list_shards=0x0C, stat=0x0D)
ITEM, ERROR = 0x90, 0xFF
STATUS = ["OK", "CLIENT_ID_REQUIRED", "SHARD_NOT_FOUND", "SHARD_FENCED", "ENTRY_NOT_FOUND", "READ_EXCEPTION",
          "METADATA_EXCEPTION", "WRITE_EXCEPTION", "NO_NODE_AVAILABLE", "DEVICE_EXCEPTION", "NOT_SHARD_LEADER",
          "SHARD_CLOSED", "SHARD_FULL", "INVALID_KEY", "INVALID_INDEX", "INVALID_ARGUMENT", "SHARD_ID_TAKEN",
          "WRITE_TOO_LARGE", "FRAME_TOO_LARGE", "UNAUTHORISED", "INVALID_REQUEST", "UNSUPPORTED_VERSION",
          "TIMEOUT", "TOO_MANY_CONNECTIONS", "SHUTTING_DOWN"]


def status_name(code):
    return STATUS[code] if code < len(STATUS) else "STATUS_%d" % code


class StatusError(Exception):
    def __init__(self, code, message):
        super().__init__("%s: %s" % (status_name(code), message))
        self.code, self.name, self.message = code, status_name(code), message


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

    def shard(self):
        info = dict(id=self.u64(), owner=self.str(), closed=self.u8() == 1, volume=self.str(), primary=self.str())
        if self.u8():
            info.update(entries=self.u64(), used=self.u64(), limit=self.u64())
        return info


class Client:
    def __init__(self, unix=None, host=None, port=None, token=""):
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(unix)
        else:
            self.sock = socket.create_connection((host, port))
        self.sock.settimeout(30)
        self.next_id = 1
        self.buf = b""
        self.send(OPS["hello"], b"SHFS" + u16(1) + s(token), rid=0)
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
            raise StatusError(code, msg)
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
                    raise StatusError(code, msg)
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

    def close_shard(self, shard): self.call(OPS["close_shard"], u64(shard))
    def delete_shard(self, shard): self.call(OPS["delete_shard"], u64(shard))

    def list_shards(self):
        r = self.call(OPS["list_shards"], b"")
        return [r.shard() for _ in range(r.u32())]

    def stat(self, shard): return self.call(OPS["stat"], u64(shard)).shard()
