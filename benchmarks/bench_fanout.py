#!/usr/bin/env python
"""Fan-out benchmark: one server sends every message to 1,000 connected clients.

Each server kind runs in its own process pinned to one CPU (benchmarks/_fanout_servers.py);
one load process pinned to the other CPU (benchmarks/_fanout_load.py: plain sockets + epoll)
opens the N connections, then the server sends M binary messages of S bytes to all of them,
one library call per message, and the load side counts and checks every frame.

    .venv/bin/python benchmarks/bench_fanout.py                      # 1,000 x 100 x 64 B
    .venv/bin/python benchmarks/bench_fanout.py --repeat 3 --json /tmp/fanout.json
    .venv/bin/python benchmarks/bench_fanout.py --stall              # one client stops reading
    .venv/bin/python benchmarks/bench_fanout.py --stall --only wsnursery --policy close

All traffic goes to 127.0.0.1; every phase is bounded in time.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _fanout_servers  # noqa: E402
from bench_echo import environment, free_port, others_cpu_seconds  # noqa: E402

# (kind, label); the reference first
KINDS = [
    ("websockets-trio", "websockets.trio broadcast()"),
    ("trio-websocket", "trio-websocket loop"),
    ("raw-trio", "raw Trio send_all loop"),
    ("raw-nowait", "raw Trio send() loop"),
    ("wsnursery", "wsnursery send_all"),
    ("wsnursery-group", "wsnursery send_group"),
]
LABEL = dict(KINDS)
REFERENCE = "websockets-trio"
NOISY = 0.15  # cores used by other processes above which a figure is flagged


class LineReader:
    """Lines from a child's pipe, with a timeout."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.fd = pipe.fileno()
        self.buf = b""
        self.eof = False
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, selectors.EVENT_READ)

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if self.eof or left <= 0:
                return None
            if self.sel.select(min(left, 0.5)):
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    self.eof = True
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def close(self) -> None:
        self.sel.close()


def tagged(line: str | None) -> tuple[str, Any]:
    if not line:
        return "", None
    tag, _, rest = line.partition(" ")
    try:
        return tag, json.loads(rest) if rest else None
    except json.JSONDecodeError:
        return tag, rest


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the server cancels itself
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run_once(
    kind: str,
    args: argparse.Namespace,
    logdir: Path,
    *,
    messages: int,
    stall: bool,
    policy: str = "drop",
) -> dict:
    """One server process, one load process, one fan-out. Returns the load side's JSON + more."""
    tag = f"{kind}-{'stall-' + policy if stall else 'plain'}"
    port = free_port()
    shared = ["--port", str(port), "--clients", str(args.clients)]
    shared += ["--messages", str(messages), "--size", str(args.size)]
    server_cmd = [sys.executable, str(HERE / "_fanout_servers.py"), kind, *shared]
    server_cmd += ["--policy", policy]
    if not args.no_pin:
        server_cmd += ["--cpu", str(args.server_cpu)]
    if args.max_outbox_messages is not None:
        server_cmd += ["--max-outbox-messages", str(args.max_outbox_messages)]
    if args.max_outbox_bytes is not None:
        server_cmd += ["--max-outbox-bytes", str(args.max_outbox_bytes)]
    log = logdir / f"server-{tag}.log"
    load_log = logdir / f"load-{tag}.log"
    with open(log, "ab") as logf, open(load_log, "ab") as load_logf:
        server = subprocess.Popen(
            server_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf
        )
        assert server.stdout is not None
        assert server.stdin is not None
        srv_out = LineReader(server.stdout)
        load: subprocess.Popen[bytes] | None = None
        try:
            line = srv_out.readline(30)
            if not line or not line.startswith("READY"):
                return {"error": f"server did not start: {line!r}; see {log}"}
            load_cmd = [
                sys.executable,
                str(HERE / "_fanout_load.py"),
                *shared,
                "--server-pid",
                str(server.pid),
                "--stall-timeout",
                str(args.stall_timeout),
                "--timeout",
                str(args.timeout),
            ]
            if not args.no_pin:
                load_cmd += ["--cpu", str(args.load_cpu)]
            if stall:
                load_cmd.append("--stall")
            exclude = {os.getpid(), server.pid}
            load = subprocess.Popen(
                load_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=load_logf
            )
            assert load.stdout is not None
            assert load.stdin is not None
            exclude.add(load.pid)
            load_out = LineReader(load.stdout)
            line = load_out.readline(90)
            if not line or not line.startswith("OPEN"):
                return {
                    "error": f"load side did not open its connections: {line!r}; see {load_log}"
                }
            before = others_cpu_seconds(exclude)
            t0 = time.monotonic()
            server.stdin.write(b"GO\n")
            server.stdin.flush()
            line = load_out.readline(args.timeout + 60)
            wall = time.monotonic() - t0
            after = others_cpu_seconds(exclude)
            load_out.close()
            if not line:
                return {"error": f"load side gave no result; see {load_log}"}
            res: dict = json.loads(line)
            used = sum(after[p][1] - before[p][1] for p in after if p in before)
            # CPU ticks are 10 ms: too coarse to judge a run shorter than 1 s
            res["other_cpu"] = used / wall if wall >= 1 else None
            # The server prints DONE when its last call returned (at once, normally);
            # a server blocked on a stalled client is stopped and says how far it got.
            tag_, doc = tagged(srv_out.readline(3 if not res.get("blocked") else 0.5))
            if tag_ not in ("DONE", "ERROR"):
                server.send_signal(signal.SIGTERM)
                tag_, doc = tagged(srv_out.readline(5))
            res["server"] = {
                "status": tag_ or "no answer",
                **(doc if isinstance(doc, dict) else {}),
            }
            return res
        finally:
            if load is not None:
                assert load.stdin is not None
                load.stdin.close()  # the load side closes its connections and exits
                try:
                    load.wait(10)
                except subprocess.TimeoutExpired:
                    load.kill()
                    load.wait(5)
            stop(server)
            srv_out.close()


