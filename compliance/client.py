#!/usr/bin/env python3
"""Autobahn|Testsuite client loop on wsnursery (the testee of wstest's fuzzingserver).

    python compliance/client.py ws://127.0.0.1:PORT [AGENT]

Reads the number of cases from BASE_URL/getCaseCount, then for N = 1..count opens
BASE_URL/runCase?case=N&agent=AGENT and echoes every message back as it came (text
as text, binary as binary; up to 16 MiB) until the connection closes, and finally
asks BASE_URL/updateReports?agent=AGENT to write the report. The verdicts are
wstest's: an exception in a case is logged and the loop goes on. Each case is
bounded by CASE_TIMEOUT_S so that a hung case cannot stall the run. Only
ws://127.0.0.1 URLs are accepted. compliance/run.py runs this (`run.py client`).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from urllib.parse import quote, urlsplit

import trio

import wsnursery

MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # the suite's largest messages (9.1.6, 9.2.6) are 16 MiB
CASE_TIMEOUT_S = 120
CONTROL_TIMEOUT_S = 300  # /updateReports writes hundreds of files before it closes
_SEEN: set[type[BaseException]] = set()


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def case_count(base: str) -> int:
    with trio.fail_after(CONTROL_TIMEOUT_S):
        async with wsnursery.open_websocket_url(f"{base}/getCaseCount") as ws:
            return int(await ws.get_message())


async def run_case(base: str, case: int, agent: str) -> None:
    url = f"{base}/runCase?case={case}&agent={quote(agent)}"
    started = time.monotonic()
    with trio.move_on_after(CASE_TIMEOUT_S) as scope:
        try:
            async with wsnursery.open_websocket_url(url, max_message_size=MAX_MESSAGE_SIZE) as ws:
                while True:
                    message = await ws.get_message()
                    await ws.send_message(message)
        except wsnursery.ConnectionClosed:
            pass
        except Exception as exc:  # the verdict is wstest's; go on with the next case
            note(f"case {case}: ended with {type(exc).__name__}: {exc}")
            if type(exc) not in _SEEN:  # the first traceback of each kind, for diagnosis
                _SEEN.add(type(exc))
                note("".join(traceback.format_exception(exc)).rstrip())
    if scope.cancelled_caught:
        note(f"case {case}: stopped after {CASE_TIMEOUT_S} s")
    elif time.monotonic() - started > 10:
        note(f"case {case}: took {time.monotonic() - started:.1f} s")


async def update_reports(base: str, agent: str) -> None:
    with trio.fail_after(CONTROL_TIMEOUT_S):
        try:
            async with wsnursery.open_websocket_url(
                f"{base}/updateReports?agent={quote(agent)}"
            ) as ws:
                await ws.get_message()  # wstest sends nothing; it closes once the report is written
        except wsnursery.ConnectionClosed:
            pass


async def main(base: str, agent: str) -> None:
    count = await case_count(base)
    note(f"{agent}: running {count} cases against {base}")
    started = time.monotonic()
    for case in range(1, count + 1):
        await run_case(base, case, agent)
    note(f"{agent}: {count} cases in {time.monotonic() - started:.1f} s; writing the report")
    await update_reports(base, agent)
    note(f"{agent}: done")


def cli() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("base_url", help="ws://127.0.0.1:PORT of wstest's fuzzingserver")
    parser.add_argument("agent", nargs="?", default="wsnursery", help="name in the report")
    args = parser.parse_args()
    url = urlsplit(args.base_url)
    if url.scheme != "ws" or url.hostname != "127.0.0.1" or url.port is None:
        parser.error(f"only ws://127.0.0.1:PORT URLs are accepted, not {args.base_url!r}")
    trio.run(main, f"ws://127.0.0.1:{url.port}", args.agent)


if __name__ == "__main__":
    cli()
