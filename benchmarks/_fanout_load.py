"""Fan-out load side: N WebSocket clients that only read, counted and checked.

Plain non-blocking sockets and epoll, independent of every server under test (it reuses
_loadgen's connection engine and frame helpers).  Run as
``python benchmarks/_fanout_load.py --port P --clients N --messages M --size S``:

1. opens N connections (64 handshakes in flight), then prints ``OPEN <n>`` on stdout; the
   benchmark then tells the server to start (see bench_fanout.py);
2. reads every connection; message ``i`` must carry ``i`` in its first 8 payload bytes, and
   every client must get messages 0..M-1 in order.  Bytes are compared against the exact
   expected stream (header + payload of each message) with one comparison per read; any
   difference (a ping, a close, a gap) moves that connection to a frame parser;
3. prints one JSON line: delivered messages/s = reading clients x M / (time from the first
   byte received to the last message of the last client), per-client min/max counts, its own
   CPU and the server's (``--server-pid``);
4. keeps its connections open until its stdin closes, then exits (closing them).

``--stall``: one more connection (opened first, with a small SO_RCVBUF) is never read while
the others are.  When nothing arrives for ``--stall-timeout`` seconds
before the others are done, the server is blocked on the stalled client: the run ends and
reports how far the others got.  When the others are done, the stalled socket is drained and
parsed: how many messages it got, how many are missing, and whether a close frame came (and
its code).  A stalled client still open is pinged, and a pong within 3 s means it was kept
connected.  It counts as one of the N clients.

Every loop is bounded in time; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _loadgen import (
    OPEN,
    WS_ACCEPT,
    Engine,
    handshake_request,
    mask_bytes,
    own_cpu,
    proc_cpu_seconds,
    ws_header,
)

HOST = "127.0.0.1"
EPOLLIN = select.EPOLLIN
SEQ = 8  # bytes of sequence number at the start of every payload
FILLER = bytes(range(256))


def fanout_payload(i: int, size: int) -> bytes:
    """Message number i: i as 8 bytes big-endian, then a fixed pattern up to `size`."""
    if size < SEQ:
        raise ValueError(f"messages need at least {SEQ} bytes")
    fill = size - SEQ
    return i.to_bytes(SEQ, "big") + (FILLER * (fill // 256 + 1))[:fill]


def server_frame(payload: bytes) -> bytes:
    """One unmasked binary frame, as a server sends it."""
    return ws_header(2, len(payload), False) + payload


class Client:
    __slots__ = (
        "close_code",
        "count",
        "done",
        "eof",
        "errors",
        "fast",
        "last",
        "missing",
        "off",
        "pend",
        "pongs",
        "sock",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fast = True  # still matching the expected byte stream exactly
        self.off = 0  # bytes matched so far (fast path)
        self.pend = bytearray()  # unparsed bytes (frame parser)
        self.count = 0  # data messages received (frame parser)
        self.last = -1  # last sequence number received (frame parser)
        self.missing = 0  # sequence numbers skipped (frame parser)
        self.done = False
        self.eof = False
        self.close_code: int | None = None
        self.pongs = 0
        self.errors: list[str] = []

    def received(self, frame_len: int) -> int:
        return self.off // frame_len if self.fast else self.count

    def to_parser(self, expected: bytes, frame_len: int) -> None:
        """Leave the fast path: hand the matched partial frame to the frame parser."""
        k, r = divmod(self.off, frame_len)
        self.fast = False
        self.count = k
        self.last = k - 1
        self.pend = bytearray(expected[k * frame_len : k * frame_len + r])

    def parse(self, data: bytes | memoryview, messages: int) -> None:
        """Frame parser: data frames are counted and their order checked."""
        self.pend += data
        buf = self.pend
        i = 0
        n = len(buf)
        while n - i >= 2:
            b0, b1 = buf[i], buf[i + 1]
            if b1 & 0x80:
                self.errors.append("server sent a masked frame")
                self.done = True
                break
            l7 = b1 & 0x7F
            hl = 2 if l7 < 126 else (4 if l7 == 126 else 10)
            if n - i < hl:
                break
            plen = l7 if l7 < 126 else int.from_bytes(buf[i + 2 : i + hl], "big")
            if n - i < hl + plen:
                break
            payload = bytes(buf[i + hl : i + hl + plen])
            i += hl + plen
            op = b0 & 0x0F
            if not b0 & 0x80:
                self.errors.append("fragmented message")
            if op in (1, 2):
                seq = int.from_bytes(payload[:SEQ], "big")
                if seq <= self.last:
                    self.errors.append(f"message {seq} after {self.last}")
                else:
                    self.missing += seq - self.last - 1
                self.last = seq
                self.count += 1
                if seq == messages - 1:
                    self.done = True
            elif op == 9:  # ping: answer (keep-alives; not expected in a short run)
                try:
                    self.sock.send(ws_header(10, len(payload), True) + mask_bytes(payload))
                except OSError:
                    pass
            elif op == 10:
                self.pongs += 1
            elif op == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                try:
                    self.sock.send(ws_header(8, 2, True) + mask_bytes(payload[:2] or b"\x03\xe8"))
                except OSError:
                    pass
                self.done = True
                break
            else:
                self.errors.append(f"unexpected opcode {op}")
        del buf[:i]


def open_stalled(port: int, rcvbuf: int) -> Client:
    """The client that stops reading: small receive buffer, blocking handshake."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    s.settimeout(10)
    s.connect((HOST, port))
    s.sendall(handshake_request(port))
    head = b""
    while b"\r\n\r\n" not in head:
        data = s.recv(1)  # byte by byte: nothing after the head is consumed
        if not data:
            raise OSError("EOF during the stalled client's handshake")
        head += data
    if not head.lower().startswith(b"http/1.1 101") or WS_ACCEPT.lower() not in head.lower():
        raise OSError(f"stalled client's handshake refused: {head[:60]!r}")
    s.setblocking(False)
    return Client(s)