# --------------------------------------------------------------------------- reporting


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print(
        "  "
        + "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(head, widths, strict=True))
        )
    )
    for r in rows:
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def check_ok(r: dict) -> str:
    if r.get("error"):
        return "ERROR"
    if r.get("complete_clients") == r.get("reading_clients") and r.get("in_order"):
        return "all in order"
    return f"{r.get('complete_clients')}/{r.get('reading_clients')} complete"


def report_plain(results: dict, args: argparse.Namespace) -> None:
    ref = (results.get(REFERENCE) or {}).get("best", {}).get("msg_per_s")
    raw = (results.get("raw-trio") or {}).get("best", {}).get("msg_per_s")
    nowait = (results.get("raw-nowait") or {}).get("best", {}).get("msg_per_s")
    print(
        f"\nFan-out: {args.clients:,} clients x {args.messages:,} messages of {args.size} B, "
        f"delivered messages/s (best of {args.repeat}; higher is better)"
    )
    head = [
        "server",
        "msg/s",
        "x wst",
        "x raw",
        "x send()",
        "srv µs/msg",
        "send loop s",
        "per client",
        "check",
    ]
    rows = []
    for kind, label in KINDS:
        if kind not in results:
            continue
        r = results[kind]
        if "skipped" in r:
            rows.append([label, "n/a", "", "", "", "", "", "", r["skipped"]])
            continue
        b = r.get("best") or {}
        v = b.get("msg_per_s")
        noisy = "*" if (b.get("other_cpu") or 0) > NOISY else ""
        srv = b.get("server") or {}
        rows.append(
            [
                label,
                fmt(v) + noisy,
                f"{v / ref:.2f}x" if v and ref else "—",
                f"{v / raw:.2f}x" if v and raw else "—",
                f"{v / nowait:.2f}x" if v and nowait else "—",
                fmt(b.get("server_us_per_msg"), ".2f"),
                fmt(srv.get("send_seconds"), ".3f"),
                f"{b.get('min_per_client', 0)}–{b.get('max_per_client', 0)}" if b else "",
                check_ok(b) if b else r.get("error", "ERROR"),
            ]
        )
    table(head, rows)
    print(
        "  x wst / x raw / x send(): ratio to websockets.trio's broadcast() / to the raw Trio\n"
        "  send_all loop / to the raw send() loop; srv µs/msg: server CPU per delivered message;\n"
        "  send loop s: the server's M calls, timed by the server"
    )


def stalled_outcome(r: dict) -> str:
    s = r.get("stalled")
    if not s:
        return "n/a"
    if not s.get("drained"):
        return "not read (the server was blocked writing to it)"
    parts = [f"got {s['received']:,}"]
    if s.get("missing"):
        parts.append(f"{s['missing']:,} missing")
    if s.get("close_code") is not None:
        parts.append(f"close {s['close_code']}")
    elif s.get("eof"):
        parts.append("TCP closed")
    elif s.get("answered_ping"):
        parts.append("still open (pong)")
    elif s.get("answered_ping") is False:
        parts.append("no pong")
    srv = r.get("server") or {}
    rep = srv.get("reports")
    if rep:
        parts.append(f"reports: dropped {rep['dropped']:,}, closed {rep['closed']:,}")
    st = srv.get("stats")
    if st:
        parts.append(f"stats: dropped {st['dropped']:,}, closed {st['closed']:,}")
    return "; ".join(parts)


