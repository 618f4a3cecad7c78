#!/usr/bin/env python3
"""Records Kafka request frames between real clients and a broker, for membrane's golden tests.

    capture.py LISTEN_PORT BROKER_HOST:PORT OUT_DIR PREFIX

Relays every connection to the broker unchanged and writes each request frame (length prefix
included) to OUT_DIR/PREFIX-NNN-k<api key>-v<version>.bin. The broker must advertise LISTEN_PORT so
that clients stay on the relay after bootstrap.
"""
import os, socket, struct, sys, threading

port, broker, out, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
host, bport = broker.rsplit(":", 1)
os.makedirs(out, exist_ok=True)
lock, counter = threading.Lock(), [0]

def read_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf

def client_to_broker(c, b):
    try:
        while True:
            prefix_bytes = read_exact(c, 4)
            body = read_exact(c, struct.unpack(">i", prefix_bytes)[0])
            key, version = struct.unpack(">hh", body[:4])
            with lock:
                counter[0] += 1
                n = counter[0]
            with open(os.path.join(out, f"{prefix}-{n:03d}-k{key}-v{version}.bin"), "wb") as f:
                f.write(prefix_bytes + body)
            b.sendall(prefix_bytes + body)
    except (EOFError, OSError):
        pass
    finally:
        for s in (c, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass

def broker_to_client(b, c):
    try:
        while True:
            data = b.recv(65536)
            if not data:
                break
            c.sendall(data)
    except OSError:
        pass

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(64)
while True:
    c, _ = srv.accept()
    b = socket.create_connection((host, int(bport)))
    threading.Thread(target=client_to_broker, args=(c, b), daemon=True).start()
    threading.Thread(target=broker_to_client, args=(b, c), daemon=True).start()
