"""The chat demo's page in a real headless Chromium (Debian's ``chromium`` package).

``python -m wsnursery chat`` runs as a process; Playwright's sync API drives
two pages of one browser. Both join a room, one sends, the other shows the
message; then the server process is stopped (SIGINT) and started again on the
same port, and both pages must reconnect by themselves, join the room again
and carry a new message.

``scripts/test`` installs Chromium (``apt-get install chromium``); this test
fails, rather than skips, when it is missing. On failure, a screenshot of each
page goes to ``/tmp/wsnursery-chat-<nick>.png``.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Quiet and self-contained: no sandbox (root), no GPU, no calls to the vendor's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000  # the longest any one expectation may take
HOST = "127.0.0.1"


class ChatProcess:
    """``python -m wsnursery chat`` on a port, stopped with SIGINT."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsnursery", "chat", "--host", HOST, "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = b""
        deadline = time.monotonic() + 15
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                self.kill()
                raise AssertionError(f"no start line from the chat command: {line!r}")
            chunk = os.read(self.proc.stdout.fileno(), 1)
            if not chunk:
                self.kill()
                raise AssertionError(f"the chat command ended: {line!r}")
            line += chunk
        found = re.search(rb"wsnursery chat on http://127\.0\.0\.1:(\d+)/", line)
        assert found, line
        self.port = int(found.group(1))

    def stop(self) -> None:
        """SIGINT, then wait for a clean exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            assert self.proc.wait(timeout=15) == 0
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextmanager
def chat_process(port: int = 0) -> Iterator[ChatProcess]:
    server = ChatProcess(port)
    try:
        yield server
    finally:
        server.kill()


class ChatPage:
    """One browser page of the chat, with what its WebSockets did."""

    def __init__(self, browser: Browser, url: str, nick: str) -> None:
        self.nick = nick
        self.page: Page = browser.new_page(viewport={"width": 1000, "height": 700})
        self.sockets = 0
        self.log: list[str] = []
        self.page.on("websocket", self._on_websocket)
        self.page.on("console", lambda message: self.log.append(f"console: {message.text}"))
        self.page.on("pageerror", lambda error: self.log.append(f"page error: {error}"))
        self.page.goto(url)

    def _on_websocket(self, ws: object) -> None:
        self.sockets += 1

    def join(self, room: str) -> None:
        self.page.fill("#nick", self.nick)
        self.page.fill("#room", room)
        self.page.click("#join")
        expect(self.page.locator("#room-name")).to_have_text(room, timeout=WAIT_MS)

    def say(self, text: str) -> None:
        expect(self.page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")

    def expect_message(self, sender: str, text: str) -> None:
        row = self.page.locator("#messages li.msg").filter(has_text=text)
        expect(row).to_have_count(1, timeout=WAIT_MS)
        expect(row.locator(".from")).to_have_text(sender)
        expect(row.locator(".text")).to_have_text(text)

    def screenshot(self) -> str:
        path = f"/tmp/wsnursery-chat-{self.nick}.png"
        self.page.screenshot(path=path)
        return path


def test_two_pages_chat_and_reconnect_after_a_server_restart() -> None:
    if not os.access(CHROMIUM, os.X_OK):  # fail, never skip: CI must run this test
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/test does)")
    with chat_process() as server, sync_playwright() as playwright:
        url = f"http://{HOST}:{server.port}/"
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=WAIT_MS
        )
        pages: list[ChatPage] = []
        try:
            alice = ChatPage(browser, url, "alice")
            pages.append(alice)
            bob = ChatPage(browser, url, "bob")
            pages.append(bob)
            for page in pages:
                expect(page.page.locator("#status")).to_have_attribute(
                    "data-state", "open", timeout=WAIT_MS
                )
                page.join("lobby")
            for page in pages:
                expect(page.page.locator("#count")).to_have_text("2", timeout=WAIT_MS)
            expect(alice.page.locator("#messages .notice").last).to_have_text("bob joined")

            # One sends, the other shows it; user text is text, never markup.
            alice.say("hello <b>bob</b> & co")
            for page in pages:
                page.expect_message("alice", "hello <b>bob</b> & co")
                expect(page.page.locator("#messages b")).to_have_count(0)
            assert (alice.sockets, bob.sockets) == (1, 1)

            # Stop the server and start it again on the same port.
            server.stop()
            with chat_process(server.port) as again:
                assert again.port == server.port
                for page in pages:
                    # The page noticed, retried with backoff, and joined again.
                    notices = page.page.locator("#messages .notice")
                    expect(notices.filter(has_text="disconnected; reconnecting")).to_have_count(
                        1, timeout=WAIT_MS
                    )
                    expect(notices.filter(has_text=f"as {page.nick}")).to_have_count(
                        2, timeout=WAIT_MS
                    )
                    expect(page.page.locator("#status")).to_have_attribute(
                        "data-state", "open", timeout=WAIT_MS
                    )
                    expect(page.page.locator("#count")).to_have_text("2", timeout=WAIT_MS)
                    assert page.sockets >= 2
                    # What was shown before the restart is still there.
                    page.expect_message("alice", "hello <b>bob</b> & co")

                bob.say("welcome back")
                for page in pages:
                    page.expect_message("bob", "welcome back")
                assert not any("page error" in line for p in pages for line in p.log), [
                    p.log for p in pages
                ]
                again.stop()
        except BaseException:
            for page in pages:
                try:
                    print(f"screenshot: {page.screenshot()}; log: {page.log}")
                except Exception as exc:  # the browser may be gone
                    print(f"no screenshot of {page.nick}: {exc!r}")
            raise
        finally:
            browser.close()
