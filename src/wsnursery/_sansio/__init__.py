"""The sans-I/O floor: the WebSocket protocol, its handshake and its policies, with no I/O.

Nothing in this package imports trio, anyio, coredis or any wsnursery module
outside it (``tests/test_layers.py`` checks that).
"""
