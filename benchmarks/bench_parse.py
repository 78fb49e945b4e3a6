#!/usr/bin/env python
"""No-I/O microbenchmark: the server-side protocol work per echoed message.

For each payload size, a masked client frame (binary, or text with --text) is fed to a
server-side protocol object, the message is taken out (parse), and the reply frame is made
(serialise).  Timed per message, best of --repeat rounds, for:

  wsproto Connection     wsproto's public sans-I/O API (Connection.receive_data/events/send)
  wsproto FrameProtocol  the lower wsproto layer (what wsnursery builds on)
  wsnursery Protocol     wsnursery._sansio.protocol.Protocol, if it imports
  websockets Protocol    websockets' sans-I/O core (C unmasking): a reference bound

Raw wsproto always runs with wsproto's own pure-Python masker (wsnursery's protocol objects
use a C one of their own when websockets.speedups is installed).  WSNURSERY_NO_SPEEDUPS=1
times wsnursery with the pure-Python masker too.

    .venv/bin/python benchmarks/bench_parse.py --cpu 1
    .venv/bin/python benchmarks/bench_parse.py --sizes 32,1048576 --chunk 65536 --json parse.json
    .venv/bin/python benchmarks/bench_parse.py --only wsnursery,wsproto-frame --text
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import wsproto.frame_protocol as wfp
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, Message, TextMessage

ORIGINAL_MASKER = wfp.XorMaskerSimple  # before anything (wsnursery) replaces it

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _loadgen import mask_bytes, ws_header  # noqa: E402
from bench_echo import fmt_size  # noqa: E402

MAX_MESSAGE_SIZE = 16 * 1024 * 1024


def make_payload(size: int, text: bool) -> bytes:
    pattern = (
        b"The quick brown fox jumps over the lazy dog. 0123456789\n" if text else bytes(range(256))
    )
    return (pattern * (size // len(pattern) + 1))[:size]


# --------------------------------------------------------------------------- implementations
# Each factory returns (parse, serialise): parse(chunks) -> message, serialise(message) -> bytes.
# A fresh protocol object is made once per timing round, as a server does once per connection.


class Impl:
    name = ""
    masker = "python"

    def make(self) -> tuple[Callable[[list[bytes]], object], Callable[[object], bytes]]:
        raise NotImplementedError

    def setup(self) -> None:
        """Before make(): wsproto's own pure-Python masker, unless the class says otherwise."""
        wfp.XorMaskerSimple = ORIGINAL_MASKER  # type: ignore[misc]


class WsprotoConnection(Impl):
    name = "wsproto Connection"

    def make(self):  # type: ignore[no-untyped-def]
        conn = Connection(ConnectionType.SERVER)
        receive_data = conn.receive_data
        events = conn.events
        send = conn.send

        def parse(chunks: list[bytes]) -> object:
            parts: list = []
            for chunk in chunks:
                receive_data(chunk)
                for ev in events():
                    if isinstance(ev, Message):
                        parts.append(ev.data)
                        if ev.message_finished:
                            if len(parts) == 1:
                                return parts[0]
                            return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)
            raise RuntimeError("no message")

        def serialise(msg: object) -> bytes:
            ev = TextMessage(data=msg) if isinstance(msg, str) else BytesMessage(data=msg)  # type: ignore[arg-type]
            return send(ev)

        return parse, serialise


class WsprotoFrameProtocol(Impl):
    name = "wsproto FrameProtocol"

    def make(self):  # type: ignore[no-untyped-def]
        proto = wfp.FrameProtocol(client=False, extensions=[])
        receive_bytes = proto.receive_bytes
        received_frames = proto.received_frames
        send_data = proto.send_data

        def parse(chunks: list[bytes]) -> object:
            parts: list = []
            for chunk in chunks:
                receive_bytes(chunk)
                for frame in received_frames():
                    parts.append(frame.payload)
                    if frame.message_finished:
                        if len(parts) == 1:
                            return parts[0]
                        return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)
            raise RuntimeError("no message")

        def serialise(msg: object) -> bytes:
            return send_data(msg, True)  # type: ignore[arg-type]

        return parse, serialise


