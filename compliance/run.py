#!/usr/bin/env python3
"""Run the Autobahn|Testsuite (wstest) against wsnursery's server or client.

    python compliance/run.py server [ci|fast|full] [options]
    python compliance/run.py client [ci|fast|full] [options]

server: starts `PYTHON -m wsnursery echo --host 127.0.0.1 --port PORT
        --max-message-size 16777216` on a free port, runs `wstest -m fuzzingclient`
        against ws://127.0.0.1:PORT, stops the server by its PID.
client: starts `wstest -m fuzzingserver` on a free 127.0.0.1 port (through
        wstest_loopback.py), runs `PYTHON compliance/client.py ws://127.0.0.1:PORT
        AGENT`, has wstest write its report, stops wstest by its PID.

Then it prints the summary (see summarize.py); the line to grep is

    autobahn server: OK=.. NON-STRICT=.. INFORMATIONAL=.. UNIMPLEMENTED=.. FAILED=..

Modes: ci = all but 12.* and 13.* (permessage-deflate), fast = all but 9.*, 12.*,
13.*, full = every case. --cases / --exclude (comma-separated wstest patterns such
as '6.4.*,7.1.5') replace the mode's selection; with --cases alone nothing is excluded.

Run it with the project's Python (the one that can import wsnursery), e.g.
.venv/bin/python compliance/run.py server ci; src/ of this checkout is put first
on PYTHONPATH for the server and the client. Everything listens on and connects
to 127.0.0.1 only.

Exit status: 0 no case FAILED or MISSING; 1 some did; 2 bad usage; 3 the run
could not be done (wstest not installed, server never listened, time-out, no report).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from summarize import cases_from_log, summarize  # noqa: E402

HOST = "127.0.0.1"
MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # the suite's largest messages (9.1.6, 9.2.6) are 16 MiB
DEFAULT_VENV = "/tmp/wsnursery-ab-venv"
MODES = {  # mode -> excluded case patterns
    "ci": ["12.*", "13.*"],
    "fast": ["9.*", "12.*", "13.*"],
    "full": [],
}
DEFAULT_TIMEOUT_S = {"ci": 600, "fast": 600, "full": 3600}
LISTEN_WAIT_S = 30
STOP_GRACE_S = 5
PORT_ATTEMPTS = 3
INSTALL_HINT = (
    "install it with: sudo bash compliance/install.sh (or as root: bash compliance/install.sh)"
)


class RunError(Exception):
    """The run itself could not be done (exit status 3)."""


class Stop(BaseException):
    """SIGTERM/SIGHUP: unwind so that every process we started is stopped."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def log(side: str, text: str) -> None:
    print(f"autobahn {side}: {text}", flush=True)


# --- ports and processes ------------------------------------------------------


try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when this runner dies, even by SIGKILL,
    so that no server or wstest outlives it."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> set[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo.extend(children.get(p, []))
    return found


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    return inodes


def _listeners(port: int) -> set[str]:
    """Inodes of TCP sockets in LISTEN state on PORT (IPv4 or IPv6), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def wait_listening(proc: subprocess.Popen[Any], port: int, limit_s: float) -> bool:
    """Wait until PROC (or a child of it) listens on PORT; False if it exits or time runs out.
    Reads /proc, so it never connects to the program under test."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        listeners = _listeners(port)
        if listeners and listeners & _socket_inodes(_tree(proc.pid)):
            return True
        time.sleep(0.1)
    return False


def stop(proc: subprocess.Popen[Any] | None) -> int | None:
    """SIGTERM, then SIGKILL after STOP_GRACE_S. Only for processes this script started."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode


def cpu_seconds(proc: subprocess.Popen[Any]) -> float | None:
    """User + system CPU time of a running process (from /proc), None if it is gone."""
    try:
        with open(f"/proc/{proc.pid}/stat", encoding="utf-8", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reaped_cpu_seconds() -> float:
    """User + system CPU time of all waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fmt_cpu(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f}s"


