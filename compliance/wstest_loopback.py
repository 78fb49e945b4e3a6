# Python 2.7: run this with $WSN_AB_VENV/bin/python, not python3.
"""Run wstest with every listening socket on 127.0.0.1.

wstest (autobahntestsuite 25.10.1) starts its fuzzingserver with autobahn's
listenWS(factory, contextFactory) and no interface, so plain
`wstest -m fuzzingserver` listens on all interfaces. This wrapper makes
listenWS default to 127.0.0.1, and adds `-u 0` (no embedded web UI, which
would otherwise listen on port 8080) unless a web port is given; everything
else is wstest unchanged, with the same arguments:

    $WSN_AB_VENV/bin/python compliance/wstest_loopback.py -m fuzzingserver -s spec.json

compliance/run.py uses it for the client suite. The server suite runs plain
`wstest -m fuzzingclient`, which only connects out (to ws://127.0.0.1:PORT).
"""

import sys

# Importing the package first lets it install its Twisted reactor as usual.
from autobahntestsuite import fuzzing, wstest

LOOPBACK = "127.0.0.1"
_original_listen_ws = fuzzing.listenWS


def _listen_ws_on_loopback(factory, contextFactory=None, backlog=50, interface=LOOPBACK):
    return _original_listen_ws(factory, contextFactory, backlog, interface or LOOPBACK)


fuzzing.listenWS = _listen_ws_on_loopback


def _has_webport(argv):
    for arg in argv:
        if (
            arg in ("-u", "--webport")
            or arg.startswith("--webport=")
            or (arg.startswith("-u") and len(arg) > 2)
        ):
            return True
    return False


if __name__ == "__main__":
    args = sys.argv[1:]
    if not _has_webport(args):
        args += ["-u", "0"]
    argv = ["wstest"]  # no [*list] unpacking: this is Python 2
    argv.extend(args)
    sys.argv = argv
    sys.exit(wstest.run())