def drain_stalled(c: Client, messages: int, frame_len: int, expected: bytes) -> dict:
    """Read everything the stalled client was sent; ping it if it is still open."""
    c.to_parser(expected, frame_len)
    s = c.sock
    s.settimeout(1.0)
    deadline = time.monotonic() + 15
    while c.close_code is None and not c.eof and time.monotonic() < deadline:
        try:
            data = s.recv(1 << 20)
        except TimeoutError:
            break  # quiet for 1 s: everything queued for it has arrived
        except OSError as exc:
            c.errors.append(f"stalled: {exc}")
            c.eof = True
            break
        if not data:
            c.eof = True
            break
        c.parse(data, messages)
    alive = None
    if c.close_code is None and not c.eof:
        try:
            s.sendall(ws_header(9, 5, True) + mask_bytes(b"alive"))
            until = time.monotonic() + 3
            while not c.pongs and c.close_code is None and time.monotonic() < until:
                data = s.recv(65536)
                if not data:
                    c.eof = True
                    break
                c.parse(data, messages)
            alive = c.pongs > 0
        except OSError:
            alive = False
    return {
        "drained": True,
        "received": c.count,
        "last_seq": c.last,
        "missing": c.missing,
        "close_code": c.close_code,
        "eof": c.eof,
        "answered_ping": alive,
        "errors": c.errors[:3],
    }


