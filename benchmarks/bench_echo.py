#!/usr/bin/env python
"""Echo benchmark: wsnursery against websockets.trio, trio-websocket and a raw Trio TCP ceiling.

One run starts each echo server in turn in its own process pinned to one CPU, drives it with
one load-generator process pinned to the other CPU (benchmarks/_loadgen.py: plain sockets +
epoll, independent of every server under test) and prints a table per metric.

    .venv/bin/python benchmarks/bench_echo.py                 # full run, ~2.5 minutes
    .venv/bin/python benchmarks/bench_echo.py --quick         # ~1 minute
    .venv/bin/python benchmarks/bench_echo.py --only wsnursery,websockets --json out.json

All traffic goes to 127.0.0.1; every phase is bounded in time.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _servers  # noqa: E402

# (kind, label); wsnursery last so the ratio columns sit next to it
SERVERS = [
    ("raw", "raw TCP"),
    ("websockets", "websockets.trio"),
    ("trio-websocket", "trio-websocket"),
    ("wsnursery", "wsnursery"),
    ("wsn-handler", "wsnursery (handler)"),
]
LABEL = dict(SERVERS)
RATIOS = [
    ("websockets", "/websockets.trio"),
    ("trio-websocket", "/trio-websocket"),
    ("raw", "/raw"),
]


def fmt_size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the server process before exec: SIGTERM when this benchmark dies, even killed,
    so that no server outlives it (PR_SET_PDEATHSIG)."""
    _libc.prctl(1, signal.SIGTERM)


def others_cpu_seconds(exclude: set[int]) -> dict[int, tuple[str, float]]:
    """(command, CPU seconds so far) of every process on the machine except `exclude`."""
    tck = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
            fields = tail.split()
            comm = head.split("(", 1)[1]
            out[int(name)] = (comm, (int(fields[11]) + int(fields[12])) / tck)
        except (OSError, IndexError, ValueError):
            pass
    return out


class Server:
    def __init__(self, kind: str, cpu: int, logdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.log = logdir / f"server-{kind}.log"
        self._logf = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_servers.py"),
                kind,
                "--port",
                str(self.port),
                "--cpu",
                str(cpu),
            ],
            stdout=subprocess.PIPE,
            stderr=self._logf,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            if self.proc.poll() is not None:
                break
            if sel.select(0.2):
                chunk = os.read(self.proc.stdout.fileno(), 1)
                if not chunk:
                    break
                line += chunk
        sel.close()
        if not line.startswith(b"READY"):
            self.stop()
            raise RuntimeError(f"{kind} server did not start; see {self.log}:\n{self.log_tail()}")

    def log_tail(self, n: int = 10) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the server cancels itself cleanly
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._logf.close()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.other_cpu_max = 0.0
        self.client_cpu_max = 0.0

    def load(self, server: Server, command: str, **opts: object) -> dict:
        a = self.args
        cmd = [
            sys.executable,
            str(HERE / "_loadgen.py"),
            command,
            "--port",
            str(server.port),
            "--proto",
            "raw" if server.kind == "raw" else "ws",
            "--server-pid",
            str(server.pid),
            "--cpu",
            str(a.load_cpu),
        ]
        for k, v in opts.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        limit = 90 + float(opts.get("duration", 0)) + float(opts.get("warmup", 0))
        exclude = {os.getpid(), server.pid}
        before = others_cpu_seconds(exclude)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"error": f"load generator timed out after {limit:.0f} s"}
        wall = time.monotonic() - t0
        after = others_cpu_seconds(exclude | {proc.pid})
        used = {p: (after[p][0], (after[p][1] - before[p][1]) / wall) for p in after if p in before}
        other = sum(c for _, c in used.values())
        top = sorted(used.values(), key=lambda x: -x[1])[:3]
        self.other_cpu_max = max(self.other_cpu_max, other)
        if proc.returncode != 0:
            return {
                "error": f"load generator exit {proc.returncode}: {err.decode(errors='replace')[-500:]}"
            }
        res = json.loads(out.decode().strip().splitlines()[-1])
        res["other_cpu"] = other
        res["other_top"] = [f"{n}: {c:.2f}" for n, c in top if c >= 0.01]
        if "client_cpu" in res and command == "echo":
            self.client_cpu_max = max(self.client_cpu_max, res["client_cpu"])
        if server.proc.poll() is not None:
            res["error"] = f"server died (exit {server.proc.returncode}); see {server.log}"
        return res

    def run_server(self, kind: str, logdir: Path) -> dict:
        a = self.args
        out: dict = {"label": LABEL[kind]}
        reason = _servers.available(kind)
        if reason:
            out["skipped"] = reason
            print(f"  {LABEL[kind]}: skipped ({reason})", flush=True)
            return out
        t_start = time.monotonic()
        server = Server(kind, a.server_cpu, logdir)
        try:
            print(f"  {LABEL[kind]} (pid {server.pid}, port {server.port})", flush=True)
            # 1. memory per idle connection + handshake rate, on the fresh server
            r = self.load(server, "idle", conns=a.idle_conns, concurrency=64, settle=a.settle)
            out["idle"] = r
            self.progress("idle", r, "kib_per_conn", "KiB/conn")
            # 2. connection churn
            r = self.load(server, "churn", duration=a.churn, concurrency=32)
            out["churn"] = r
            self.progress("churn", r, "conns_per_s", "conn/s")
            # 3. echo ping-pong matrix
            out["echo"] = {}
            for size in a.sizes:
                for conns in a.conns:
                    r = self.load(
                        server, "echo", size=size, conns=conns, warmup=a.warmup, duration=a.duration
                    )
                    out["echo"][f"{size}x{conns}"] = r
                    self.progress(f"echo {fmt_size(size)} x{conns}", r, "msg_per_s", "msg/s")
        finally:
            server.stop()
            tail = server.log_tail(5)
            if tail.strip():
                out["server_stderr_tail"] = tail
                print(f"    (server wrote to stderr; see {server.log})", flush=True)
        out["seconds"] = time.monotonic() - t_start
        return out

    @staticmethod
    def progress(what: str, r: dict, key: str, unit: str) -> None:
        if r.get("error"):
            print(f"    {what}: ERROR {r['error']}", flush=True)
        else:
            v = r.get(key)
            extra = f"  (errors: {r['errors']})" if r.get("errors") else ""
            print(
                f"    {what}: {v:,.1f} {unit}{extra}" if v is not None else f"    {what}: -",
                flush=True,
            )