class WsnurseryProtocol(Impl):
    name = "wsnursery Protocol"

    def __init__(self) -> None:
        from wsnursery._sansio import protocol as _protocol

        self.cls = _protocol.Protocol
        try:  # the masker wsnursery's own protocol objects use
            from wsnursery._sansio import mask as _mask

            self.masker = _mask.active_masker()
        except ImportError:  # an older layout: wsnursery swapped wsproto's masker on import
            self.masker = "python" if wfp.XorMaskerSimple is ORIGINAL_MASKER else "c"
            self.patched = wfp.XorMaskerSimple

    def setup(self) -> None:
        wfp.XorMaskerSimple = getattr(self, "patched", ORIGINAL_MASKER)  # type: ignore[misc]

    def make(self):  # type: ignore[no-untyped-def]
        proto = self.cls(client=False, max_message_size=MAX_MESSAGE_SIZE)
        receive_data = proto.receive_data
        messages = proto.messages
        send_message = proto.send_message

        def parse(chunks: list[bytes]) -> object:
            for chunk in chunks:
                receive_data(chunk)
                if messages:
                    return messages.popleft()
            raise RuntimeError(f"no message (closed: {getattr(proto, 'closed', None)})")

        def serialise(msg: object) -> bytes:
            return send_message(msg)

        return parse, serialise


class WebsocketsProtocol(Impl):
    name = "websockets Protocol"

    def __init__(self) -> None:
        from websockets.frames import Opcode
        from websockets.protocol import Protocol, Side, State

        self.Protocol, self.Side, self.State, self.Opcode = Protocol, Side, State, Opcode
        try:
            import websockets.speedups  # noqa: F401

            self.masker = "c"
        except ImportError:
            self.masker = "python"

    def make(self):  # type: ignore[no-untyped-def]
        proto = self.Protocol(self.Side.SERVER, state=self.State.OPEN, max_size=MAX_MESSAGE_SIZE)
        receive_data = proto.receive_data
        events_received = proto.events_received
        send_text, send_binary = proto.send_text, proto.send_binary
        data_to_send = proto.data_to_send
        TEXT, CONT = self.Opcode.TEXT, self.Opcode.CONT

        def parse(chunks: list[bytes]) -> object:
            parts: list = []
            text = False
            for chunk in chunks:
                receive_data(chunk)
                for frame in events_received():
                    if frame.opcode is not CONT:
                        text = frame.opcode is TEXT
                    parts.append(frame.data)
                    if frame.fin:
                        data = parts[0] if len(parts) == 1 else b"".join(parts)
                        return data.decode() if text else data
            raise RuntimeError("no message")

        def serialise(msg: object) -> bytes:
            if isinstance(msg, str):
                send_text(msg.encode())
            else:
                send_binary(msg)  # type: ignore[arg-type]
            out = data_to_send()
            return out[0] if len(out) == 1 else b"".join(out)

        return parse, serialise


# --------------------------------------------------------------------------- timing


def n_calls(target: float, one: float) -> int:
    return max(3, min(1_000_000, int(target / one)))


def best_per_call(fn: Callable[[], None], target: float, repeat: int) -> float:
    """Seconds per call: calibrate a batch to ~target seconds, best of `repeat` batches."""
    t = time.perf_counter()
    fn()
    n = n_calls(target, max(time.perf_counter() - t, 1e-7))
    calls[0] += 1 + n * repeat
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def bench_impl(impl: Impl, size: int, text: bool, chunk: int, target: float, repeat: int) -> dict:
    payload = make_payload(size, text)
    frame = ws_header(1 if text else 2, size, True) + mask_bytes(payload)
    expected_reply = ws_header(1 if text else 2, size, False) + payload
    chunks = [frame[i : i + chunk] for i in range(0, len(frame), chunk)] if chunk else [frame]
    expected_msg = payload.decode() if text else payload

    impl.setup()
    parse, serialise = impl.make()
    # correctness first (untimed)
    msg = parse(chunks)
    same = msg == expected_msg and type(msg) is type(expected_msg)
    if not same and not (
        isinstance(msg, (bytes, bytearray, memoryview)) and bytes(msg) == expected_msg
    ):
        raise AssertionError(f"{impl.name}: parsed message differs ({type(msg).__name__})")
    reply = serialise(msg)
    if bytes(reply) != expected_reply:
        raise AssertionError(f"{impl.name}: reply frame differs")

    def do_parse() -> None:
        parse(chunks)

    def do_serialise() -> None:
        serialise(msg)

    def do_echo() -> None:
        serialise(parse(chunks))

    res = {
        "parse_us": best_per_call(do_parse, target, repeat) * 1e6,
        "serialise_us": best_per_call(do_serialise, target, repeat) * 1e6,
    }
    flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    n0 = calls[0]
    res["echo_us"] = best_per_call(do_echo, target, repeat) * 1e6
    res["echo_minflt"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0) / (
        calls[0] - n0
    )
    return res


