"""Issue 10: public calls raise the one exception a user expects, with context intact.

The rules of ``collapse_exception_groups`` as units, then end to end through
every client-side context manager (real TCP on 127.0.0.1 where there is a
peer), then the caller's deadline inside a block, the backplane start, the
testing helpers' exit and the TLS options on ``ws://``.
"""

from __future__ import annotations

import functools
import ssl
import sys
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio

import wsnursery
from _helpers import HOST, assert_no_leftover_tasks, count_tasks, serving
from wsnursery import (
    Broadcaster,
    RedisBackplane,
    WebSocketRequest,
    connect_websocket,
    connect_websocket_url,
    open_reconnecting_websocket,
    open_websocket,
    open_websocket_url,
    serve_websocket,
)
from wsnursery._util import collapse_exception_groups
from wsnursery.testing import open_handler_client, open_websocket_pair

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

# -- the rules, one by one -------------------------------------------------------------


async def a_cancelled() -> trio.Cancelled:
    """A real trio.Cancelled (they cannot be made directly)."""
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("not cancelled")


def collapse(group: BaseException, **options: bool) -> BaseException:
    """What comes out of ``collapse_exception_groups`` when ``group`` is raised in it."""
    try:
        with collapse_exception_groups(**options):
            raise group
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


def test_rule_single_leaf_group_is_the_leaf() -> None:
    error = ValueError("x")
    nested = ExceptionGroup("a", [ExceptionGroup("b", [ExceptionGroup("c", [error])])])
    assert collapse(nested) is error


def test_rule_same_object_repeated_is_it() -> None:
    error = ValueError("x")
    group = ExceptionGroup("a", [error, ExceptionGroup("b", [error]), error])
    assert collapse(group) is error


async def test_rule_user_error_and_cancelled_is_the_error() -> None:
    error = ValueError("x")
    group = BaseExceptionGroup(
        "a", [await a_cancelled(), BaseExceptionGroup("b", [error, await a_cancelled()])]
    )
    assert collapse(group) is error


async def test_rule_only_cancelled_is_one_cancelled() -> None:
    first, second = await a_cancelled(), await a_cancelled()
    group = BaseExceptionGroup("a", [BaseExceptionGroup("b", [first]), second])
    assert collapse(group) is first


async def test_rule_only_cancelled_is_caught_by_the_cancelled_scope() -> None:
    with trio.fail_after(2), trio.CancelScope() as outer, collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(trio.sleep_forever)
            outer.cancel()
            await trio.sleep_forever()
    assert outer.cancelled_caught


async def test_rule_several_distinct_errors_stay_a_group() -> None:
    group = BaseExceptionGroup("a", [ValueError("x"), KeyError("y"), await a_cancelled()])
    assert collapse(group) is group


async def test_rule_cancelled_first_for_background_connections() -> None:
    cancelled, error = await a_cancelled(), ConnectionError("lost")
    assert collapse(BaseExceptionGroup("a", [error, cancelled]), cancelled_first=True) is cancelled
    assert collapse(ExceptionGroup("a", [error, KeyError("y")]), cancelled_first=True) is error


def raise_while_handling() -> None:
    try:
        raise KeyError("the real context")
    except KeyError:
        raise ValueError("x")  # noqa: B904 - the implicit context is the point


def raise_from() -> None:
    raise ValueError("x") from OSError("the cause")


@pytest.mark.parametrize("raiser", [raise_while_handling, raise_from])
def test_context_cause_and_traceback_untouched(raiser: Callable[[], None]) -> None:
    try:
        raiser()
    except ValueError as exc:
        error = exc
    before = (error.__context__, error.__cause__, error.__suppress_context__)
    inner_frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    assert collapse(ExceptionGroup("g", [error])) is error
    assert (error.__context__, error.__cause__, error.__suppress_context__) == before
    frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    assert frames[-len(inner_frames) :] == inner_frames
    text = "".join(traceback.format_exception(error))
    assert "ExceptionGroup" not in text
    if raiser is raise_while_handling:
        assert "During handling of the above exception" in text
        assert "the real context" in text
    else:
        assert "the cause" in text


# -- end to end: a body that raises while an outer scope cancels it ---------------------


async def echo(request: WebSocketRequest) -> None:
    conn = await request.accept()
    async for message in conn:
        await conn.send_message(message)


