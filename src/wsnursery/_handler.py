"""The handler protocol: handler objects, handshake decisions, routes, authentication.

See ``docs/topics/handlers.rst`` for where each hook runs and in which order.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ._sansio.headers import HeaderPairs, TargetParts

if TYPE_CHECKING:
    from ._connection import WebSocketConnection
    from ._request import WebSocketRequest
    from ._sansio.exceptions import CloseReason

__all__ = [
    "Accept",
    "Authenticator",
    "BasicAuth",
    "HTTPRequest",
    "HTTPResponse",
    "Reject",
    "TokenAuth",
    "WebSocketHandler",
]


@dataclass(frozen=True)
class Accept:
    """``validate``'s answer: complete the handshake.

    Attributes:
        subprotocol: One of the subprotocols the client proposed, or None.
        headers (~collections.abc.Iterable[tuple[str, str]]): More response
            headers, as (name, value) pairs.
    """

    subprotocol: str | None = None
    headers: HeaderPairs = ()


@dataclass(frozen=True)
class Reject:
    """``validate``'s answer: refuse the handshake with an HTTP response.

    Attributes:
        status: The HTTP status (400-599, or 2xx/3xx such as a redirect).
        headers (~collections.abc.Iterable[tuple[str, str]]): Response
            headers, as (name, value) pairs.
        body: The response body (``str`` is sent as UTF-8 text).
    """

    status: int = 403
    headers: HeaderPairs = ()
    body: bytes | str = b""


@dataclass(frozen=True)
class HTTPResponse:
    """An answer to a plain HTTP request (an HTTP route, a default page).

    Attributes:
        status: The HTTP status.
        body: The body; ``str`` is encoded as UTF-8.
        headers (~collections.abc.Iterable[tuple[str, str]]): More headers,
            as (name, value) pairs.
        content_type: The ``Content-Type`` when ``body`` is not empty.
    """

    status: int = 200
    body: bytes | str = b""
    headers: HeaderPairs = ()
    content_type: str = "text/plain; charset=utf-8"


class WebSocketHandler:
    """Subclass this and override the hooks you need.

    One instance can serve every connection (pass the instance to
    :func:`serve_websocket`), or the class itself can be passed, and then every
    connection gets an instance of its own (per-connection state in ``self``).

    The hooks run in the connection's own task, one at a time and in order; see
    ``docs/topics/handlers.rst``. A hook that raises closes its connection with
    1011 (logged with its traceback); ``on_disconnect`` is still called.

    Attributes:
        default_page (str | ~pathlib.Path | None): What a plain HTTP GET on
            the handler's path returns: HTML text, or a :class:`pathlib.Path`
            to a file (its type is guessed from its name). None: such a GET
            gets 426 Upgrade Required.
        authenticator: Runs before :meth:`validate`; see :class:`BasicAuth` and
            :class:`TokenAuth`. None: no authentication (the server's own
            ``authenticator`` still applies).
    """

    default_page: str | Path | None = None
    authenticator: Authenticator | None = None

    async def validate(self, request: WebSocketRequest) -> Accept | Reject | None:
        """Decide the handshake. ``None`` (the default) accepts with no subprotocol.

        ``request`` has the path, path parameters, query, headers, cookies,
        proposed subprotocols and extensions, addresses, and the authenticated
        ``user``.

        Cancellation:
            Cancelled by ``open_timeout``: the client gets 503.
        """
        return None

    async def on_connect(self, conn: WebSocketConnection) -> None:
        """The connection is open and writes are allowed.

        Cancellation:
            Only when the server stops or the connection ends.
        """

    async def on_text(self, conn: WebSocketConnection, text: str) -> None:
        """A text message arrived (one call per message, in order).

        Cancellation:
            Only when the server stops or the connection ends.
        """

    async def on_binary(self, conn: WebSocketConnection, data: bytes) -> None:
        """A binary message arrived (one call per message, in order).

        Cancellation:
            Only when the server stops or the connection ends.
        """

    async def on_close_message(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        """The peer's close frame arrived (before the socket closes).

        Cancellation:
            Only when the server stops.
        """

    async def on_disconnect(self, conn: WebSocketConnection, reason: CloseReason) -> None:
        """The connection is over: called exactly once for every connection that
        reached :meth:`on_connect`, however it ended.

        Cancellation:
            Runs shielded, for at most ``close_timeout`` seconds.
        """


class Authenticator(Protocol):
    """Anything that can authenticate a request: returns the user, or None (401).

    ``www_authenticate`` is the challenge sent with the 401.
    """

    www_authenticate: str

    def __call__(self, request: WebSocketRequest) -> Awaitable[Any | None] | Any | None: ...


CheckFn = Callable[..., Awaitable[Any] | Any]


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class BasicAuth:
    """HTTP Basic authentication (RFC 7617).

    Args:
        credentials: ``{user: password}`` (compared in constant time), or a
            function ``check(user, password)`` (sync or async) returning the
            user object, or None to refuse.
        realm: The realm in the ``WWW-Authenticate`` challenge.
    """

    def __init__(
        self, credentials: Mapping[str, str] | CheckFn, *, realm: str = "wsnursery"
    ) -> None:
        self._credentials = credentials
        self.www_authenticate = f'Basic realm="{realm}", charset="UTF-8"'

    async def __call__(self, request: WebSocketRequest) -> Any | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        if isinstance(self._credentials, Mapping):
            expected = self._credentials.get(user)
            # Compare even for an unknown user, so timing does not tell which exist.
            ok = hmac.compare_digest(
                (expected if expected is not None else "\x00" + password).encode("utf-8"),
                password.encode("utf-8"),
            )
            return user if ok and expected is not None else None
        return await _maybe_await(self._credentials(user, password))


class TokenAuth:
    """A bearer token, from a header, the query string or a cookie.

    Browsers cannot set headers on a WebSocket, so the query parameter and the
    cookie are there for pages; a header suits other clients.

    Args:
        tokens: ``{token: user}`` (compared in constant time), or a function
            ``check(token)`` (sync or async) returning the user or None.
        header: The header to read (``Authorization: Bearer <token>`` when it is
            ``"authorization"``); None to ignore headers.
        query: The query parameter to read; None to ignore the query.
        cookie: The cookie to read; None to ignore cookies.
    """

    www_authenticate = 'Bearer realm="wsnursery"'

    def __init__(
        self,
        tokens: Mapping[str, Any] | CheckFn,
        *,
        header: str | None = "authorization",
        query: str | None = "token",
        cookie: str | None = "token",
    ) -> None:
        self._tokens = tokens
        self.header = header
        self.query = query
        self.cookie = cookie

    def _find(self, request: WebSocketRequest) -> str | None:
        if self.header is not None:
            value = request.headers.get(self.header)
            if value is not None:
                if self.header.lower() == "authorization":
                    scheme, _, token = value.partition(" ")
                    if scheme.lower() == "bearer" and token.strip():
                        return token.strip()
                elif value:
                    return value
        if self.query is not None and request.query.get(self.query):
            return request.query[self.query]
        if self.cookie is not None and request.cookies.get(self.cookie):
            return request.cookies[self.cookie]
        return None

    async def __call__(self, request: WebSocketRequest) -> Any | None:
        token = self._find(request)
        if token is None:
            return None
        if isinstance(self._tokens, Mapping):
            found = None
            for known, user in self._tokens.items():
                if hmac.compare_digest(known.encode("utf-8"), token.encode("utf-8")):
                    found = user
            return found
        return await _maybe_await(self._tokens(token))


# -- routes ----------------------------------------------------------------------


@dataclass
class HTTPRequest(TargetParts):
    """A plain HTTP request, as an HTTP route's function sees it.

    ``path`` is the full request target, query included (``/items/7?full=1``);
    :attr:`url_path` and :attr:`query_string` are its two parts.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: Any
    path_params: dict[str, str] = field(default_factory=dict)