calls = [0]  # calls made by best_per_call, for page faults per message


IMPLS: dict[str, type[Impl]] = {
    "wsproto-connection": WsprotoConnection,
    "wsproto-frameprotocol": WsprotoFrameProtocol,
    "wsnursery": WsnurseryProtocol,
    "websockets": WebsocketsProtocol,
}


def child(args: argparse.Namespace) -> None:
    """One implementation, one size, in a fresh process (so allocator state is comparable)."""
    try:
        impl = IMPLS[args.child]()
    except Exception as exc:
        print(json.dumps({"unavailable": f"{type(exc).__name__}: {exc}"}))
        return
    out: dict = {"name": impl.name, "masker": impl.masker}
    try:
        out.update(bench_impl(impl, args.sizes[0], args.text, args.chunk, args.target, args.repeat))
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="32,1024,65536,1048576", help="comma-separated payload sizes")
    p.add_argument(
        "--text", action="store_true", help="text messages (UTF-8 decode/encode) instead of binary"
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="feed each frame in pieces of this many bytes, as a socket would (default: whole)",
    )
    p.add_argument("--target", type=float, default=0.1, help="seconds per timing batch")
    p.add_argument("--repeat", type=int, default=5, help="batches per figure; the best is kept")
    p.add_argument("--only", help=f"comma-separated implementations: {', '.join(IMPLS)}")
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--child", choices=list(IMPLS), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.child:
        child(args)
        return

    names = list(IMPLS)
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",")]
        names = [n for n in names if any(k in n for k in keys)]
    sizes = args.sizes
    kind = "text" if args.text else "binary"
    feed = f"in {fmt_size(args.chunk)} pieces" if args.chunk else "whole"
    print(
        f"server-side work per echoed {kind} message (masked frame fed {feed}), µs; "
        f"best of {args.repeat}; one fresh process per implementation and size",
        flush=True,
    )

    results: dict = {}
    notes: list[str] = []
    labels: dict[str, str] = {}
    for name in names:
        results[name] = {}
        for size in sizes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--sizes",
                str(size),
                "--chunk",
                str(args.chunk),
                "--target",
                str(args.target),
                "--repeat",
                str(args.repeat),
            ]
            if args.text:
                cmd.append("--text")
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, IndexError, ValueError) as exc:
                r = {"error": f"child failed: {exc!r}"}
            if "unavailable" in r:
                notes.append(f"{name} not timed: {r['unavailable']}")
                del results[name]
                break
            labels[name] = f"{r.get('name', name)} [{r.get('masker', '?')} mask]"
            results[name][str(size)] = r
            if "error" in r:
                notes.append(f"{name} {fmt_size(size)}: {r['error']}")

    rows = [n for n in names if n in results]
    w0 = max((len(labels[n]) for n in rows), default=10)

    def table(title: str, cell: Callable[[dict, int], str]) -> None:
        print(f"\n{title}")
        print("  " + "".ljust(w0) + "".join(fmt_size(s).rjust(11) for s in sizes))
        for n in rows:
            cells = []
            for s in sizes:
                r = results[n].get(str(s), {"error": "-"})
                cells.append("error" if "error" in r else cell(r, s))
            print("  " + labels[n].ljust(w0) + "".join(c.rjust(11) for c in cells))

    table("parse, µs", lambda r, s: f"{r['parse_us']:,.2f}")
    table("serialise, µs", lambda r, s: f"{r['serialise_us']:,.2f}")
    table("parse + serialise (one echo step), µs", lambda r, s: f"{r['echo_us']:,.2f}")
    table("parse + serialise, MB/s of payload", lambda r, s: f"{s / r['echo_us']:,.1f}")
    table("page faults per echo step", lambda r, s: f"{r['echo_minflt']:,.1f}")
    for n in notes:
        print(f"note: {n}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "settings": {
                        "sizes": sizes,
                        "text": args.text,
                        "chunk": args.chunk,
                        "repeat": args.repeat,
                    },
                    "python": sys.version.split()[0],
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