Opener = Callable[[int], AbstractAsyncContextManager[Any]]


@asynccontextmanager
async def _pair(port: int) -> AsyncIterator[Any]:
    async with open_websocket_pair(close_timeout=1) as (client, _):
        yield client


OPENERS: dict[str, Opener] = {
    "open_websocket": lambda port: open_websocket(HOST, port, close_timeout=1),
    "open_websocket_url": lambda port: open_websocket_url(f"ws://{HOST}:{port}/", close_timeout=1),
    "open_reconnecting_websocket": lambda port: open_reconnecting_websocket(
        f"ws://{HOST}:{port}/", close_timeout=1
    ),
    "open_handler_client": lambda port: open_handler_client(echo, close_timeout=1),
    "open_websocket_pair": _pair,
}


def failing_cleanup() -> None:
    try:
        raise KeyError("the real context")
    except KeyError:
        raise ValueError("cleanup failed")  # noqa: B904


@pytest.mark.parametrize("name", OPENERS)
async def test_body_error_under_outer_cancel_is_the_error(name: str) -> None:
    opener = OPENERS[name]
    with trio.fail_after(5):
        async with serving(echo, close_timeout=1) as server:
            baseline = count_tasks()
            try:
                with trio.move_on_after(0.1):
                    async with opener(server.port):
                        try:
                            await trio.sleep(5)
                        finally:
                            failing_cleanup()
            except BaseException as exc:
                error = exc
            else:
                raise AssertionError("nothing raised")
            assert type(error) is ValueError
            assert isinstance(error.__context__, KeyError)
            assert not error.__suppress_context__
            frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
            assert frames[-1] == "failing_cleanup"
            assert "test_body_error_under_outer_cancel_is_the_error" in frames
            await assert_no_leftover_tasks(baseline)


@pytest.mark.parametrize("name", OPENERS)
async def test_caught_body_error_still_leaves_the_cancelled_scope(name: str) -> None:
    opener = OPENERS[name]
    with trio.fail_after(5):
        async with serving(echo, close_timeout=1) as server:
            reached = False
            with trio.move_on_after(0.1) as outer:
                try:
                    async with opener(server.port):
                        try:
                            await trio.sleep(5)
                        finally:
                            failing_cleanup()
                except ValueError:
                    pass
                await trio.sleep(5)  # the scope is still cancelled: this raises at once
                reached = True
            assert outer.cancelled_caught
            assert not reached


@pytest.mark.parametrize("name", OPENERS)
async def test_outer_cancel_is_caught_by_its_scope(name: str) -> None:
    opener = OPENERS[name]
    with trio.fail_after(5):
        async with serving(echo, close_timeout=1) as server:
            with trio.move_on_after(0.1) as outer:
                async with opener(server.port):
                    await trio.sleep(5)
            assert outer.cancelled_caught


# -- the caller's deadline inside the block ----------------------------------------------


@pytest.mark.parametrize("name", OPENERS)
async def test_caller_deadline_is_visible_in_the_block(name: str) -> None:
    opener = OPENERS[name]
    with trio.fail_after(5):
        async with serving(echo, close_timeout=1) as server:
            with trio.move_on_after(3):
                expected = trio.current_effective_deadline()
                async with opener(server.port):
                    assert trio.current_effective_deadline() == pytest.approx(expected)


@pytest.mark.parametrize(
    "name", ["open_websocket", "open_websocket_url", "open_reconnecting_websocket"]
)
async def test_block_past_the_deadline_is_cancelled_and_closes_1001(name: str) -> None:
    opener = OPENERS[name]
    codes: list[int] = []

    async def watch(request: WebSocketRequest) -> None:
        conn = await request.accept()
        codes.append((await conn.wait_closed()).code)

    with trio.fail_after(5):
        async with serving(watch, close_timeout=1) as server:
            start = trio.current_time()
            with trio.move_on_after(0.3) as outer:
                async with opener(server.port):
                    await trio.sleep(3)
            assert outer.cancelled_caught
            assert trio.current_time() - start < 1.5
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(2):
                while not codes:
                    await trio.sleep(0.01)
            assert codes == [1001]


