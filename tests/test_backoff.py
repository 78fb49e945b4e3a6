"""The reconnection policy on its own: Backoff, the retry counters, the classifier.

All pure: no sockets, no clock, no trio.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsnursery import (
    Backoff,
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    HandshakeTimeout,
    InvalidHandshake,
    TransportError,
    default_retry_on,
)
from wsnursery._sansio.backoff import _Retries, retry_after


def fixed(value: float) -> Callable[[], float]:
    """An ``rng`` that always draws ``value``."""
    return lambda: value


# -- Backoff ------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    backoff = Backoff()
    assert (backoff.initial, backoff.multiplier, backoff.max_delay) == (0.1, 2.0, 10.0)
    assert backoff.jitter == 0.1
    assert backoff.max_attempts is None
    assert backoff.reset_after == 10.0


def test_delays_start_at_100_ms_double_and_stop_at_10_s() -> None:
    backoff = Backoff(jitter=0)
    delays = [backoff.delay(n) for n in range(1, 11)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0])


def test_delay_of_a_huge_retry_number_is_the_cap() -> None:
    backoff = Backoff(jitter=0)
    assert backoff.delay(10_000) == 10.0  # multiplier ** 9999 overflows a float
    assert Backoff(multiplier=1.0, jitter=0).delay(10_000) == pytest.approx(0.1)


def test_jitter_only_shortens_by_at_most_its_fraction() -> None:
    backoff = Backoff(jitter=0.1)
    assert backoff.delay(1, fixed(0.0)) == pytest.approx(0.1)
    assert backoff.delay(1, fixed(0.5)) == pytest.approx(0.095)
    assert backoff.delay(1, fixed(0.999999)) == pytest.approx(0.09, abs=1e-6)
    assert backoff.delay(20, fixed(0.5)) == pytest.approx(9.5)


def test_full_jitter() -> None:
    backoff = Backoff(jitter=1.0)
    assert backoff.delay(3, fixed(0.25)) == pytest.approx(0.3)


def test_a_seeded_generator_repeats_the_same_waits() -> None:
    backoff = Backoff()
    draw_a, draw_b = random.Random(42).random, random.Random(42).random
    first = [backoff.delay(n, draw_a) for n in range(1, 8)]
    second = [backoff.delay(n, draw_b) for n in range(1, 8)]
    assert first == second
    assert first != [backoff.base_delay(n) for n in range(1, 8)]
    rng = random.Random(7).random
    spread = {backoff.delay(1, rng) for _ in range(100)}
    assert len(spread) > 50  # really random
    assert all(0.09 <= d <= 0.1 for d in spread)


def test_retry_after_lengthens_the_wait_up_to_the_cap() -> None:
    backoff = Backoff(jitter=0)
    assert backoff.delay(1, retry_after=3.0) == 3.0
    assert backoff.delay(1, retry_after=60.0) == 10.0
    assert backoff.delay(6, retry_after=1.0) == pytest.approx(3.2)  # never shortens


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": -1},
        {"initial": float("inf"), "max_delay": float("inf")},
        {"multiplier": 0.5},
        {"max_delay": 0.05},
        {"jitter": -0.1},
        {"jitter": 1.5},
        {"max_attempts": 0},
        {"reset_after": -1},
    ],
)
def test_bad_values_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_retries_are_numbered_from_one() -> None:
    with pytest.raises(ValueError):
        Backoff().delay(0)


def test_backoff_is_a_frozen_value() -> None:
    backoff = Backoff()
    with pytest.raises(AttributeError):
        backoff.initial = 1.0  # type: ignore[misc]
    assert backoff == Backoff()
    assert hash(backoff) == hash(Backoff())


def test_gives_up() -> None:
    assert not Backoff().gives_up(10**6)
    limited = Backoff(max_attempts=3)
    assert [limited.gives_up(n) for n in range(1, 5)] == [False, False, True, True]


@given(
    initial=st.floats(0, 100),
    multiplier=st.floats(1, 10),
    extra=st.floats(0, 1000),
    jitter=st.floats(0, 1),
    retry=st.integers(1, 5000),
    draw=st.floats(0, 1, exclude_max=True),
)
def test_every_delay_is_within_its_bounds(
    initial: float, multiplier: float, extra: float, jitter: float, retry: int, draw: float
) -> None:
    backoff = Backoff(initial, multiplier, initial + extra, jitter)
    base = backoff.base_delay(retry)
    delay = backoff.delay(retry, fixed(draw))
    assert 0 <= delay <= backoff.max_delay
    assert base * (1 - jitter) - 1e-9 <= delay <= base
    if retry > 1:
        assert backoff.base_delay(retry - 1) <= base  # never shrinks


# -- the counters -------------------------------------------------------------------


def test_failures_count_until_a_connection_opens() -> None:
    retries = _Retries(Backoff(max_attempts=3, jitter=0))
    assert retries.failed() == 1
    assert retries.failed() == 2
    assert not retries.gives_up()
    assert retries.opened() == 3  # the third attempt made it
    assert retries.failed() == 1
    assert retries.failed() == 2
    assert retries.failed() == 3
    assert retries.gives_up()


def test_waits_grow_across_short_connections_and_reset_after_a_long_one() -> None:
    retries = _Retries(Backoff(jitter=0, reset_after=10))
    waits = [retries.next_delay(None)]  # the first connection failed
    retries.opened()
    retries.closed(uptime=0.5)  # flapping: too short to count as healthy
    waits.append(retries.next_delay(None))
    retries.opened()
    retries.closed(uptime=9.99)
    waits.append(retries.next_delay(None))
    retries.opened()
    retries.closed(uptime=10.0)  # stayed up long enough
    waits.append(retries.next_delay(None))
    waits.append(retries.next_delay(None))
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.1, 0.2])


def test_retry_after_header() -> None:
    assert retry_after(ConnectionRejected(503, [("Retry-After", "7")])) == 7.0
    assert retry_after(ConnectionRejected(429, [("retry-after", " 2 ")])) == 2.0
    assert (
        retry_after(ConnectionRejected(429, [("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT")]))
        is None
    )
    assert retry_after(ConnectionRejected(429)) is None
    assert retry_after(ConnectionRejected(500, [("Retry-After", "7")])) is None
    assert retry_after(TransportError("x")) is None


# -- the classifier -----------------------------------------------------------------


def caused(exc: Exception, cause: BaseException) -> Exception:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (ConnectionClosed(CloseReason(1000)), True),
        (ConnectionClosed(CloseReason(1006)), True),
        (ConnectionClosed(CloseReason(1011, "keepalive ping timeout")), True),
        (caused(TransportError("refused"), ConnectionRefusedError(111, "refused")), True),
        (caused(TransportError("tls"), ssl.SSLError("bad record mac")), True),
        (caused(TransportError("cert"), ssl.SSLCertVerificationError("unknown ca")), False),
        (HandshakeTimeout("slow"), True),
        (ConnectionRejected(500), True),
        (ConnectionRejected(502), True),
        (ConnectionRejected(503), True),
        (ConnectionRejected(504), True),
        (ConnectionRejected(429), True),
        (ConnectionRejected(408), True),
        (ConnectionRejected(400), False),
        (ConnectionRejected(401), False),
        (ConnectionRejected(403), False),
        (ConnectionRejected(404), False),
        (ConnectionRejected(426), False),
        (ConnectionRejected(301), False),
        (InvalidHandshake("wrong Sec-WebSocket-Accept"), False),
        (caused(InvalidHandshake("closed before answering"), EOFError()), True),
        (OSError("network down"), True),
        (TimeoutError(), True),
        (ValueError("a bug"), False),
    ],
    ids=lambda value: repr(value) if isinstance(value, bool) else type(value).__name__,
)
def test_default_classification(error: Exception, retry: bool) -> None:
    assert default_retry_on(error) is retry
