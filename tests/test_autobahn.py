"""Autobahn|Testsuite conformance: compliance/run.py in its "ci" selection.

Runs wstest against wsnursery's echo server (wstest as client) and wsnursery's
client loop (wstest as server): every case except 12.* and 13.* (permessage-
deflate), about 30 s each. wstest must be installed first, with
`bash compliance/install.sh` (the test command does this); without it these tests
fail rather than skip, so that CI cannot pass them silently.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "compliance" / "run.py"
VENV = Path(os.environ.get("WSN_AB_VENV") or "/tmp/wsnursery-ab-venv")
CI_CASES = 301  # wstest 25.10.1: 517 cases, less 90 in 12.* and 126 in 13.*
RUN_TIMEOUT_S = 900
SUMMARY = re.compile(
    r"^autobahn (?P<side>server|client): OK=(?P<ok>\d+) NON-STRICT=(?P<non_strict>\d+) "
    r"INFORMATIONAL=(?P<informational>\d+) UNIMPLEMENTED=(?P<unimplemented>\d+) "
    r"FAILED=(?P<failed>\d+)(?P<rest>.*)$",
    re.MULTILINE,
)

pytestmark = [pytest.mark.compliance, pytest.mark.slow]


def require_wstest() -> None:
    wstest = VENV / "bin" / "wstest"
    if not os.access(wstest, os.X_OK):
        pytest.fail(
            f"wstest (Autobahn|Testsuite) is not installed: no {wstest}.\n"
            "Install it with `bash compliance/install.sh` (as root: it adds Python 2.7 from "
            "Debian bullseye), then run the tests again. WSN_AB_VENV chooses the virtualenv "
            "(default /tmp/wsnursery-ab-venv); set it the same for install.sh and pytest.",
            pytrace=False,
        )


def run_suite(side: str, tmp_path: Path) -> None:
    require_wstest()
    # The selection must be the "ci" one whatever the caller's environment says.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSN_AB_")}
    env["WSN_AB_VENV"] = str(VENV)
    env["WSN_AB_PYTHON"] = sys.executable
    outdir = tmp_path / f"autobahn-{side}"
    cmd = [sys.executable, str(RUNNER), side, "ci", "--outdir", str(outdir)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the runner stops the server and wstest it started
        try:
            stdout, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {RUN_TIMEOUT_S} s:\n{stdout}")
    output = stdout + stderr
    print(output)  # the summary, shown by pytest when the test fails
    context = f"\n--- {' '.join(cmd)} (exit {proc.returncode}) ---\n{output}\nreport: {outdir}"

    assert proc.returncode == 0, f"the {side} suite did not pass{context}"
    match = SUMMARY.search(stdout)
    assert match, f"no summary line in the output{context}"
    assert match["side"] == side
    assert int(match["failed"]) == 0, f"FAILED cases{context}"
    assert match["rest"].strip() == "", f"other verdicts or MISSING cases{context}"
    counted = sum(int(match[k]) for k in ("ok", "non_strict", "informational", "unimplemented"))
    assert counted == CI_CASES, f"{counted} verdicts, expected {CI_CASES}{context}"
    assert f" cases={CI_CASES} reported={CI_CASES} " in stdout, context

    summary = json.loads((outdir / "summary.json").read_text(encoding="utf-8"))
    assert summary["expected"] == CI_CASES
    assert summary["agents"]["wsnursery"]["reported"] == CI_CASES
    assert summary["agents"]["wsnursery"]["failed"] == {}


def test_autobahn_server_ci(tmp_path: Path) -> None:
    """wstest -m fuzzingclient against `python -m wsnursery echo`."""
    run_suite("server", tmp_path)


def test_autobahn_client_ci(tmp_path: Path) -> None:
    """wstest -m fuzzingserver against compliance/client.py (wsnursery's client)."""
    run_suite("client", tmp_path)