# --------------------------------------------------------------------------- report


def get(results: dict, kind: str, *path: str) -> float | None:
    r = results.get(kind, {})
    for p in path:
        if not isinstance(r, dict) or p not in r:
            return None
        r = r[p]
    if isinstance(r, (int, float)):
        return float(r)
    return None


NOISY = 0.15  # cores used by other processes during a test above which its figure is flagged
Row = tuple[str, dict[str, float | None], set[str]]


def print_table(title: str, rows: list[Row], kinds: list[str], fmt: str) -> None:
    heads = [LABEL[k] for k in kinds]
    # Ratio columns for each wsnursery variant in the run: the handler function
    # ("wsn") and the handler object whose hooks run in the reader ("wsnH").
    ratio_cols = [
        (base, k, prefix + suffix)
        for base, prefix in (("wsnursery", "wsn"), ("wsn-handler", "wsnH"))
        if base in kinds
        for k, suffix in RATIOS
        if k in kinds
    ]
    heads += [h for _, _, h in ratio_cols]
    w0 = max(len(r[0]) for r in rows) if rows else 10
    widths = [max(len(h), 9) for h in heads]
    print(f"\n{title}")
    print(
        "  " + " " * w0 + "  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))
    )
    for name, vals, noisy in rows:
        cells = []
        for k in kinds:
            v = vals.get(k)
            cells.append("n/a" if v is None else format(v, fmt) + ("*" if k in noisy else ""))
        for base, k, _ in ratio_cols:
            wsn, v = vals.get(base), vals.get(k)
            cells.append("—" if wsn is None or not v else f"{wsn / v:.2f}x")
        print(
            "  "
            + name.ljust(w0)
            + "  "
            + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
        )


def report(results: dict, args: argparse.Namespace) -> None:
    kinds = [k for k, _ in SERVERS if k in results]

    def row(name: str, *path: str) -> Row:
        noisy = {k for k in kinds if (get(results, k, *path[:-1], "other_cpu") or 0) > NOISY}
        return name, {k: get(results, k, *path) for k in kinds}, noisy

    for title, key, fmt in (
        ("Echo ping-pong throughput, messages/s (higher is better)", "msg_per_s", ",.0f"),
        (
            "Server CPU per message, µs (lower is better; the 64-connection rows are the ones to compare)",
            "server_us_per_msg",
            ",.1f",
        ),
        (
            "Server page faults per message (fresh memory touched; ~256 per MiB = every page new)",
            "server_minflt_per_msg",
            ",.1f",
        ),
    ):
        print_table(
            title,
            [
                row(f"{fmt_size(s)} x {c} conn", "echo", f"{s}x{c}", key)
                for s in args.sizes
                for c in args.conns
            ],
            kinds,
            fmt,
        )
    if 1 in args.conns:
        s0 = min(args.sizes)
        print_table(
            f"Round trip, 1 connection, {fmt_size(s0)}, µs (lower is better)",
            [
                row("p50", "echo", f"{s0}x1", "rtt_p50_us"),
                row("p99", "echo", f"{s0}x1", "rtt_p99_us"),
            ],
            kinds,
            ",.0f",
        )
    print_table(
        f"Server memory per idle connection, KiB ({args.idle_conns:,} connections; lower is better)",
        [
            row("KiB per connection", "idle", "kib_per_conn"),
            row("RSS before, KiB", "idle", "rss_before_kib"),
        ],
        kinds,
        ",.1f",
    )
    print_table(
        "Connections accepted per second (higher is better)",
        [
            row(f"{args.idle_conns:,} handshakes, 64 in flight", "idle", "handshakes_per_s"),
            row(f"churn {args.churn:g} s: open+handshake+close", "churn", "conns_per_s"),
        ],
        kinds,
        ",.0f",
    )


