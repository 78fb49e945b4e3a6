"""benchmarks/bench_fanout.py runs, with tiny numbers, so it cannot rot silently.

Each test runs the benchmark as a subprocess (no CPU pinning, 127.0.0.1 only, a hard time
limit) and checks its JSON: every client of every server kind got every message, in order;
with a stalled client, wsnursery applies its overflow policy while the others get
everything, and the peers block. No figure is checked: only what was delivered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_fanout.py"
KINDS = (
    "websockets-trio",
    "trio-websocket",
    "raw-trio",
    "raw-nowait",
    "wsnursery",
    "wsnursery-group",
)
PEERS = ("websockets-trio", "trio-websocket", "raw-trio")


def run_bench(tmp_path: Path, *args: str, time_limit: float = 60) -> dict[str, Any]:
    out = tmp_path / "fanout.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--no-pin", "--json", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=time_limit,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc["results"]


def assert_everything_delivered(r: dict[str, Any], clients: int, messages: int) -> None:
    assert "error" not in r, r
    assert r["reading_clients"] == clients
    assert r["complete_clients"] == clients
    assert r["in_order"], r["errors"]
    assert r["errors"] == []
    assert r["min_per_client"] == r["max_per_client"] == messages
    assert r["delivered"] == r["expected"] == clients * messages
    assert not r["blocked"]
    assert r["msg_per_s"] > 0


def test_every_kind_delivers_every_message_in_order(tmp_path: Path) -> None:
    results = run_bench(tmp_path, "--clients", "20", "--messages", "10")
    assert set(results) == set(KINDS)
    for kind in KINDS:
        r = results[kind]
        assert "skipped" not in r, (kind, r)
        best = r["best"]
        assert_everything_delivered(best, 20, 10)
        assert best["server"]["status"] == "DONE"
        assert best["server"]["calls"] == 10
        assert best["server"]["connections"] == 20
        if kind.startswith("wsnursery"):
            assert best["server"]["reports"] == {
                "recipients": 200,
                "delivered": 200,
                "dropped": 0,
                "closed": 0,
            }


def test_stalled_client_wsnursery_policies(tmp_path: Path) -> None:
    # 2,000 messages of 64 B: more than a 4 KiB receive buffer plus the default outbox
    # (1,024 messages) hold, and less than what the default buffers of a client that
    # reads can hold even if it fell behind.
    clients, messages = 10, 2000
    results = run_bench(
        tmp_path,
        "--stall",
        "--only",
        "wsnursery",
        "--clients",
        str(clients),
        "--messages",
        str(messages),
        "--stall-timeout",
        "10",
    )
    r = results["wsnursery"]
    assert_everything_delivered(r["baseline"], clients, messages)

    drop = r["stall"]["drop"]
    assert_everything_delivered(drop, clients - 1, messages)
    stalled = drop["stalled"]
    assert stalled["drained"]
    assert stalled["errors"] == []
    assert stalled["close_code"] is None
    assert not stalled["eof"]
    assert stalled["answered_ping"] is True  # dropped messages, not the connection
    assert 0 < stalled["received"] < messages
    assert stalled["missing"] == 0  # a prefix: everything after it was dropped
    reports = drop["server"]["reports"]
    assert reports["dropped"] == messages - stalled["received"]
    assert reports["closed"] == 0
    assert drop["server"]["stats"]["dropped"] == reports["dropped"]

    close = r["stall"]["close"]
    assert_everything_delivered(close, clients - 1, messages)
    stalled = close["stalled"]
    assert stalled["drained"]
    assert stalled["close_code"] == 1008
    assert 0 < stalled["received"] < messages
    assert close["server"]["reports"]["closed"] > 0
    assert close["server"]["reports"]["dropped"] == 0


def test_stalled_client_blocks_the_peers(tmp_path: Path) -> None:
    clients, messages = 10, 2000
    results = run_bench(
        tmp_path,
        "--stall",
        "--only",
        ",".join(PEERS),
        "--clients",
        str(clients),
        "--messages",
        str(messages),
        "--stall-timeout",
        "1",
    )
    for kind in PEERS:
        s = results[kind]["stall"]["-"]
        assert s["blocked"], (kind, s)
        assert s["in_order"], (kind, s["errors"])
        assert 0 < s["delivered"] < (clients - 1) * messages
        assert s["stalled"] == {"drained": False}
        assert s["server"]["status"] == "CANCELLED"  # stopped while blocked
        assert s["server"]["calls"] < messages
