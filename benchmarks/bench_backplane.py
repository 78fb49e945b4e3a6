"""Cross-process fan-out through the Redis backplane, against one process.

Run from the repository root with the project's venv (needs ``redis-server``
and coredis, the ``redis`` extra)::

    .venv/bin/python benchmarks/bench_backplane.py               # ~1 min
    .venv/bin/python benchmarks/bench_backplane.py --messages 200 --json /tmp/bp.json

Three measurements:

single    one wsnursery process, ``--clients`` (1000) clients; it sends
          ``--messages`` binary messages with ``broadcaster.send_all``.
redis     a redis-server and two wsnursery processes with a RedisBackplane,
          half the clients on each; node A sends the same messages: A's
          clients get them directly, B's through Redis.
publish   in this process: what one ``send_all`` costs the sender when it only
          publishes (a broadcaster with no clients of its own, connected to
          Redis), counting the publisher task's share (each block of 1000
          sends is waited for until Redis has it all); and the cost of
          encoding the envelope alone.

Clients are ``_fanout_load.py`` processes (plain sockets and epoll, one per
node; message ``i`` carries ``i`` in its first 8 bytes and every client must get
0..M-1 in order). "end to end" is every client's messages divided by the time
from the first send to the moment the last load generator has its last
message. Every process runs on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _fanout_load import fanout_payload  # noqa: E402
from _loadgen import proc_cpu_seconds  # noqa: E402

HOST = "127.0.0.1"


# --------------------------------------------------------------------------- a node


def node_main(a: argparse.Namespace) -> None:
    """A server process: READY, then on GO (and all clients connected) send; DONE."""
    import resource

    import trio

    import wsnursery

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    class Quiet(wsnursery.WebSocketHandler):
        pass

    async def main() -> None:
        backplane = wsnursery.RedisBackplane(a.redis) if a.redis else None
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: wsnursery.serve_websocket(
                    Quiet(),
                    HOST,
                    0,
                    compression=False,
                    backplane=backplane,
                    backlog=4096,
                    max_connections=None,
                    task_status=task_status,
                )
            )
            print(f"READY {server.port} {os.getpid()}", flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(0))
            buffer = b""
            while b"GO\n" not in buffer:
                data = await stdin.receive_some(64)
                if not data:
                    return
                buffer += data
            with trio.fail_after(60):
                while len(server.connections) < a.clients:
                    await trio.sleep(0.01)
            result: dict[str, Any] = {"connections": len(server.connections)}
            if a.sender:
                messages = [fanout_payload(i, a.size) for i in range(a.messages)]
                totals = [0, 0, 0]
                send_all = server.broadcaster.send_all
                t0 = time.perf_counter()
                c0 = time.process_time()
                for message in messages:
                    report = await send_all(message)
                    totals[0] += report.delivered
                    totals[1] += report.dropped
                    totals[2] += report.closed
                result.update(
                    send_seconds=time.perf_counter() - t0,
                    send_cpu=time.process_time() - c0,
                    delivered=totals[0],
                    dropped=totals[1],
                    closed=totals[2],
                )
            print("DONE " + json.dumps(result), flush=True)
            while await stdin.receive_some(64):
                pass  # until stdin closes
            await server.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


# --------------------------------------------------------------------------- processes


class Proc:
    def __init__(self, args: list[str], name: str) -> None:
        self.name = name
        self.p = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def line(self, prefix: str, timeout: float = 60.0) -> str:
        """The next stdout line starting with ``prefix`` (bounded in time)."""
        import select

        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {prefix!r} line within {timeout} s")
            ready, _, _ = select.select([self.p.stdout], [], [], left)
            if not ready:
                continue
            text = self.p.stdout.readline()
            if not text:
                raise RuntimeError(f"{self.name} exited (status {self.p.wait()})")
            if text.startswith(prefix):
                return text[len(prefix) :].strip()

    def send(self, text: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text)
        self.p.stdin.flush()

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                assert self.p.stdin is not None
                self.p.stdin.close()
            except OSError:
                pass
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def node(a: argparse.Namespace, clients: int, sender: bool, redis: str | None, name: str) -> Proc:
    args = [sys.executable, __file__, "node", "--clients", str(clients)]
    args += ["--messages", str(a.messages), "--size", str(a.size)]
    if sender:
        args.append("--sender")
    if redis:
        args += ["--redis", redis]
    return Proc(args, name)


def loadgen(a: argparse.Namespace, port: int, clients: int, server_pid: int, name: str) -> Proc:
    args = [sys.executable, str(HERE / "_fanout_load.py"), "--port", str(port)]
    args += ["--clients", str(clients), "--messages", str(a.messages), "--size", str(a.size)]
    args += ["--server-pid", str(server_pid), "--timeout", "120", "--stall-timeout", "10"]
    return Proc(args, name)


def run_fanout(a: argparse.Namespace, redis_url: str | None) -> dict[str, Any]:
    """single (redis_url None): one node with all clients; else two nodes, half each."""
    procs: list[Proc] = []
    try:
        if redis_url is None:
            layout = [("node", a.clients, True)]
        else:
            layout = [
                ("node A", a.clients // 2, True),
                ("node B", a.clients - a.clients // 2, False),
            ]
        nodes = []
        for name, clients, sender in layout:
            n = node(a, clients, sender, redis_url, name)
            procs.append(n)
            port, pid = (int(x) for x in n.line("READY ").split())
            nodes.append((n, port, pid, clients))
        loads = []
        for n, port, pid, clients in nodes:
            lg = loadgen(a, port, clients, pid, f"load for {n.name}")
            procs.append(lg)
            loads.append(lg)
        for lg in loads:
            lg.line("OPEN ")
        cpu0 = {n.name: proc_cpu_seconds(pid) for n, _, pid, _ in nodes}
        t0 = time.perf_counter()
        for n, *_ in nodes:
            n.send("GO\n")
        results = [json.loads("{" + lg.line("{", 180)) for lg in loads]
        t1 = time.perf_counter()
        cpu1 = {n.name: proc_cpu_seconds(pid) for n, _, pid, _ in nodes}
        done = json.loads(nodes[0][0].line("DONE "))
        delivered = sum(r["delivered"] for r in results)
        expected = sum(r["expected"] for r in results)
        out: dict[str, Any] = {
            "clients": a.clients,
            "messages": a.messages,
            "size": a.size,
            "delivered": delivered,
            "expected": expected,
            "in_order": all(r.get("in_order") for r in results),
            "seconds": t1 - t0,
            "msg_per_s": delivered / (t1 - t0),
            "per_node_msg_per_s": [r.get("msg_per_s") for r in results],
            "load_cpu_cores": [r.get("client_cpu") for r in results],
            "sender": done,
            "node_cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu0},
        }
        return out
    finally:
        # The load generators first: a node's server.aclose() would otherwise wait out the
        # closing handshake of every connection (the load side reads only its stdin by then).
        for p in reversed(procs):
            p.stop()


# --------------------------------------------------------------------------- publish cost


def publish_cost(redis_url: str, size: int, count: int) -> dict[str, Any]:
    """CPU per send in a broadcaster with no clients: without a backplane, and with Redis."""
    import trio

    import wsnursery
    from wsnursery._backplane_envelope import encode_envelope

    payload = fanout_payload(0, size)
    envelope = wsnursery.Envelope("all", payload, None, frozenset(), "abcdef012345")
    t0 = time.process_time()
    for _ in range(count):
        encode_envelope(envelope)
    encode_us = (time.process_time() - t0) / count * 1e6

    async def sends(backplane: Any, kind: str) -> dict[str, float]:
        async with wsnursery.Broadcaster(backplane=backplane) as b:
            t0 = time.perf_counter()
            c0 = time.process_time()
            done = 0
            while done < count:
                block = min(1000, count - done)
                for _ in range(block):
                    if kind == "all":
                        await b.send_all(payload)
                    else:  # to a connection of a node that is not there: publish only
                        await b.send_one("0123456789ab-1", payload)
                done += block
                if backplane is not None:  # sustained: wait until Redis has it all
                    while backplane.stats().pending:
                        await trio.sleep(0)
            if backplane is not None:  # and our own echo of send_all is read
                await trio.sleep(0.05)
            return {
                "wall_us": (time.perf_counter() - t0) / count * 1e6,
                "cpu_us": (time.process_time() - c0) / count * 1e6,
                "dropped": backplane.stats().dropped if backplane is not None else 0,
            }

    base = trio.run(sends, None, "all")
    one = trio.run(sends, wsnursery.RedisBackplane(redis_url), "one")
    every = trio.run(sends, wsnursery.RedisBackplane(redis_url), "all")
    return {
        "size": size,
        "count": count,
        "encode_us": encode_us,
        "send_no_backplane": base,
        "send_one_remote": one,
        "send_all_with_echo": every,
        "publish_us": one["cpu_us"] - base["cpu_us"],
        "publish_and_echo_us": every["cpu_us"] - base["cpu_us"],
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    n = sub.add_parser("node")
    n.add_argument("--clients", type=int, required=True)
    n.add_argument("--messages", type=int, required=True)
    n.add_argument("--size", type=int, required=True)
    n.add_argument("--sender", action="store_true")
    n.add_argument("--redis")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--messages", type=int, default=500, help="at most 1024 (the outbox limit)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--publish-count", type=int, default=20000)
    p.add_argument("--json", help="write every figure to this file")
    a = p.parse_args()
    if a.command == "node":
        node_main(a)
        return

    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, redis_port = start_redis(tmp)
        url = f"redis://{HOST}:{redis_port}/0"
        try:
            r0 = proc_cpu_seconds(redis_proc.pid)
            single = run_fanout(a, None)
            cross = run_fanout(a, url)
            redis_cpu = proc_cpu_seconds(redis_proc.pid) - r0
            publish = publish_cost(url, a.size, a.publish_count)
        finally:
            os.kill(redis_proc.pid, signal.SIGTERM)
            redis_proc.wait(10)

    print(f"\n{a.clients} clients, {a.messages} messages of {a.size} B (send_all)\n")
    print("| | one process | 2 nodes via Redis | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| delivered msg/s, end to end | {single['msg_per_s']:,.0f} | {cross['msg_per_s']:,.0f} "
        f"| {cross['msg_per_s'] / single['msg_per_s']:.2f} |"
    )
    print(f"| seconds | {single['seconds']:.3f} | {cross['seconds']:.3f} | |")
    print(
        f"| sender's send_all loop, s | {single['sender']['send_seconds']:.3f} "
        f"| {cross['sender']['send_seconds']:.3f} | |"
    )
    cpu_single = sum(single["node_cpu_s"].values())
    cpu_cross = sum(cross["node_cpu_s"].values())
    print(f"| node CPU, s (all nodes) | {cpu_single:.3f} | {cpu_cross:.3f} | |")
    def per_node(cpu: dict[str, float]) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in cpu.items())

    print(f"| per node | {per_node(single['node_cpu_s'])} | {per_node(cross['node_cpu_s'])} | |")
    print(f"| redis-server CPU, s | | {redis_cpu:.3f} | |")
    us_single = cpu_single / single["delivered"] * 1e6
    us_cross = cpu_cross / cross["delivered"] * 1e6
    print(
        f"| node CPU per delivery, µs | {us_single:.2f} | {us_cross:.2f} "
        f"| {us_cross / us_single if us_single else float('nan'):.2f} |"
    )
    lc_single = sum(c or 0 for c in single["load_cpu_cores"])
    lc_cross = sum(c or 0 for c in cross["load_cpu_cores"])
    print(f"| load generators' CPU, cores | {lc_single:.2f} | {lc_cross:.2f} | |")
    print(
        f"| all delivered, in order | {single['delivered'] == single['expected'] and single['in_order']} "
        f"| {cross['delivered'] == cross['expected'] and cross['in_order']} | |"
    )
    print(f"\nPublish cost per message ({a.size} B, {a.publish_count} sends, CPU of the sender):")
    print(f"  encode the envelope:                      {publish['encode_us']:.2f} µs")
    print(
        f"  a send, no backplane (no clients):        {publish['send_no_backplane']['cpu_us']:.2f} µs"
    )
    print(
        f"  send_one to another node (publish only):  {publish['send_one_remote']['cpu_us']:.2f} µs"
    )
    print(
        f"  send_all (publish + reading our own echo): {publish['send_all_with_echo']['cpu_us']:.2f} µs"
    )
    print(f"  => publishing costs                       {publish['publish_us']:.2f} µs")
    print(f"  => publishing + own echo costs            {publish['publish_and_echo_us']:.2f} µs")
    dropped = publish["send_one_remote"]["dropped"] + publish["send_all_with_echo"]["dropped"]
    print(f"  dropped: {dropped}")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"single": single, "redis": cross, "redis_cpu_s": redis_cpu, "publish": publish},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