def port_clash(logfile: Path) -> bool:
    text = logfile.read_text(errors="replace") if logfile.exists() else ""
    return bool(re.search(r"Address already in use|EADDRINUSE|Errno 98|CannotListenError", text))


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- the fuzzingserver's control paths ------------------------------------------


def control(base_url: str, path: str, timeout_s: float = 300.0) -> list[str]:
    """Open one WebSocket to BASE_URL+PATH on wstest's fuzzingserver, collect its text
    messages until it closes, answer the close. A minimal stdlib client, loopback only."""
    url = urlsplit(base_url)
    if url.hostname != HOST or url.port is None:
        raise ValueError(f"control: only ws://{HOST}:PORT URLs, not {base_url!r}")
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{url.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    messages: list[str] = []
    with socket.create_connection((HOST, url.port), timeout=timeout_s) as sock:
        sock.sendall(request.encode("ascii"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"control {path}: closed during the handshake")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        if head.split(b" ", 2)[1:2] != [b"101"]:
            raise ConnectionError(f"control {path}: refused: {head.splitlines()[0]!r}")

        def read(n: int) -> bytes:
            nonlocal buf
            while len(buf) < n:
                chunk = sock.recv(65536)
                if not chunk:
                    raise EOFError
                buf += chunk
            data, buf = buf[:n], buf[n:]
            return data

        def send(opcode: int, payload: bytes) -> None:
            mask = os.urandom(4)
            n = len(payload)
            size = (
                bytes([0x80 | n])
                if n < 126
                else bytes([0x80 | 126]) + struct.pack("!H", n)
                if n < 65536
                else bytes([0x80 | 127]) + struct.pack("!Q", n)
            )
            body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            sock.sendall(bytes([0x80 | opcode]) + size + mask + body)

        try:
            while True:
                b0, b1 = read(2)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", read(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", read(8))
                payload = read(n)
                if opcode == 0x1:
                    messages.append(payload.decode("utf-8", "replace"))
                elif opcode == 0x9:
                    send(0xA, payload)
                elif opcode == 0x8:
                    send(0x8, payload[:2])
                    break
        except EOFError:
            pass  # wstest may drop TCP right after its close frame
    return messages


# --- the two suites ---------------------------------------------------------------


def prepare_outdir(outdir: Path) -> None:
    """Empty OUTDIR for a new report; refuse a non-empty directory that holds no earlier report."""
    if outdir.exists() and any(outdir.iterdir()):
        if not (outdir / "spec.json").exists():
            raise RunError(
                f"{outdir} is not empty and holds no earlier report; choose another --outdir"
            )
        for item in outdir.iterdir():
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    outdir.mkdir(parents=True, exist_ok=True)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def check_wsnursery(python: str, env: dict[str, str]) -> str:
    probe = subprocess.run(
        [python, "-c", "import wsnursery, sys; sys.stdout.write(wsnursery.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        raise RunError(
            f"{python} cannot import wsnursery (run this with the project's venv "
            f"Python, or set WSN_AB_PYTHON):\n{probe.stderr.strip()[-2000:]}"
        )
    return probe.stdout.strip()


def expected_cases(wstest_log: Path) -> int | None:
    m = re.search(
        r"will run (\d+) test cases",
        wstest_log.read_text(errors="replace") if wstest_log.exists() else "",
    )
    return int(m.group(1)) if m else None


def write_spec(outdir: Path, spec: dict[str, Any], cases: list[str], exclude: list[str]) -> Path:
    spec = {
        **spec,
        "outdir": str(outdir),
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }
    path = outdir / "spec.json"
    path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return path


def spawn(
    cmd: list[str],
    log_path: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    *,
    show_cmd: bool = False,
) -> subprocess.Popen[Any]:
    """Start CMD with its output (and, with SHOW_CMD, the command line first) in LOG_PATH."""
    with open(log_path, "w", encoding="utf-8") as out:
        if show_cmd:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            env=env,
            cwd=cwd,
        )


def start_listening(
    what: str, log_path: Path, launch: Callable[[int], subprocess.Popen[Any]]
) -> tuple[subprocess.Popen[Any], int]:
    """launch(port) on a free port until the process listens there; another port if
    someone took it between our probe and the bind (a port clash in LOG_PATH)."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        proc = launch(port)
        try:
            if wait_listening(proc, port, LISTEN_WAIT_S):
                return proc, port
        except BaseException:  # Stop or Ctrl-C while waiting: stop what we started
            stop(proc)
            raise
        rc = stop(proc)
        if not (port_clash(log_path) and attempt < PORT_ATTEMPTS):
            raise RunError(
                f"{what} did not listen on {HOST}:{port} within {LISTEN_WAIT_S} s"
                f" (exit status {rc}); last lines of {log_path}:\n{tail(log_path)}"
            )
    raise AssertionError("unreachable")


def run_server_suite(args: argparse.Namespace, outdir: Path) -> tuple[int | None, float, str]:
    """Returns (expected case count, wall time of the wstest run, extra summary fields)."""
    env = child_env()
    if args.server_cmd is None:
        where = check_wsnursery(args.python, env)
        template = [
            args.python,
            "-m",
            "wsnursery",
            "echo",
            "--host",
            HOST,
            "--port",
            "{port}",
            "--max-message-size",
            str(MAX_MESSAGE_SIZE),
        ]
        what = f"wsnursery echo server ({where})"
    else:
        template = shlex.split(args.server_cmd)
        what = f"'{args.server_cmd}'"
    server: subprocess.Popen[Any] | None = None
    wstest: subprocess.Popen[Any] | None = None
    server_log = outdir / "server.log"
    wstest_log = outdir / "wstest.log"

    def launch_server(port: int) -> subprocess.Popen[Any]:
        cmd = [
            part.replace("{port}", str(port)).replace("{python}", args.python) for part in template
        ]
        return spawn(cmd, server_log, outdir, env, show_cmd=True)

    try:
        server, port = start_listening("the server", server_log, launch_server)
        url = f"ws://{HOST}:{port}"
        spec = write_spec(
            outdir,
            {"servers": [{"agent": args.agent, "url": url}]},
            args.case_list,
            args.exclude_list,
        )
        log("server", f"running the {args.mode} suite against {what} at {url}; report in {outdir}")
        start = time.monotonic()
        wstest = spawn(
            [str(args.wstest), "-m", "fuzzingclient", "-s", str(spec)], wstest_log, outdir
        )
        cpu_before = reaped_cpu_seconds()
        try:
            wstest_rc: int | None = wstest.wait(args.timeout)
        except subprocess.TimeoutExpired:
            stop(wstest)
            raise RunError(
                f"wstest did not finish within {args.timeout} s (--timeout); log: {wstest_log}"
            ) from None
        wall = time.monotonic() - start
        wstest = None
        wstest_cpu = reaped_cpu_seconds() - cpu_before
        server_alive = server.poll() is None
        server_cpu = cpu_seconds(server)
        server_rc = stop(server)
        server = None
        if not server_alive:
            log(
                "server",
                f"warning: the server exited during the run (status {server_rc}); see {server_log}",
            )
        return (
            expected_cases(wstest_log),
            wall,
            (
                f"wstest_rc={wstest_rc} server_rc={server_rc} "
                f"cpu: server={fmt_cpu(server_cpu)} wstest={fmt_cpu(wstest_cpu)}"
            ),
        )
    finally:
        stop(wstest)
        stop(server)


def run_client_suite(args: argparse.Namespace, outdir: Path) -> tuple[int | None, float, str]:
    env = child_env()
    if args.client_cmd is None:
        where = check_wsnursery(args.python, env)
        base_cmd = [args.python, str(HERE / "client.py")]
        what = f"compliance/client.py ({where})"
    else:
        base_cmd = shlex.split(args.client_cmd)
        what = f"'{args.client_cmd}'"
    wstest: subprocess.Popen[Any] | None = None
    client: subprocess.Popen[Any] | None = None
    wstest_log = outdir / "wstest.log"
    client_log = outdir / "client.log"

    def launch_wstest(port: int) -> subprocess.Popen[Any]:
        spec = write_spec(outdir, {"url": f"ws://{HOST}:{port}"}, args.case_list, args.exclude_list)
        cmd = [str(args.wstest_python), str(HERE / "wstest_loopback.py")]
        return spawn([*cmd, "-m", "fuzzingserver", "-s", str(spec), "-u", "0"], wstest_log, outdir)

    try:
        wstest, port = start_listening("wstest fuzzingserver", wstest_log, launch_wstest)
        url = f"ws://{HOST}:{port}"
        log(
            "client", f"running the {args.mode} suite against {what} with {url}; report in {outdir}"
        )
        start = time.monotonic()
        client = spawn([*base_cmd, url, args.agent], client_log, outdir, env, show_cmd=True)
        cpu_before = reaped_cpu_seconds()
        try:
            client_rc: int | None = client.wait(args.timeout)
        except subprocess.TimeoutExpired:
            log(
                "client",
                f"warning: the client did not finish within {args.timeout} s "
                "(--timeout); stopping it and reporting what ran",
            )
            client_rc = stop(client)
        client_cpu = reaped_cpu_seconds() - cpu_before
        client = None
        wall = time.monotonic() - start
        if client_rc != 0:
            log("client", f"warning: the client exited with status {client_rc}; see {client_log}")
        # The client asks for /updateReports as its last step; ask again if it did not get
        # that far, so that an early stop still yields a report (absent cases = MISSING).
        index = outdir / "index.json"
        if client_rc != 0 or not index.exists():
            try:
                control(url, f"/updateReports?agent={args.agent}")
            except (OSError, ValueError, EOFError) as exc:
                log("client", f"warning: /updateReports failed: {exc!r}")
        wstest_cpu = cpu_seconds(wstest)
        wstest_rc = stop(wstest)
        wstest = None
        return (
            expected_cases(wstest_log),
            wall,
            (
                f"client_rc={client_rc} wstest_rc={wstest_rc} "
                f"cpu: client={fmt_cpu(client_cpu)} wstest={fmt_cpu(wstest_cpu)}"
            ),
        )
    finally:
        stop(client)
        stop(wstest)


def patterns(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(
        description="Run Autobahn|Testsuite against wsnursery.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "side",
        choices=("server", "client"),
        help="server: wstest is the client; client: wstest is the server",
    )
    parser.add_argument(
        "mode",
        nargs="?",
        choices=sorted(MODES),
        default=env.get("WSN_AB_MODE", "ci"),
        help="case selection (default ci, or $WSN_AB_MODE)",
    )
    parser.add_argument(
        "--cases",
        default=env.get("WSN_AB_CASES"),
        metavar="PATTERNS",
        help="comma-separated case patterns to run instead of the mode's ($WSN_AB_CASES)",
    )
    parser.add_argument(
        "--exclude",
        default=env.get("WSN_AB_EXCLUDE"),
        metavar="PATTERNS",
        help="comma-separated case patterns to leave out instead of the mode's ($WSN_AB_EXCLUDE)",
    )
    parser.add_argument(
        "--outdir",
        default=env.get("WSN_AB_OUTDIR"),
        help="report directory, emptied first ($WSN_AB_OUTDIR; default "
        "${TMPDIR:-/tmp}/wsnursery-autobahn/SIDE-MODE)",
    )
    parser.add_argument(
        "--agent",
        default=env.get("WSN_AB_AGENT", "wsnursery"),
        help="name in the report ($WSN_AB_AGENT, default wsnursery)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=env.get("WSN_AB_TIMEOUT"),
        help="seconds before wstest (server) or the client is stopped "
        "($WSN_AB_TIMEOUT; default 600, full 3600)",
    )
    parser.add_argument(
        "--python",
        default=env.get("WSN_AB_PYTHON", sys.executable),
        help="Python that runs the wsnursery server/client ($WSN_AB_PYTHON, "
        "default this interpreter)",
    )
    parser.add_argument(
        "--venv",
        default=env.get("WSN_AB_VENV", DEFAULT_VENV),
        help=f"wstest's virtualenv ($WSN_AB_VENV, default {DEFAULT_VENV})",
    )
    parser.add_argument(
        "--server-cmd",
        default=env.get("WSN_AB_SERVER_CMD"),
        help="server suite: another echo server command line; {port} and "
        "{python} are filled in ($WSN_AB_SERVER_CMD)",
    )
    parser.add_argument(
        "--client-cmd",
        default=env.get("WSN_AB_CLIENT_CMD"),
        help="client suite: another client command line; BASE_URL and AGENT "
        "are appended ($WSN_AB_CLIENT_CMD)",
    )
    args = parser.parse_args(argv)
    side = args.side

    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.agent):
        parser.error("--agent may hold only letters, digits, '.', '_' and '-'")
    cases, exclude = patterns(args.cases), patterns(args.exclude)
    args.case_list = cases or ["*"]
    args.exclude_list = exclude if exclude is not None else ([] if cases else MODES[args.mode])
    args.timeout = float(args.timeout or DEFAULT_TIMEOUT_S[args.mode])
    venv = Path(args.venv)
    args.wstest = venv / "bin" / "wstest"
    args.wstest_python = venv / "bin" / "python"
    if not (os.access(args.wstest, os.X_OK) and os.access(args.wstest_python, os.X_OK)):
        log(side, f"error: no wstest at {args.wstest} (WSN_AB_VENV={args.venv}); {INSTALL_HINT}")
        return 3
    outdir = Path(
        args.outdir
        or Path(env.get("TMPDIR") or "/tmp") / "wsnursery-autobahn" / f"{side}-{args.mode}"
    ).resolve()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    try:
        prepare_outdir(outdir)
        suite = run_server_suite if side == "server" else run_client_suite
        expect, wall, extra = suite(args, outdir)
    except RunError as exc:
        log(side, f"error: {exc}")
        return 3
    except (Stop, KeyboardInterrupt) as exc:
        log(side, f"interrupted ({exc or 'SIGINT'}); stopped the processes this run started")
        return 3

    with open(outdir / "summary.txt", "w", encoding="utf-8") as text:
        out = Tee(sys.stdout, text)
        status, result = summarize(
            str(outdir / "index.json"),
            side,
            args.agent,
            expect,
            out=out,
            expected_ids=cases_from_log(str(outdir / "wstest.log")),
        )
        n_unclean = sum(len(a["unclean_close"]) for a in result.get("agents", {}).values())
        reported = sum(a["reported"] for a in result.get("agents", {}).values())
        final = (
            f"autobahn {side}: mode={args.mode} cases={expect if expect is not None else '?'} "
            f"reported={reported} unclean_close={n_unclean} wall={wall:.1f}s {extra} "
            f"report={outdir / 'index.html'}"
        )
        print(final, file=out, flush=True)
    result.update(
        side=side,
        mode=args.mode,
        cases=args.case_list,
        exclude=args.exclude_list,
        expected=expect,
        wall_s=round(wall, 1),
    )
    (outdir / "summary.json").write_text(
        json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    if expect is None:
        log(side, "error: wstest's log does not say how many cases it ran")
        return 3
    return 3 if status == 2 else status


class Tee:
    """A write-only file object that writes to several files."""

    def __init__(self, *files: IO[str]) -> None:
        self.files = files

    def write(self, text: str) -> int:
        for f in self.files:
            with contextlib.suppress(BrokenPipeError):  # e.g. `run.py ... | head`
                f.write(text)
        return len(text)

    def flush(self) -> None:
        for f in self.files:
            with contextlib.suppress(BrokenPipeError):
                f.flush()


if __name__ == "__main__":
    sys.exit(main())