def environment() -> dict:
    env: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        pass
    for dist in ("trio", "wsproto", "h11", "websockets", "trio-websocket", "wsnursery"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    try:
        env["git_commit"] = subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="shorter runs, sizes 32 B and 64 KiB only")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these servers (repeat or comma-separate): {', '.join(k for k, _ in SERVERS)}",
    )
    p.add_argument("--json", metavar="FILE", help="save all results (and the environment) as JSON")
    p.add_argument("--sizes", help="comma-separated payload sizes in bytes")
    p.add_argument("--conns", help="comma-separated connection counts (default 1,64)")
    p.add_argument(
        "--duration", type=float, help="measured seconds per echo run (default 3, quick 1)"
    )
    p.add_argument(
        "--warmup", type=float, help="warm-up seconds per echo run (default 0.5, quick 0.25)"
    )
    p.add_argument(
        "--idle-conns", type=int, default=2000, help="idle connections for the memory test"
    )
    p.add_argument("--churn", type=float, help="seconds of connection churn (default 2, quick 1)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    args = p.parse_args()

    args.sizes = (
        [int(x) for x in args.sizes.split(",")]
        if args.sizes
        else ([32, 65536] if args.quick else [32, 1024, 65536, 1 << 20])
    )
    args.conns = [int(x) for x in args.conns.split(",")] if args.conns else [1, 64]
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.25 if args.quick else 0.5)
    args.churn = args.churn or (1.0 if args.quick else 2.0)
    args.settle = 0.5 if args.quick else 1.0
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    aliases = {"websockets.trio": "websockets", "trio_websocket": "trio-websocket", "tcp": "raw"}
    only = [aliases.get(n, n) for n in only]
    for n in only:
        if n not in LABEL:
            p.error(f"unknown server {n!r}; choose from {', '.join(LABEL)}")
    kinds = [k for k, _ in SERVERS if not only or k in only]

    cpus = os.sched_getaffinity(0)
    if {args.server_cpu, args.load_cpu} - cpus or args.server_cpu == args.load_cpu:
        p.error(f"need two distinct CPUs among {sorted(cpus)} for --server-cpu/--load-cpu")
    os.sched_setaffinity(
        0, {args.load_cpu}
    )  # this process mostly sleeps; keep it off the server's CPU

    logdir = Path(tempfile.mkdtemp(prefix="wsnursery-bench-"))
    t0 = time.monotonic()
    bench = Bench(args)
    results: dict = {}
    print(
        f"echo benchmark: server on CPU {args.server_cpu}, load on CPU {args.load_cpu}; "
        f"sizes {', '.join(map(fmt_size, args.sizes))}; conns {args.conns}; "
        f"{args.warmup:g}+{args.duration:g} s per run; logs in {logdir}",
        flush=True,
    )
    try:
        for kind in kinds:
            try:
                results[kind] = bench.run_server(kind, logdir)
            except RuntimeError as exc:
                results[kind] = {"label": LABEL[kind], "error": str(exc)}
                print(f"  {LABEL[kind]}: ERROR {exc}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; reporting what ran", flush=True)
    elapsed = time.monotonic() - t0

    report(results, args)
    print(
        f"\nload generator CPU: at most {bench.client_cpu_max:.0%} of its core during echo runs "
        f"(~100% would mean it, not the server, was the limit)"
    )
    print(
        f"other processes on the machine: at most {bench.other_cpu_max:.2f} cores busy during a run"
        + (
            f"\n  WARNING: noisy machine; figures marked * ran while other processes used"
            f" more than {NOISY} cores: rerun when the machine is quiet"
            if bench.other_cpu_max > NOISY
            else ""
        )
    )
    print(f"total time {elapsed:.0f} s")

    if args.json:
        doc = {
            "environment": environment(),
            "settings": {
                k: getattr(args, k)
                for k in (
                    "sizes",
                    "conns",
                    "duration",
                    "warmup",
                    "idle_conns",
                    "churn",
                    "server_cpu",
                    "load_cpu",
                )
            },
            "results": results,
            "load_cpu_max": bench.client_cpu_max,
            "other_cpu_max": bench.other_cpu_max,
            "seconds": elapsed,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