def run(a: argparse.Namespace, keep: list[socket.socket]) -> dict:
    """The whole run; every socket opened is put in `keep` (closing them is the caller's)."""
    frame_len = len(server_frame(fanout_payload(0, a.size)))
    expected = b"".join(server_frame(fanout_payload(i, a.size)) for i in range(a.messages))
    total = len(expected)

    stalled: Client | None = None
    if a.stall:
        stalled = open_stalled(a.port, a.stall_rcvbuf)
        keep.append(stalled.sock)
    want = a.clients - (1 if stalled else 0)
    eng = Engine(a.port, "ws")
    opened = eng.open_many(want, 64, timeout=60)
    keep.extend(c.sock for c in opened)
    if len(opened) < want or any(c.state != OPEN for c in opened):
        return {"error": f"opened {len(opened)}/{want}: {eng.errors[:3]}"}
    clients: dict[int, Client] = {}
    ep = select.epoll()
    for c in opened:
        eng.detach(c)
        cl = Client(c.sock)
        clients[c.fd] = cl
        ep.register(c.fd, EPOLLIN)
    sys.stdout.write(f"OPEN {a.clients}\n")
    sys.stdout.flush()

    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    left = len(clients)
    poll = ep.poll
    clock = time.perf_counter
    t_first = t_last = None
    last_progress = clock()
    # Nothing may take longer than this, whatever the server does.
    t_hard = clock() + a.timeout
    cpu0 = own_cpu()
    scpu0 = proc_cpu_seconds(a.server_pid) if a.server_pid else 0.0
    blocked = False
    while left:
        events = poll(0.05)
        now = clock()
        if not events:
            if t_first is not None and now - last_progress > a.stall_timeout:
                blocked = True
                break
            if t_first is None and now - last_progress > 30:
                break  # the server never started
            if now > t_hard:
                break
            continue
        if t_first is None:
            t_first = now
        last_progress = now
        for fd, _ev in events:
            c = clients[fd]
            try:
                n = c.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError as exc:
                c.errors.append(str(exc))
                n = 0
            if n == 0:
                c.eof = True
                ep.unregister(fd)
                if not c.done:
                    c.done = True
                    c.errors.append("EOF before the last message")
                    left -= 1
                continue
            if c.fast:
                off = c.off
                end = off + n
                if end <= total and buf[:n] == expected[off:end]:
                    c.off = end
                    if end == total:
                        c.done = True
                        left -= 1
                        t_last = clock()
                    continue
                c.to_parser(expected, frame_len)
            was_done = c.done
            c.parse(mv[:n], a.messages)
            if c.done and not was_done:
                left -= 1
                t_last = clock()
        if now > t_hard:
            break
    t_end = clock()
    cpu1 = own_cpu()
    scpu1 = proc_cpu_seconds(a.server_pid) if a.server_pid else 0.0

    counts = [c.received(frame_len) for c in clients.values()]
    complete = sum(
        1
        for c in clients.values()
        if c.received(frame_len) == a.messages and not c.errors and c.close_code is None
    )
    errors = [e for c in clients.values() for e in c.errors][:5]
    delivered = sum(counts)
    res: dict = {
        "clients": a.clients,
        "reading_clients": len(clients),
        "messages": a.messages,
        "size": a.size,
        "delivered": delivered,
        "expected": len(clients) * a.messages,
        "complete_clients": complete,
        "min_per_client": min(counts) if counts else 0,
        "max_per_client": max(counts) if counts else 0,
        "in_order": not errors,
        "errors": errors,
        "blocked": blocked or bool(left),
    }
    if t_first is not None:
        # a blocked run: up to the last byte that arrived, not the wait after it
        span_end = t_last if not left and t_last is not None else last_progress
        span = span_end - t_first
        res["seconds"] = span
        res["msg_per_s"] = delivered / span if span > 0 and not left else None
        res["msg_per_s_partial"] = delivered / span if span > 0 else None
        busy = t_end - t_first
        res["client_cpu"] = (cpu1 - cpu0) / busy if busy > 0 else None
        if a.server_pid:
            res["server_cpu"] = (scpu1 - scpu0) / busy if busy > 0 else None
            res["server_us_per_msg"] = (scpu1 - scpu0) / delivered * 1e6 if delivered else None
    else:
        res["error"] = "no data arrived within 30 s"
    if left and not blocked:
        res["error"] = f"{left} clients unfinished after {a.timeout:g} s"
    if blocked:
        res["no_progress_for"] = a.stall_timeout
    if stalled is not None:
        if res["blocked"]:
            # Reading it now would unblock the server: what it would then get says nothing.
            res["stalled"] = {"drained": False}
        else:
            res["stalled"] = drain_stalled(stalled, a.messages, frame_len, expected)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--stall", action="store_true", help="one client never reads")
    p.add_argument("--stall-rcvbuf", type=int, default=4096)
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=3.0,
        help="give up when no reading client got anything for this long",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="hard limit for the receive phase")
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("--cpu", type=int, default=None)
    a = p.parse_args()
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, a.clients + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    keep: list[socket.socket] = []
    res = run(a, keep)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    # Keep every connection open until told (stdin closed): a server blocked on the
    # stalled client must still be blocked when the benchmark asks it how far it got.
    sys.stdin.read()
    for s in keep:
        s.close()


if __name__ == "__main__":
    main()
