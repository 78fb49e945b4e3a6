"""Load generator: plain non-blocking sockets + epoll, independent of every server under test.

It does the WebSocket opening handshake itself, sends pre-masked binary frames (one fixed mask
key per run: servers never see a difference), and parses the server's unmasked frames
minimally (header + byte counting; the first echo on every connection is compared in full).
``--proto raw`` speaks the raw server's framing instead: a 4-byte big-endian length + payload.

Run as ``python benchmarks/_loadgen.py COMMAND --port P ...``; prints one JSON line.

Commands:

echo   N connections, each in ping-pong (send one message, wait for its echo, repeat) for
       --warmup then --duration seconds; messages/s, client and server CPU, RTT percentiles.
idle   open --conns handshaken idle connections (--concurrency at a time); server RSS before
       and after (from /proc/PID/status), and the handshake rate.
churn  open + handshake + close handshake, --concurrency at a time, for --duration s.

Every loop is bounded in time; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import json
import os
import resource
import select
import socket
import sys
import time
from array import array

HOST = "127.0.0.1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_KEY = base64.b64encode(b"wsnursery-bench!")  # 16 bytes, fixed: the server doesn't care
WS_ACCEPT = base64.b64encode(hashlib.sha1(WS_KEY + GUID).digest())
MASK = b"\x37\xfa\x21\x3d"

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP

# connection states
CONNECTING, HANDSHAKE, OPEN, CLOSING, DONE = range(5)


# --------------------------------------------------------------------------- frames


def mask_bytes(data: bytes, key: bytes = MASK) -> bytes:
    if not data:
        return b""
    n = len(data)
    rep = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(rep, "big")).to_bytes(n, "big")


def ws_header(opcode: int, length: int, masked: bool) -> bytes:
    b0 = 0x80 | opcode
    m = 0x80 if masked else 0
    if length < 126:
        h = bytes((b0, m | length))
    elif length < 65536:
        h = bytes((b0, m | 126)) + length.to_bytes(2, "big")
    else:
        h = bytes((b0, m | 127)) + length.to_bytes(8, "big")
    return h + MASK if masked else h


def make_payload(size: int) -> bytes:
    pattern = bytes(range(256))
    return (pattern * (size // 256 + 1))[:size]


def client_frame(proto: str, payload: bytes) -> bytes:
    """What the client sends for one message."""
    if proto == "raw":
        return len(payload).to_bytes(4, "big") + payload
    return ws_header(2, len(payload), True) + mask_bytes(payload)


def server_header(proto: str, size: int) -> bytes:
    """The header the server is expected to send before an echoed payload of `size`."""
    if proto == "raw":
        return size.to_bytes(4, "big")
    return ws_header(2, size, False)


CLOSE_FRAME = ws_header(8, 2, True) + mask_bytes((1000).to_bytes(2, "big"))


def handshake_request(port: int) -> bytes:
    return (
        f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class ProtocolError(Exception):
    pass


class Conn:
    __slots__ = (
        "cap",
        "ctrl",
        "fd",
        "fin",
        "hbuf",
        "opcode",
        "rbuf",
        "rem",
        "sock",
        "state",
        "t_open",
        "t_sent",
        "wview",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = CONNECTING
        self.rbuf = bytearray()  # handshake bytes
        self.hbuf = b""  # partial frame header
        self.rem = 0  # payload bytes left in the current frame
        self.fin = True
        self.opcode = 0
        self.ctrl: bytearray | None = None  # payload of a control frame being read
        self.cap: bytearray | None = None  # capture of a data message being verified
        self.t_sent = 0
        self.wview: memoryview | None = None  # unsent rest of a large frame
        self.t_open = 0.0


def feed(c: Conn, mv: memoryview, n: int, raw: bool) -> int:
    """Parse n received bytes; return the number of complete data messages. General path."""
    done = 0
    i = 0
    while i < n:
        rem = c.rem
        if rem:
            take = n - i if n - i < rem else rem
            if c.ctrl is not None:
                c.ctrl += mv[i : i + take]
            elif c.cap is not None:
                c.cap += mv[i : i + take]
            i += take
            rem -= take
            c.rem = rem
            if rem:
                break
            done += frame_end(c)
            continue
        # frame header
        old = c.hbuf
        h = old + bytes(mv[i : i + 14 - len(old)])
        if raw:
            hl = 4
            if len(h) < 4:
                c.hbuf = h
                break
            plen = int.from_bytes(h[:4], "big")
            c.opcode, c.fin = 2, True
        else:
            if len(h) < 2:
                c.hbuf = h
                break
            b0, b1 = h[0], h[1]
            if b1 & 0x80:
                raise ProtocolError("server sent a masked frame")
            l7 = b1 & 0x7F
            hl = 2 if l7 < 126 else (4 if l7 == 126 else 10)
            if len(h) < hl:
                c.hbuf = h
                break
            plen = l7 if l7 < 126 else int.from_bytes(h[2:hl], "big")
            c.opcode, c.fin = b0 & 0x0F, bool(b0 & 0x80)
            if c.opcode >= 8:
                c.ctrl = bytearray()
        i += hl - len(old)
        c.hbuf = b""
        c.rem = plen
        if plen == 0:
            done += frame_end(c)
    return done


def frame_end(c: Conn) -> int:
    op = c.opcode
    if op < 8:
        return 1 if c.fin else 0
    payload = bytes(c.ctrl or b"")
    c.ctrl = None
    if op == 9:  # ping -> pong (rare: keepalives), best effort
        try:
            c.sock.send(ws_header(10, len(payload), True) + mask_bytes(payload))
        except OSError:
            pass
    elif op == 8:
        raise ProtocolError(f"server closed the connection: {payload[:2].hex()} {payload[2:]!r}")
    return 0


# --------------------------------------------------------------------------- setup engine


class Engine:
    """Opens and closes connections with a bounded number in flight."""

    def __init__(self, port: int, proto: str) -> None:
        self.port = port
        self.proto = proto
        self.ep = select.epoll()
        self.fdmap: dict[int, Conn] = {}
        self.request = handshake_request(port) if proto == "ws" else b"\0\0\0\0"
        self.errors: list[str] = []
        self.closed = 0
        self.inflight = 0  # CONNECTING or HANDSHAKE
        self.closing = 0

    def start_connect(self) -> Conn:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(s)
        c.t_open = time.monotonic()
        err = s.connect_ex((HOST, self.port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.errors.append(f"connect: {os.strerror(err)}")
            c.state = DONE
            return c
        self.fdmap[c.fd] = c
        self.ep.register(c.fd, EPOLLOUT)
        self.inflight += 1
        return c

    def start_close(self, c: Conn) -> None:
        try:
            if self.proto == "ws":
                c.sock.send(CLOSE_FRAME)
            else:
                c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish(c)
            return
        c.state = CLOSING
        self.closing += 1
        if c.fd not in self.fdmap:
            self.fdmap[c.fd] = c
            self.ep.register(c.fd, EPOLLIN)
        else:
            self.ep.modify(c.fd, EPOLLIN)

    def _finish(self, c: Conn) -> None:
        if c.fd in self.fdmap:
            del self.fdmap[c.fd]
            try:
                self.ep.unregister(c.fd)
            except OSError:
                pass
        c.sock.close()
        if c.state == CLOSING:
            self.closed += 1
            self.closing -= 1
        elif c.state in (CONNECTING, HANDSHAKE):
            self.inflight -= 1
        c.state = DONE

    def detach(self, c: Conn) -> None:
        """Stop watching an open connection (the echo loop takes it over)."""
        del self.fdmap[c.fd]
        self.ep.unregister(c.fd)

    def step(self, timeout: float) -> list[Conn]:
        """Process one batch of events; return connections that became OPEN."""
        newly: list[Conn] = []
        for fd, _ev in self.ep.poll(timeout):
            c = self.fdmap.get(fd)
            if c is None:
                continue
            st = c.state
            try:
                if st == CONNECTING:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    c.sock.send(self.request)
                    c.state = HANDSHAKE
                    self.ep.modify(fd, EPOLLIN)
                elif st == HANDSHAKE:
                    data = c.sock.recv(65536)
                    if not data:
                        raise OSError("EOF during handshake")
                    c.rbuf += data
                    if self.proto == "raw":
                        if len(c.rbuf) >= 4:
                            if bytes(c.rbuf[:4]) != b"\0\0\0\0":
                                raise ProtocolError("bad raw hello")
                            c.state = OPEN
                            self.inflight -= 1
                            newly.append(c)
                    else:
                        end = c.rbuf.find(b"\r\n\r\n")
                        if end >= 0:
                            head = bytes(c.rbuf[:end]).lower()
                            if not head.startswith(b"http/1.1 101"):
                                raise ProtocolError(f"handshake refused: {head[:60]!r}")
                            if WS_ACCEPT.lower() not in head:
                                raise ProtocolError("bad Sec-WebSocket-Accept")
                            if b"sec-websocket-extensions" in head:
                                raise ProtocolError("server negotiated an extension")
                            if len(c.rbuf) > end + 4:
                                raise ProtocolError("data right after the handshake")
                            c.rbuf = bytearray()
                            c.state = OPEN
                            self.inflight -= 1
                            newly.append(c)
                elif st == CLOSING:
                    data = c.sock.recv(65536)
                    if not data:
                        self._finish(c)
                elif st == OPEN:
                    data = c.sock.recv(65536)
                    if not data:
                        raise OSError("server closed an idle connection")
                    # pings on idle connections are ignored (runs are far shorter than
                    # any keepalive timeout)
            except (OSError, ProtocolError) as exc:
                if st != CLOSING:
                    self.errors.append(f"{['connect', 'handshake', 'open', 'close'][st]}: {exc}")
                self._finish(c)
        return newly

    def open_many(self, n: int, concurrency: int, timeout: float) -> list[Conn]:
        deadline = time.monotonic() + timeout
        opened: list[Conn] = []
        started = 0
        while len(opened) < n and time.monotonic() < deadline:
            while self.inflight < concurrency and started < n:
                self.start_connect()
                started += 1
            opened.extend(self.step(0.05))
            if started >= n and self.inflight == 0:
                break
            if len(self.errors) > 50:
                break
        return opened

    def close_many(self, conns: list[Conn], timeout: float) -> int:
        """Closing handshake on all; wait (bounded) for the server to close. Returns #unclosed."""
        deadline = time.monotonic() + timeout
        for c in conns:
            if c.state == OPEN:
                self.start_close(c)
        while self.closing and time.monotonic() < deadline:
            self.step(0.05)
        left = 0
        for c in list(self.fdmap.values()):
            left += 1
            self._finish(c)
        return left


