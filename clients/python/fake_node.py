"""A node for tests of client retries: it shakes hands, answers Locate with METADATA_EXCEPTION (so
clients send requests to it directly), and hangs up on every other request after noting its type
(one hex byte per line) in the log file. Prints "ready PORT" once it listens; runs until killed.

    python3 fake_node.py LOG
"""
import socket
import struct
import sys
import threading


def frame(t, rid, body):
    return struct.pack(">IBI", 5 + len(body), t, rid) + body


def serve(conn, log):
    buf = b""
    try:
        while True:
            while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            n = struct.unpack(">I", buf[:4])[0]
            f, buf = buf[4:4 + n], buf[4 + n:]
            t, rid = f[0], struct.unpack(">I", f[1:5])[0]
            if t == 0x01:
                version = struct.unpack(">H", f[9:11])[0]  # speaks the client's version
                conn.sendall(frame(0x81, rid, struct.pack(">HHHII", 0, 0, version, 16 << 20, 64)))
            elif t == 0x0E:
                msg = b"fake node: no metadata"
                conn.sendall(frame(0x8E, rid, struct.pack(">HH", 6, len(msg)) + msg))
            else:
                with open(log, "a") as out:
                    out.write("%02x\n" % t)
                return
    finally:
        conn.close()


def main():
    log = sys.argv[1]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    print("ready %d" % s.getsockname()[1], flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn, log), daemon=True).start()


if __name__ == "__main__":
    main()