def report_stall(results: dict, args: argparse.Namespace) -> None:
    m = args.messages
    print(
        f"\nOne stalled client: {args.clients:,} clients, one never reads (SO_RCVBUF 4096), "
        f"{m:,} messages of {args.size} B; the other {args.clients - 1:,} must get all of them"
    )
    head = ["server", "policy", "others msg/s", "no stall", "ratio", "others got", "stalled client"]
    rows = []
    for kind, label in KINDS:
        r = results.get(kind)
        if not r:
            continue
        if "skipped" in r:
            rows.append([label, "", "n/a", "", "", "", r["skipped"]])
            continue
        base = (r.get("baseline") or {}).get("msg_per_s")
        for policy, s in r.get("stall", {}).items():
            if s.get("error") and "delivered" not in s:
                rows.append([label, policy, "ERROR", "", "", "", s["error"][:60]])
                continue
            v = s.get("msg_per_s")
            if s.get("blocked"):
                lo, hi = s["min_per_client"], s["max_per_client"]
                each = f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"
                got = (
                    f"blocked: {each} of {m:,} each ({s['delivered']:,} in "
                    f"{s.get('seconds', 0):.1f} s), then nothing for {s['no_progress_for']:g} s"
                )
                calls = (s.get("server") or {}).get("calls")
                if calls is not None and calls < m:
                    got += f"; the server's call {calls + 1:,} never returned"
            else:
                got = check_ok(s)
            noisy = "*" if (s.get("other_cpu") or 0) > NOISY else ""
            rows.append(
                [
                    label,
                    policy if kind.startswith("wsnursery") else "-",
                    (fmt(v) + noisy) if v else "blocked",
                    fmt(base) if base else "",
                    f"{v / base:.2f}" if v and base else "",
                    got,
                    stalled_outcome(s),
                ]
            )
    table(head, rows)


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--messages", type=int, help="messages per run (default 100; --stall: 2000)")
    p.add_argument("--size", type=int, default=64, help="payload bytes (at least 8)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these kinds (repeat or comma-separate): {', '.join(k for k, _ in KINDS)}",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per kind; the best is reported")
    p.add_argument("--json", metavar="FILE", help="save all results (and the environment)")
    p.add_argument("--stall", action="store_true", help="one client stops reading (see README)")
    p.add_argument(
        "--policy",
        choices=("drop", "close", "both"),
        default="both",
        help="wsnursery's on_overflow in --stall runs (default: both, one run each)",
    )
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="--stall: skip wsnursery's run without a stalled client",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=3.0,
        help="a run ends when no reading client got anything for this long (default 3 s)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="hard limit per run, seconds")
    p.add_argument("--max-outbox-messages", type=int, help="wsnursery's outbox limit (its default)")
    p.add_argument("--max-outbox-bytes", type=int, help="wsnursery's outbox limit (its default)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="don't pin the processes to CPUs")
    args = p.parse_args()

    if args.size < 8:
        p.error("--size must be at least 8 (the sequence number)")
    if args.clients < (2 if args.stall else 1):
        p.error("--clients too small")
    args.messages = args.messages or (2000 if args.stall else 100)
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    aliases = {
        "websockets": "websockets-trio",
        "raw": "raw-trio",
        "trio_websocket": "trio-websocket",
    }
    only = [aliases.get(n, n) for n in only]
    for n in only:
        if n not in LABEL:
            p.error(f"unknown kind {n!r}; choose from {', '.join(LABEL)}")
    if only:
        kinds = [k for k, _ in KINDS if k in only]
    elif args.stall:
        kinds = [k for k, _ in KINDS if k not in ("wsnursery-group", "raw-nowait")]
    else:
        kinds = [k for k, _ in KINDS]

    cpus = os.sched_getaffinity(0)
    if args.no_pin:
        pinning = "no CPU pinning"
    else:
        if {args.server_cpu, args.load_cpu} - cpus or args.server_cpu == args.load_cpu:
            p.error(f"need two distinct CPUs among {sorted(cpus)} for --server-cpu/--load-cpu")
        os.sched_setaffinity(0, {args.load_cpu})  # this process mostly sleeps
        pinning = f"server on CPU {args.server_cpu}, load on CPU {args.load_cpu}"

    logdir = Path(tempfile.mkdtemp(prefix="wsnursery-fanout-"))
    print(
        f"fan-out benchmark: {args.clients:,} clients, {args.messages:,} x {args.size} B"
        f"{', one stalled client' if args.stall else ''}; {pinning}; logs in {logdir}",
        flush=True,
    )
    t_start = time.monotonic()
    results: dict[str, dict] = {}
    policies = ["drop", "close"] if args.policy == "both" else [args.policy]

    def progress(what: str, r: dict) -> None:
        if r.get("error") and not r.get("blocked"):
            print(f"    {what}: ERROR {r['error']}", flush=True)
            return
        if r.get("blocked"):
            desc = (
                f"blocked after {r['delivered']:,} of {r['expected']:,} messages "
                f"({r.get('min_per_client', 0):,}–{r.get('max_per_client', 0):,} per client)"
            )
        else:
            desc = f"{fmt(r.get('msg_per_s'))} msg/s, {check_ok(r)}"
        if "stalled" in r:
            desc += f"; stalled client: {stalled_outcome(r)}"
        print(f"    {what}: {desc}", flush=True)

    def best_of(kind: str, what: str, **opts: Any) -> tuple[list[dict], dict]:
        """args.repeat runs, and the fastest complete one (else the last)."""
        runs = []
        for i in range(args.repeat):
            r = run_once(kind, args, logdir, messages=args.messages, **opts)
            runs.append(r)
            progress(f"{what}run {i + 1}", r)
        ok = [r for r in runs if r.get("msg_per_s")]
        return runs, max(ok, key=lambda r: r["msg_per_s"]) if ok else runs[-1]

    try:
        for kind in kinds:
            reason = _fanout_servers.available(kind)
            if reason:
                results[kind] = {"label": LABEL[kind], "skipped": reason}
                print(f"  {LABEL[kind]}: skipped ({reason})", flush=True)
                continue
            print(f"  {LABEL[kind]}", flush=True)
            out: dict = {"label": LABEL[kind]}
            results[kind] = out
            if not args.stall:
                out["runs"], out["best"] = best_of(kind, "", stall=False)
                continue
            wsn = kind.startswith("wsnursery")
            if wsn and not args.no_baseline:
                _, out["baseline"] = best_of(kind, "no stall, ", stall=False)
            out["stall"] = {}
            for policy in policies if wsn else ["-"]:
                _, out["stall"][policy] = best_of(
                    kind,
                    f"stalled client{', ' + policy if wsn else ''}, ",
                    stall=True,
                    policy=policy if wsn else "drop",
                )
    except KeyboardInterrupt:
        print("interrupted; reporting what ran", flush=True)
    elapsed = time.monotonic() - t_start

    if args.stall:
        report_stall(results, args)
    else:
        report_plain(results, args)
    all_runs = [
        r
        for out in results.values()
        for r in (
            out.get("runs", [])
            + ([out["baseline"]] if "baseline" in out else [])
            + list(out.get("stall", {}).values())
        )
    ]
    load_max = max((r.get("client_cpu") or 0 for r in all_runs), default=0)
    other_max = max((r.get("other_cpu") or 0 for r in all_runs), default=0)
    print(
        f"\nload side CPU: at most {load_max:.0%} of its core (~100% would mean it, not the "
        f"server, was the limit)\nother processes: at most {other_max:.2f} cores busy during a run"
        + (
            f"\n  WARNING: figures marked * ran while other processes used more than {NOISY} "
            "cores: rerun on a quiet machine"
            if other_max > NOISY
            else ""
        )
    )
    print(f"total time {elapsed:.0f} s")
    failed = [
        k
        for k, out in results.items()
        if "skipped" not in out
        and (
            (not args.stall and not (out.get("best") or {}).get("msg_per_s"))
            or (
                args.stall
                and k.startswith("wsnursery")
                and any(not s.get("msg_per_s") for s in out.get("stall", {}).values())
            )
        )
    ]

    if args.json:
        doc = {
            "environment": environment(),
            "settings": {
                k: getattr(args, k)
                for k in (
                    "clients",
                    "messages",
                    "size",
                    "repeat",
                    "stall",
                    "policy",
                    "stall_timeout",
                    "max_outbox_messages",
                    "max_outbox_bytes",
                    "server_cpu",
                    "load_cpu",
                    "no_pin",
                )
            },
            "results": results,
            "load_cpu_max": load_max,
            "other_cpu_max": other_max,
            "seconds": elapsed,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"saved {args.json}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