# --------------------------------------------------------------------------- /proc


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_minflt(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- echo


def cmd_echo(a: argparse.Namespace) -> dict:
    raw = a.proto == "raw"
    payload = make_payload(a.size)
    frame = client_frame(a.proto, payload)
    exp_hdr = server_header(a.proto, a.size)
    exp_total = len(exp_hdr) + a.size
    hl = len(exp_hdr)
    flen = len(frame)

    eng = Engine(a.port, a.proto)
    conns = eng.open_many(a.conns, min(a.conns, 64), timeout=20)
    if len(conns) < a.conns:
        return {"error": f"opened {len(conns)}/{a.conns}: {eng.errors[:3]}"}
    for c in conns:
        eng.detach(c)

    ep = select.epoll()
    fdmap = {}
    for c in conns:
        fdmap[c.fd] = c
        ep.register(c.fd, EPOLLIN)
        c.cap = bytearray()  # verify the first echo on every connection

    buf = bytearray(max(4 << 20, 2 * exp_total) if a.size >= 65536 else 1 << 16)
    mv = memoryview(buf)
    frame_mv = memoryview(frame)
    rtts = array("q")
    want_rtt = a.conns == 1
    perf = time.perf_counter_ns
    mono = time.monotonic

    verified = 0
    errors: list[str] = []
    count = 0
    measuring = False
    final = None
    t1 = cpu1 = scpu1 = 0.0

    def send_frame(c: Conn) -> None:
        c.t_sent = perf()
        try:
            sent = c.sock.send(frame)
        except BlockingIOError:
            sent = 0
        if sent < flen:
            c.wview = frame_mv[sent:]
            ep.modify(c.fd, EPOLLIN | EPOLLOUT)

    t_start = mono()
    t_warm = t_start + a.warmup
    t_end = t_warm + a.duration
    t_hard = t_end + 15.0
    for c in conns:
        send_frame(c)
    busy = len(conns)  # connections with a message in flight
    now = t_start
    t0 = cpu0 = scpu0 = 0.0
    flt0 = flt1 = 0
    poll = ep.poll
    try:
        while busy and now < t_hard:
            events = poll(0.2)
            now = mono()
            if not measuring and now >= t_warm and now < t_end:
                measuring = True
                count = 0
                rtts = array("q")
                t0 = now
                cpu0 = own_cpu()
                scpu0 = proc_cpu_seconds(a.server_pid) if a.server_pid else 0.0
                flt0 = proc_minflt(a.server_pid) if a.server_pid else 0
            sending = now < t_end
            if measuring and not sending:
                measuring = False
                t1 = now
                cpu1 = own_cpu()
                scpu1 = proc_cpu_seconds(a.server_pid) if a.server_pid else 0.0
                flt1 = proc_minflt(a.server_pid) if a.server_pid else 0
                final = count
            for fd, ev in events:
                c = fdmap[fd]
                if ev & EPOLLOUT and c.wview is not None:
                    try:
                        sent = c.sock.send(c.wview)
                    except BlockingIOError:
                        sent = 0
                    c.wview = c.wview[sent:] if sent < len(c.wview) else None
                    if c.wview is None:
                        ep.modify(fd, EPOLLIN)
                if not ev & (EPOLLIN | EPOLLERR):
                    continue
                try:
                    n = c.sock.recv_into(buf)
                except BlockingIOError:
                    continue
                if n == 0:
                    raise ProtocolError("server closed the connection mid-run")
                if (
                    n == exp_total
                    and c.rem == 0
                    and not c.hbuf
                    and c.cap is None
                    and mv[:hl] == exp_hdr
                ):
                    done = 1  # fast path: exactly one whole echo
                else:
                    done = feed(c, mv, n, raw)
                if done:
                    if done > 1:
                        raise ProtocolError("more echoes than messages sent")
                    if c.cap is not None:
                        if bytes(c.cap) != payload:
                            errors.append("echo differs from the message sent")
                        verified += 1
                        c.cap = None
                    if measuring:
                        count += 1
                        if want_rtt:
                            rtts.append(perf() - c.t_sent)
                    if sending:
                        send_frame(c)
                    else:
                        busy -= 1
    except (OSError, ProtocolError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    if final is None:
        return {"error": f"run did not finish: {errors[:3]}", "count": count}
    eng.close_many(conns, timeout=5)
    elapsed = t1 - t0
    res = {
        "count": final,
        "elapsed": elapsed,
        "msg_per_s": final / elapsed if elapsed > 0 else 0.0,
        "client_cpu": (cpu1 - cpu0) / elapsed if elapsed > 0 else 0.0,
        "verified": verified,
        "errors": errors[:5],
    }
    if a.server_pid:
        res["server_cpu"] = (scpu1 - scpu0) / elapsed if elapsed > 0 else 0.0
        res["server_us_per_msg"] = (scpu1 - scpu0) / final * 1e6 if final else None
        res["server_minflt_per_msg"] = (flt1 - flt0) / final if final else None
    if want_rtt and len(rtts):
        s = sorted(rtts)
        res["rtt_p50_us"] = s[len(s) // 2] / 1000
        res["rtt_p99_us"] = s[min(len(s) - 1, int(len(s) * 0.99))] / 1000
    return res


# --------------------------------------------------------------------------- idle / churn


def cmd_idle(a: argparse.Namespace) -> dict:
    eng = Engine(a.port, a.proto)
    # warm the server's code paths (imports, caches) before the baseline
    warm = eng.open_many(50, 16, timeout=10)
    eng.close_many(warm, timeout=5)
    time.sleep(0.5)
    rss0 = proc_rss_kib(a.server_pid)
    t0 = time.monotonic()
    conns = eng.open_many(a.conns, a.concurrency, timeout=60)
    t1 = time.monotonic()
    # let the server finish whatever follows the 101 (handler tasks start, etc.)
    time.sleep(a.settle)
    eng.step(0)
    rss1 = proc_rss_kib(a.server_pid)
    alive = sum(1 for c in conns if c.state == OPEN)
    left = eng.close_many(conns, timeout=15)
    res = {
        "conns": len(conns),
        "alive": alive,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_conn": (rss1 - rss0) / alive if alive else None,
        "handshake_s": t1 - t0,
        "handshakes_per_s": len(conns) / (t1 - t0) if t1 > t0 else None,
        "unclosed": left,
        "errors": eng.errors[:5],
    }
    if len(conns) < a.conns:
        res["error"] = f"opened {len(conns)}/{a.conns}"
    return res


def cmd_churn(a: argparse.Namespace) -> dict:
    eng = Engine(a.port, a.proto)
    t0 = time.monotonic()
    t_end = t0 + a.duration
    opened = 0
    cpu0 = own_cpu()
    scpu0 = proc_cpu_seconds(a.server_pid) if a.server_pid else 0.0
    now = t0
    while now < t_end:
        for _ in range(a.concurrency - eng.inflight):
            eng.start_connect()
        for c in eng.step(0.05):
            opened += 1
            eng.start_close(c)
        now = time.monotonic()
        if len(eng.errors) > 50:
            break
    elapsed = now - t0
    cpu1 = own_cpu()
    scpu1 = proc_cpu_seconds(a.server_pid) if a.server_pid else 0.0
    # let the handshakes in flight finish and close them properly (not counted)
    deadline = now + 10
    while (eng.inflight or eng.closing) and time.monotonic() < deadline:
        for c in eng.step(0.05):
            eng.start_close(c)
    left = eng.close_many(list(eng.fdmap.values()), timeout=5)
    return {
        "opened": opened,
        "elapsed": elapsed,
        "conns_per_s": opened / elapsed,
        "closed_cleanly": eng.closed,
        "unclosed": left,
        "client_cpu": (cpu1 - cpu0) / elapsed,
        "server_cpu": (scpu1 - scpu0) / elapsed if a.server_pid else None,
        "errors": eng.errors[:5],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=("echo", "idle", "churn"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--proto", choices=("ws", "raw"), default="ws")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("--cpu", type=int, default=None)
    a = p.parse_args()
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    res = {"echo": cmd_echo, "idle": cmd_idle, "churn": cmd_churn}[a.command](a)
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
