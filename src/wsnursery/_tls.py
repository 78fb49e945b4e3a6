"""TLS contexts for servers and clients."""

from __future__ import annotations

import enum
import logging
import os
import ssl

__all__ = ["NONE", "SYSTEM", "TrustStore", "client_ssl_context", "server_ssl_context"]

logger = logging.getLogger("wsnursery.tls")

StrPath = str | os.PathLike[str]


class TrustStore(enum.Enum):
    """What a client trusts when it has no CA file of its own (``cafile=``)."""

    #: The system's default trust store (:func:`ssl.create_default_context`).
    SYSTEM = "system"
    #: No verification at all: any certificate, any host name. **For testing
    #: only**: it lets anyone on the path read and change the traffic.
    NONE = "none"


#: ``cafile=SYSTEM``: verify servers against the system's trust store (the default).
SYSTEM = TrustStore.SYSTEM
#: ``cafile=NONE``: do not verify the server at all. For testing only.
NONE = TrustStore.NONE


def server_ssl_context(
    certfile: StrPath,
    keyfile: StrPath | None = None,
    *,
    client_ca: StrPath | None = None,
    require_client_certificate: bool = True,
) -> ssl.SSLContext:
    """A server-side TLS context for :func:`serve_websocket`.

    Args:
        certfile: The server's certificate chain (PEM).
        keyfile: Its private key (PEM), if not in ``certfile``.
        client_ca: Verify client certificates against these CAs (PEM). Without
            it, clients are not asked for a certificate.
        require_client_certificate: With ``client_ca``: refuse clients without
            a valid certificate (True), or accept them and verify only those
            that present one (False).

    Returns:
        A context with TLS 1.2 as the minimum. The client's certificate, when
        there is one, is on :attr:`WebSocketRequest.peer_certificate`.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_ssl_context(
    cafile: StrPath | TrustStore = SYSTEM,
    *,
    certfile: StrPath | None = None,
    keyfile: StrPath | None = None,
    password: str | bytes | None = None,
) -> ssl.SSLContext:
    """A client-side TLS context: whom to trust, and an optional client certificate.

    Args:
        cafile: A PEM file of CA certificates to verify the server against;
            :data:`SYSTEM` (the default) for the system's trust store; or
            :data:`NONE` to verify nothing. ``NONE`` accepts any certificate
            for any host name, so anyone on the network path can read and
            change the traffic: use it only against a test server, never in
            production. A warning is logged each time such a context is made.
        certfile: A client certificate chain (PEM), for servers that ask for
            one.
        keyfile: Its private key (PEM), if not in ``certfile``.
        password: The key's password, if it is encrypted.

    Returns:
        A context with TLS 1.2 as the minimum that checks the server's
        certificate and host name (unless ``cafile`` is ``NONE``).

    Raises:
        ValueError: ``keyfile`` or ``password`` without ``certfile``.
        OSError, ssl.SSLError: a file is missing or is not valid PEM.
    """
    if certfile is None and (keyfile is not None or password is not None):
        raise ValueError("keyfile and password need certfile")
    if isinstance(cafile, TrustStore):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        # A CA file replaces the system store: trust exactly what was asked for.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile is NONE:
        logger.warning(
            "TLS certificate verification is OFF (cafile=NONE): "
            "anyone on the network path can impersonate the server; for testing only"
        )
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile, password)
    return context
