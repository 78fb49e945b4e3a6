"""How long a reconnecting client waits between attempts, and when it gives up.

Pure: no I/O, no clock. The reconnecting client (``_reconnect.py``) and the
Redis backplane hand these the facts (an attempt failed, a connection was up
for so many seconds) and sleep what they answer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from .exceptions import ConnectionRejected

__all__ = ["Backoff", "_Retries", "retry_after"]


# -- the policy ----------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """How long to wait between connection attempts, and when to give up.

    The wait before retry number *n* (1 for the first retry) is
    ``min(max_delay, initial * multiplier ** (n - 1))``, shortened by a random
    fraction of at most ``jitter``: 0.1, 0.2, 0.4, 0.8 ... 10 s with the
    defaults, each up to 10 % shorter. Jitter only ever shortens a wait, so
    no wait is longer than ``max_delay``; it spreads the retries of many
    clients that lost the same server at the same moment (raise it to 1.0,
    "full jitter", for large fleets).

    The retry count goes back to zero once a connection has stayed open for
    ``reset_after`` seconds. A server that accepts and then drops every
    connection at once therefore sees slower and slower retries instead of a
    reconnection every 100 ms.

    A pure value: no I/O, no clock. :meth:`delay` takes its random numbers from
    the ``rng`` function it is given.

    Attributes:
        initial: The first wait, in seconds.
        multiplier: Each wait is this many times the previous one (1.0 for a
            constant wait).
        max_delay: No wait is longer.
        jitter: The largest fraction a wait is shortened by, from 0 (none) to 1.
        max_attempts: Give up after this many failed attempts in a row (a
            connection that opens resets the count); None retries forever.
        reset_after: Seconds a connection must stay open for the next
            reconnection to start again from ``initial``.
    """

    initial: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 10.0
    jitter: float = 0.1
    max_attempts: int | None = None
    reset_after: float = 10.0

    def __post_init__(self) -> None:
        if not (self.initial >= 0 and math.isfinite(self.initial)):
            raise ValueError(f"initial must be a finite number >= 0, not {self.initial!r}")
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier must be >= 1, not {self.multiplier!r}")
        if not self.max_delay >= self.initial:
            raise ValueError(f"max_delay must be >= initial, not {self.max_delay!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, not {self.jitter!r}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be None or >= 1, not {self.max_attempts!r}")
        if not self.reset_after >= 0:
            raise ValueError(f"reset_after must be >= 0, not {self.reset_after!r}")

    def base_delay(self, retry: int) -> float:
        """The wait before retry number ``retry`` (from 1), before jitter."""
        if retry < 1:
            raise ValueError(f"retries are numbered from 1, not {retry!r}")
        try:
            delay = self.initial * self.multiplier ** (retry - 1)
        except OverflowError:
            delay = math.inf
        return min(delay, self.max_delay)

    def delay(
        self,
        retry: int,
        rng: Callable[[], float] | None = None,
        *,
        retry_after: float | None = None,
    ) -> float:
        """The wait, in seconds, before retry number ``retry`` (from 1).

        Args:
            retry: 1 for the first retry, 2 for the second...
            rng: Where the jitter comes from: a function returning a float
                in [0, 1), ``random.random`` when None. Pass the ``random``
                method of a seeded ``random.Random(seed)`` to get the same
                waits every time.
            retry_after: What the server asked for in a ``Retry-After``
                header: the wait is at least this long, but still at most
                ``max_delay``.
        """
        delay = self.base_delay(retry)
        if self.jitter:
            delay *= 1.0 - self.jitter * (rng or random.random)()
        if retry_after is not None and retry_after > delay:
            delay = min(retry_after, self.max_delay)
        return delay

    def gives_up(self, failures: int) -> bool:
        """True once ``failures`` failed attempts in a row are too many."""
        return self.max_attempts is not None and failures >= self.max_attempts


class _Retries:
    """The counters a reconnecting client keeps, in terms of :class:`Backoff` (pure).

    ``failures`` counts failed attempts since the last connection opened (it
    decides when to give up); ``retry`` counts retries since the last
    connection that stayed up ``reset_after`` seconds (it picks the wait).
    """

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.failures = 0
        self.retry = 0

    def failed(self) -> int:
        """An attempt failed; return its number in the current run of attempts."""
        self.failures += 1
        return self.failures

    def gives_up(self) -> bool:
        return self.backoff.gives_up(self.failures)

    def opened(self) -> int:
        """An attempt made a connection; return which attempt it was (1: the first)."""
        attempt = self.failures + 1
        self.failures = 0
        return attempt

    def closed(self, uptime: float) -> None:
        """A connection ended after ``uptime`` seconds."""
        if uptime >= self.backoff.reset_after:
            self.retry = 0

    def next_delay(
        self, rng: Callable[[], float] | None, retry_after: float | None = None
    ) -> float:
        """Count one more retry and return the wait before it."""
        self.retry += 1
        return self.backoff.delay(self.retry, rng, retry_after=retry_after)


def retry_after(error: BaseException) -> float | None:
    """The seconds of a ``Retry-After`` header on a 429 or 503 answer, if any.

    Only the delta-seconds form is understood; an HTTP date is ignored.
    """
    if not isinstance(error, ConnectionRejected) or error.status_code not in (429, 503):
        return None
    value = error.headers.get("retry-after")
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
