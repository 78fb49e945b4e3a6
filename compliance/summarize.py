#!/usr/bin/env python3
"""Summarize an Autobahn|Testsuite report (the index.json wstest writes).

    python3 compliance/summarize.py REPORT_DIR_OR_INDEX_JSON [--label server] [--agent NAME]
        [--expect N | --wstest-log WSTEST_LOG]

Prints, for each agent in the report (or only --agent):

    autobahn LABEL: OK=.. NON-STRICT=.. INFORMATIONAL=.. UNIMPLEMENTED=.. FAILED=..

(a verdict other than these five is appended as NAME=count and counts as a
failure; MISSING=n is appended when fewer cases than --expect, or than the
"Cases = [...]" line of --wstest-log lists, were reported),
then the NON-STRICT, INFORMATIONAL and FAILED case ids with wstest's reason,
UNIMPLEMENTED counts per group, and every case whose closing handshake was not
clean (wstest's per-case "behaviorClose"), which on its own fails no run.

compliance/run.py calls summarize() directly and also writes the result as
summary.json beside index.json. Exit status: 0 no case failed or is missing,
1 some case failed or is missing, 2 the report cannot be read.
Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from collections import Counter
from typing import Any

VERDICTS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
PASSING = frozenset({"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"})
CLEAN_CLOSE = frozenset({"OK", "INFORMATIONAL", "UNIMPLEMENTED"})


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in case_id.split("."))


def load_case(outdir: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The per-case JSON wstest writes beside index.json ({} when absent)."""
    name = entry.get("reportfile")
    if not name:
        return {}
    try:
        with open(os.path.join(outdir, name), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _close_facts(detail: dict[str, Any], entry: dict[str, Any]) -> str:
    """What actually happened at close, in a few words."""
    facts = []
    expected = (detail.get("expectedClose") or {}).get("closeCode")
    got = entry.get("remoteCloseCode", detail.get("remoteCloseCode"))
    if expected is not None:
        text = f"expected close code {expected}, got {got}"
        if detail.get("remoteCloseReason"):
            text += f" {detail['remoteCloseReason']!r}"
        facts.append(text)
    if detail.get("wasClean") is False:
        why = detail.get("wasNotCleanReason")
        facts.append("not clean" + (f" ({why})" if why else ""))
    if detail.get("wasClean") is False and detail.get("droppedByMe"):
        facts.append("TCP dropped by wstest")
    for flag, words in (
        ("failedByMe", "failed by wstest"),
        ("wasCloseHandshakeTimeout", "close handshake timed out"),
        ("wasServerConnectionDropTimeout", "server did not drop TCP in time"),
        ("wasOpenHandshakeTimeout", "opening handshake timed out"),
    ):
        if detail.get(flag):
            facts.append(words)
    return "; ".join(facts)


def _event(event: Any) -> str:
    """['message', payload, is_binary] / ['ping', payload] / ... in a few characters."""
    if not isinstance(event, list) or not event:
        return repr(event)[:40]
    kind, payload = str(event[0]), event[1] if len(event) > 1 else None
    if kind == "message" and len(event) > 2:
        kind = "binary" if event[2] else "text"
    if isinstance(payload, str) and payload:
        return f"{kind}({payload[:20]!r}{'...' if len(payload) > 20 else ''})"
    if isinstance(payload, int):
        return f"{kind}({payload})"
    return kind


def _events(events: Any, limit: int = 4) -> str:
    if not isinstance(events, list):
        return "?"
    shown = [_event(e) for e in events[:limit]]
    if len(events) > limit:
        shown.append(f"... {len(events)} events")
    return "[" + ", ".join(shown) + "]"


def case_reason(detail: dict[str, Any], entry: dict[str, Any]) -> str:
    """wstest's reason for a case's protocol verdict."""
    parts = []
    if detail.get("result"):
        parts.append(str(detail["result"]).strip())
    expected = detail.get("expected")
    if entry.get("behavior") != "OK" and isinstance(expected, dict) and "OK" in expected:
        received = detail.get("received")
        if received != expected["OK"]:
            parts.append(f"received {_events(received)}, OK wants {_events(expected['OK'])}")
    facts = _close_facts(detail, entry)
    if facts:
        parts.append(facts)
    return " | ".join(parts) or "(no detail in the case report)"


def close_reason(detail: dict[str, Any], entry: dict[str, Any]) -> str:
    """wstest's reason for a case's closing-handshake verdict."""
    parts = []
    if detail.get("resultClose"):
        parts.append(str(detail["resultClose"]).strip())
    facts = _close_facts(detail, entry)
    if facts:
        parts.append(facts)
    return " | ".join(parts) or "(no detail in the case report)"


def _ids(cases: dict[str, dict[str, Any]], pred: Any) -> list[str]:
    return sorted((cid for cid, e in cases.items() if pred(e)), key=case_key)


def cases_from_log(wstest_log: str) -> list[str] | None:
    """The case ids wstest said it would run ("Cases = [...]" in its output)."""
    try:
        with open(wstest_log, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Cases = ["):
                    ids = ast.literal_eval(line.split("=", 1)[1].strip())
                    return [str(i) for i in ids]
    except (OSError, ValueError, SyntaxError):
        pass
    return None


def summarize(
    index_path: str,
    label: str,
    agent: str | None = None,
    expect: int | None = None,
    out: Any = None,
    expected_ids: list[str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Print the summary; return (exit status, machine-readable summary)."""
    out = out or sys.stdout
    if expected_ids is not None:
        expect = len(expected_ids)

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    if os.path.isdir(index_path):
        index_path = os.path.join(index_path, "index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        say(f"autobahn {label}: cannot read the report {index_path}: {exc}")
        return 2, {"error": f"cannot read {index_path}: {exc}"}
    outdir = os.path.dirname(os.path.abspath(index_path))
    if agent is not None and agent not in index:
        if expect:
            index[agent] = {}  # the agent ran no case: every case is missing
        else:
            say(
                f"autobahn {label}: no results for agent {agent!r} in {index_path} "
                f"(agents: {sorted(index)})"
            )
            return 2, {"error": f"no agent {agent!r} in report"}
    agents = [agent] if agent is not None else sorted(index)
    if not agents:
        say(f"autobahn {label}: the report {index_path} holds no agent")
        return 2, {"error": "empty report"}

    status = 0
    result: dict[str, Any] = {"label": label, "report": index_path, "agents": {}}
    for name in agents:
        cases: dict[str, dict[str, Any]] = index[name]
        counts = Counter(str(e.get("behavior", "NO-VERDICT")) for e in cases.values())
        missing = max(0, expect - len(cases)) if expect is not None else 0
        fields = [f"{v}={counts.get(v, 0)}" for v in VERDICTS]
        fields += [
            f"{v.replace(' ', '-')}={n}" for v, n in sorted(counts.items()) if v not in VERDICTS
        ]
        if missing:
            fields.append(f"MISSING={missing}")
        prefix = f"autobahn {label}" + (f" [{name}]" if len(agents) > 1 else "")
        say(f"{prefix}: {' '.join(fields)}")

        failed = _ids(cases, lambda e: e.get("behavior") not in PASSING)
        unclean = _ids(cases, lambda e: e.get("behaviorClose") not in CLEAN_CLOSE)
        agent_result: dict[str, Any] = {
            "counts": dict(counts),
            "reported": len(cases),
            "expected": expect,
            "missing": missing,
            "missing_ids": [],
            "failed": {},
            "non_strict": {},
            "informational": {},
            "unclean_close": {},
        }
        for verdict, key in (("NON-STRICT", "non_strict"), ("INFORMATIONAL", "informational")):
            ids = _ids(cases, lambda e, v=verdict: e.get("behavior") == v)
            if ids:
                say(f"  {verdict} ({len(ids)}): {' '.join(ids)}")
                for cid in ids:
                    why = case_reason(load_case(outdir, cases[cid]), cases[cid])
                    agent_result[key][cid] = why
                    say(f"    {cid}: {why}")
        groups = Counter(
            cid.split(".")[0] for cid, e in cases.items() if e.get("behavior") == "UNIMPLEMENTED"
        )
        if groups:
            say(
                "  UNIMPLEMENTED by group: "
                + " ".join(
                    f"{g}.*={n}" for g, n in sorted(groups.items(), key=lambda x: case_key(x[0]))
                )
            )
        if failed:
            say(f"  FAILED ({len(failed)}): {' '.join(failed)}")
            for cid in failed:
                entry = cases[cid]
                why = case_reason(load_case(outdir, entry), entry)
                agent_result["failed"][cid] = {"behavior": entry.get("behavior"), "reason": why}
                say(f"    {cid} {entry.get('behavior')}: {why}")
        if unclean:
            say(f"  unclean close ({len(unclean)}, behaviorClose not OK): {' '.join(unclean)}")
            for cid in unclean:
                entry = cases[cid]
                why = close_reason(load_case(outdir, entry), entry)
                agent_result["unclean_close"][cid] = {
                    "behavior": entry.get("behavior"),
                    "behaviorClose": entry.get("behaviorClose"),
                    "reason": why,
                }
                say(
                    f"    {cid} {entry.get('behaviorClose')} (behavior {entry.get('behavior')}): {why}"
                )
        if missing and expected_ids is not None:
            absent = sorted(set(expected_ids) - set(cases), key=case_key)
            agent_result["missing_ids"] = absent
            say(
                f"  MISSING ({len(absent)}, no verdict: the connection never ended?): {' '.join(absent)}"
            )
        if failed or missing:
            status = 1
        result["agents"][name] = agent_result
    result["status"] = status
    return status, result


def main() -> int:
    parser = argparse.ArgumentParser(description="Summarize an Autobahn|Testsuite index.json.")
    parser.add_argument("index", help="index.json, or the report directory holding it")
    parser.add_argument(
        "--label", default="report", help="the word after 'autobahn' (server, client)"
    )
    parser.add_argument("--agent", help="only this agent (default: every agent in the report)")
    parser.add_argument("--expect", type=int, help="how many cases should be in the report")
    parser.add_argument(
        "--wstest-log", help="wstest's output: the cases it was to run are read from it"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE")
    args = parser.parse_args()
    ids = cases_from_log(args.wstest_log) if args.wstest_log else None
    status, result = summarize(args.index, args.label, args.agent, args.expect, expected_ids=ids)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
