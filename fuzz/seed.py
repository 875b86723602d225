#!/usr/bin/env python3
"""Seeds the fuzz corpora from real transfers: runs `pagewire recv` and `pagewire send` over
loopback through a recording proxy (plaintext, zstd, TLS) and cuts what crossed the wire into
seeds for each target. Usage: fuzz/seed.py PATH/TO/pagewire  (writes fuzz/corpus/<target>/)."""
import os, socket, subprocess, sys, tempfile, threading, time

PAGEWIRE = sys.argv[1]
HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def proxy(upstream):
    """Listens on loopback, forwards one connection to `upstream`, records both directions."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    rec = {"up": bytearray(), "down": bytearray()}

    def pump(src, dst, key):
        while True:
            try:
                b = src.recv(65536)
            except OSError:
                b = b""
            if not b:
                break
            rec[key] += b
            try:
                dst.sendall(b)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def serve():
        c, _ = lsock.accept()
        u = socket.create_connection(upstream)
        t = threading.Thread(target=pump, args=(u, c, "down"))
        t.start()
        pump(c, u, "up")
        t.join()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return lsock.getsockname(), rec, th


def transfer(extra_send, extra_recv, content_bytes):
    d = tempfile.mkdtemp()
    src = os.path.join(d, "src.img")
    with open(src, "wb") as f:
        f.write(content_bytes)
    recv = subprocess.Popen(
        [PAGEWIRE, "recv", "--listen", "127.0.0.1:0", "--size", str(len(content_bytes)), "--no-pin"] + extra_recv,
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    line = recv.stderr.readline()
    port = int(line.strip().rsplit(":", 1)[1])
    addr, rec, th = proxy(("127.0.0.1", port))
    subprocess.run([PAGEWIRE, "send", "--connect", f"127.0.0.1:{addr[1]}", "--from", src,
                    "--channels", "1", "--no-pin"] + extra_send, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recv.wait(timeout=30)
    th.join(timeout=10)
    return bytes(rec["up"]), bytes(rec["down"])


def save(target, name, data):
    os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
    with open(os.path.join(CORPUS, target, name), "wb") as f:
        f.write(data[:131072])


def main():
    pages = 16
    rnd = os.urandom(4096 * pages // 2)
    text = (b"pagewire moves guest memory; " * 1000)[: 4096 * pages // 4]
    content = rnd + bytes(4096 * pages // 4) + text
    up, down = transfer([], [], content)
    save("handshake", "hello", up[:64])
    save("receiver_stream", "plain", up[64:])
    save("frame_header", "first", up[64:64 + 32 + 12 * 8 + 8 * pages])
    save("run_validation", "first", bytes([0, pages, 0]) + up[64:64 + 32 + 12 * 8 + 8 * pages])
    save("control", "done", down[16:])
    up, down = transfer(["--compress", "zstd"], [], content)
    save("receiver_stream", "zstd", up[64:])
    # The compressed payload of the first frame, behind the fuzz target's codec byte.
    save("decompress", "zstd", bytes([0x80 | 0x08]) + up[64 + 32:])
    up, _ = transfer(["--compress", "zlib"], [], content)
    save("decompress", "zlib", bytes([0x81]) + up[64 + 32:])
    with tempfile.TemporaryDirectory() as pki:
        subprocess.run([PAGEWIRE, "certs", "--out", pki], check=True, stdout=subprocess.DEVNULL)
        up, _ = transfer(["--tls-dir", pki, "--tls-hostname", "localhost"], ["--tls-dir", pki], content)
        # From the first protected record on: what the record path reads after the handshake.
        at = next(i for i in range(len(up) - 2) if up[i:i + 3] == b"\x17\x03\x03")
        save("tls_records", "stream", up[at:])
    print("seeded", sorted(os.listdir(CORPUS)))


main()
