"""Log output: `[log] stream` and `format`, our events and our dependencies' alike."""

from __future__ import annotations

import json
import subprocess
import sys

_SCRIPT = """
import logging, structlog
from gateway.config import LogSettings
from gateway.logs import configure_logging
configure_logging(LogSettings(format="json", stream="{stream}"))
structlog.get_logger("gateway.test").info("gateway_event", port=11112)
logging.getLogger("pynetdicom.transport").error("Association request failed")
logging.getLogger("pynetdicom.events").info("below the threshold")
"""


def _run(stream: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(stream=stream)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip


def test_json_lines_on_the_chosen_stream() -> None:
    """Every line is one JSON object, pynetdicom's included (a container's log collector
    parses them all); nothing goes to the other stream."""
    for stream in ("stdout", "stderr"):
        result = _run(stream)
        chosen, other = (
            (result.stdout, result.stderr) if stream == "stdout" else (result.stderr, result.stdout)
        )
        assert other == ""
        records = [json.loads(line) for line in chosen.splitlines()]
        assert [(r["event"], r["level"]) for r in records] == [
            ("gateway_event", "info"),
            ("Association request failed", "error"),
        ]
        assert records[0]["port"] == 11112
        assert records[1]["logger"] == "pynetdicom.transport"
        assert all("timestamp" in r for r in records)
