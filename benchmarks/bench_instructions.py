"""Instructions per echoed message, counted by valgrind (callgrind): a figure that noise cannot move.

Wall-clock figures on a shared 2-core machine move by 20-50 % from run to run; an
instruction count does not. This runs an echo server (``_servers.py KIND``) under
``valgrind --tool=callgrind`` twice, once echoing ``--base`` messages and once ``--base``
plus ``--messages`` more, each sent by a plain blocking socket and awaited (ping-pong,
one connection), and reports the difference divided by ``--messages``: the server's
instructions per message, start-up and shutdown cancelled out.

Give ``--src`` once per tree to compare (the ``src/`` folder of a checkout, put first on
the server's PYTHONPATH): the first is the reference, the others get a ratio.

    .venv/bin/python benchmarks/bench_instructions.py --src /tmp/before/src --src src
    .venv/bin/python benchmarks/bench_instructions.py --kinds wsnursery --sizes 32

Needs valgrind (Debian's package). Each run takes about 10-30 s; everything talks to
127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
KEY = b"\x37\xfa\x21\x3d"


def masked_frame(payload: bytes) -> bytes:
    """One masked binary frame, as a client sends it."""
    n = len(payload)
    if n < 126:
        head = bytes([0x82, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x82, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))
    return head + KEY + masked


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(max(n - len(data), 65536))
        if not chunk:
            raise EOFError("server closed the connection")
        data += chunk
    return bytes(data)


def echo(port: int, count: int, size: int) -> None:
    """Upgrade, then send ``count`` messages of ``size`` bytes, each awaited; then close."""
    frame = masked_frame(b"x" * size)
    header_len = 2 + (2 if 126 <= size < 1 << 16 else 8 if size >= 1 << 16 else 0)
    with socket.create_connection((HOST, port), timeout=120) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101"), head
        for _ in range(count):
            sock.sendall(frame)
            recv_exactly(sock, header_len + size)
        sock.sendall(b"\x88\x82" + KEY + bytes(b ^ KEY[i] for i, b in enumerate(b"\x03\xe8")))
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def count_instructions(src: str, kind: str, count: int, size: int) -> int:
    """Total instructions of one server process that echoes ``count`` messages."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
        proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                str(HERE / "_servers.py"),
                kind,
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"the server did not start: {line!r}")
            echo(port, count, size)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = out.read_text()
        summary = re.search(r"^summary: (\d+)", text, re.MULTILINE) or re.search(
            r"^totals: (\d+)", text, re.MULTILINE
        )
        if summary is None:
            raise RuntimeError("no totals in the callgrind output")
        return int(summary.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", help="a src/ folder (repeat to compare)")
    parser.add_argument("--kinds", default="wsnursery,wsn-handler")
    parser.add_argument("--sizes", default="32,65536")
    parser.add_argument("--base", type=int, default=200, help="messages in the short run")
    parser.add_argument("--messages", type=int, default=2000, help="extra messages measured")
    args = parser.parse_args()
    sources = args.src or [str(HERE.parent / "src")]
    kinds = args.kinds.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[tuple[int, str, int], float] = {}
    started = time.monotonic()
    for kind in kinds:
        for size in sizes:
            for index, src in enumerate(sources):
                short = count_instructions(src, kind, args.base, size)
                long = count_instructions(src, kind, args.base + args.messages, size)
                results[index, kind, size] = (long - short) / args.messages
                print(
                    f"  {kind:12} {size:>7} B  [{index}] {src}: "
                    f"{results[index, kind, size]:,.0f} instr/msg",
                    file=sys.stderr,
                    flush=True,
                )
    print("\nServer instructions per echoed message (callgrind; lower is better)")
    names = [f"[{i}] {src}" for i, src in enumerate(sources)]
    for name in names:
        print(f"  {name}")
    header = f"  {'':20}" + "".join(f"{f'[{i}]':>14}" for i in range(len(sources)))
    header += "".join(f"{f'[{i}]/[0]':>10}" for i in range(1, len(sources)))
    print(header)
    for kind in kinds:
        for size in sizes:
            row = f"  {kind + ' ' + str(size) + ' B':20}"
            values = [results[index, kind, size] for index in range(len(sources))]
            row += "".join(f"{value:>14,.0f}" for value in values)
            row += "".join(f"{value / values[0]:>9.3f}x" for value in values[1:])
            print(row)
    print(f"total time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