_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class Route:
    """One registered path and what serves it."""

    template: str
    endpoint: Any
    kind: str  # "handler" (WebSocketHandler), "factory" (its class), "function", "http"
    pattern: re.Pattern[str] | None = None  # None: the template is the exact path


def compile_route(template: str, endpoint: Any, *, http: bool = False) -> Route:
    """A route for ``template`` (``/chat``, ``/rooms/{name}``, ``*`` for any path)."""
    if http:
        kind = "http"
    elif isinstance(endpoint, type) and issubclass(endpoint, WebSocketHandler):
        kind = "factory"
    elif isinstance(endpoint, WebSocketHandler):
        kind = "handler"
    elif callable(endpoint):
        kind = "function"
    else:
        raise TypeError(f"cannot serve {template!r} with {endpoint!r}")
    if template == "*":
        return Route(template, endpoint, kind, re.compile(r".*"))
    if not template.startswith("/"):
        raise ValueError(f"a route starts with '/', not {template!r}")
    if _PARAM.search(template) is None:
        return Route(template, endpoint, kind)
    pattern = ""
    pos = 0
    for found in _PARAM.finditer(template):
        pattern += re.escape(template[pos : found.start()])
        pattern += f"(?P<{found.group(1)}>[^/]+)"
        pos = found.end()
    pattern += re.escape(template[pos:])
    return Route(template, endpoint, kind, re.compile(pattern))


class Router:
    """Routes in registration order; exact paths before templates."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._exact = {r.template: r for r in reversed(routes) if r.pattern is None}
        self._patterns = [(r, r.pattern) for r in routes if r.pattern is not None]

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        route = self._exact.get(path)
        if route is not None:
            return route, {}
        for route, pattern in self._patterns:
            found = pattern.fullmatch(path)
            if found:
                return route, found.groupdict()
        return None


def build_router(
    handler: Any, http_routes: Mapping[str, Callable[[HTTPRequest], Awaitable[HTTPResponse]]]
) -> Router:
    """The router for ``serve_websocket``'s handler argument and its HTTP routes."""
    routes = [compile_route(path, fn, http=True) for path, fn in http_routes.items()]
    if isinstance(handler, Mapping):
        routes += [compile_route(path, endpoint) for path, endpoint in handler.items()]
    else:
        routes.append(compile_route("*", handler))
    return Router(routes)