async def test_testing_helper_block_past_the_deadline_closes_1001() -> None:
    codes: list[int] = []

    async def watch(request: WebSocketRequest) -> None:
        conn = await request.accept()
        codes.append((await conn.wait_closed()).code)

    with trio.fail_after(5):
        with trio.move_on_after(0.3) as outer:
            async with open_handler_client(watch, close_timeout=1):
                await trio.sleep(3)
        assert outer.cancelled_caught
        assert codes == [1001]


# -- a server cancelled while its backplane connects -------------------------------------


async def _hold(stream: trio.SocketStream) -> None:
    async for _ in stream:  # reads, never answers; ends when the client hangs up
        pass


@asynccontextmanager
async def silent_redis() -> AsyncIterator[str]:
    """A redis:// URL of a 127.0.0.1 port that accepts TCP and never answers."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, _hold, 0, host=HOST))
        port = listeners[0].socket.getsockname()[1]
        yield f"redis://{HOST}:{port}"
        nursery.cancel_scope.cancel()


async def _serve_direct(url: str) -> None:
    await serve_websocket(echo, HOST, 0, backplane=RedisBackplane(url, connect_timeout=5))


async def _serve_started(url: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve_websocket, echo, HOST, 0, backplane=RedisBackplane(url, connect_timeout=5)
            )
        )


async def _broadcaster(url: str) -> None:
    async with Broadcaster(backplane=RedisBackplane(url, connect_timeout=5)):
        await trio.sleep_forever()


@pytest.mark.parametrize("start", [_serve_direct, _serve_started, _broadcaster])
async def test_cancel_while_the_backplane_connects_is_prompt(
    start: Callable[[str], Any],
) -> None:
    with trio.fail_after(4):
        async with silent_redis() as url:
            baseline = count_tasks()
            with trio.move_on_after(0.3) as outer:
                await start(url)
            took = trio.current_time() - (outer.deadline - 0.3)
            assert outer.cancelled_caught
            assert took < 1.0
            await assert_no_leftover_tasks(baseline)


# -- leaving a testing helper is prompt ---------------------------------------------------


async def _deaf_handler(request: WebSocketRequest) -> None:
    await request.accept()
    await trio.sleep_forever()  # ignores the close


class _SleepyHooks(wsnursery.WebSocketHandler):
    async def on_text(self, conn: Any, text: str) -> None:
        await trio.sleep_forever()  # still "handling" when the client leaves: no close echo


@pytest.mark.parametrize("handler", [_deaf_handler, _SleepyHooks()], ids=["function", "hooks"])
async def test_leaving_open_handler_client_is_prompt(handler: Any) -> None:
    baseline = count_tasks()
    with trio.fail_after(2):
        async with open_handler_client(handler, ping_interval=20, close_timeout=0.5) as client:
            await client.send_message("hi")
    await assert_no_leftover_tasks(baseline)


async def test_leaving_open_websocket_pair_is_prompt() -> None:
    baseline = count_tasks()
    with trio.fail_after(2):
        async with open_websocket_pair(ping_interval=20, close_timeout=1) as (client, server):
            await client.send_message("hi")
            assert await server.get_message() == "hi"
    await assert_no_leftover_tasks(baseline)


# -- TLS options on ws:// ------------------------------------------------------------------


def _tls_options() -> list[dict[str, Any]]:
    # The files are never read: the mistake is reported before any TLS work.
    return [
        {"ssl_context": ssl.create_default_context()},
        {"cafile": __file__},
        {"certfile": __file__},
    ]


@pytest.mark.parametrize("options", _tls_options(), ids=["ssl_context", "cafile", "certfile"])
async def test_tls_options_on_plain_url_raise_at_once(options: dict[str, Any]) -> None:
    with trio.fail_after(2):
        async with serving(echo) as server:
            url = f"ws://{HOST}:{server.port}/"
            async with trio.open_nursery() as nursery:
                with pytest.raises(ValueError, match="TLS"):
                    await connect_websocket_url(nursery, url, **options)
                with pytest.raises(ValueError, match="TLS"):
                    await connect_websocket(nursery, HOST, server.port, use_ssl=False, **options)
            with pytest.raises(ValueError, match="TLS"):
                async with open_websocket_url(url, **options):
                    pass
            with pytest.raises(ValueError, match="TLS"):
                async with open_websocket(HOST, server.port, use_ssl=False, **options):
                    pass
            with pytest.raises(ValueError, match="TLS"):
                async with open_reconnecting_websocket(url, **options):
                    pass
