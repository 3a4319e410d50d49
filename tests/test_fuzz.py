"""Schema fuzzing: schemathesis generates requests from /openapi.json (valid, invalid and
boundary values, and stateful sequences) against the running stack on Postgres; no request may
get a 5xx. It found the first bug it was pointed at: a huge ``offset`` overflowed the database
integer (500), now a 422."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import VENV_BIN

pytestmark = pytest.mark.integration


def test_generated_requests_never_get_a_server_error(stack, tmp_path):
    # DELETE is left out: the stack is shared with other tests' models and datasets.
    cmd = [
        str(VENV_BIN / "schemathesis"),
        "run",
        f"{stack.base_url}/openapi.json",
        "-H",
        f"Authorization: Bearer {stack.api_key}",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--seed",
        "20261127",
        "--exclude-method",
        "DELETE",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert " passed" in proc.stdout and "generated" in proc.stdout
