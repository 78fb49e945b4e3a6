"""TLS contexts for servers."""

from __future__ import annotations

import os
import ssl

__all__ = ["server_ssl_context"]

StrPath = str | os.PathLike[str]


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
