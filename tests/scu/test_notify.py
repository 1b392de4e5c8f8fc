"""Notifications: the JSON summary and its POST, against a real HTTP server on loopback."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.config import WebhookSettings
from gateway.scu.notify import NotifyError, post_json, summary
from gateway.store.index import Provenance
from gateway.store.store import Store
from tests.conftest import HOST, TEST_FILES, free_port


class Webhook:
    """An HTTP server recording every POST (path, headers, JSON body); answers from a script.

    *answers* are the statuses of the first requests in turn (then 200); *delay* holds each
    answer back that many seconds.
    """

    def __init__(self, answers: list[int] | None = None, delay: float = 0.0) -> None:
        self.answers = list(answers or [])
        self.delay = delay
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.attempts = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                hook.attempts += 1
                status = hook.answers.pop(0) if hook.answers else 200
                if hook.delay:
                    time.sleep(hook.delay)
                if status == 200:
                    hook.requests.append((self.path, dict(self.headers), json.loads(body)))
                try:
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{HOST}:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def settings(self, **overrides: Any) -> WebhookSettings:
        return WebhookSettings(**{"name": "hook", "url": self.url, **overrides})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.stop()


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "data")
    await s.open()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        temp = s.files.new_temp_path()
        shutil.copyfile(TEST_FILES / name, temp)
        await s.ingest(temp, Provenance())
    yield s
    await s.close()


def test_post_sends_json_with_the_configured_headers(webhook: Webhook) -> None:
    hook = webhook.settings(headers={"Authorization": "Bearer s3cret"})
    assert post_json(hook, {"event": "series.complete", "text": "Müller"}) == 200
    ((path, headers, body),) = webhook.requests
    assert path == "/hook"
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["User-Agent"].startswith("dicom-gateway/")
    assert body == {"event": "series.complete", "text": "Müller"}


@pytest.mark.parametrize(
    ("answer", "message"),
    [(500, "webhook hook answered HTTP 500"), (302, "webhook hook answered HTTP 302")],
)
def test_a_status_other_than_2xx_fails(answer: int, message: str) -> None:
    hook = Webhook(answers=[answer])
    try:
        with pytest.raises(NotifyError, match=message):
            post_json(hook.settings(), {"a": 1})
        assert hook.requests == []  # a redirect is not followed
    finally:
        hook.stop()


def test_unreachable_and_silent_webhooks_fail_with_the_reason() -> None:
    closed = WebhookSettings(name="hook", url=f"http://{HOST}:{free_port()}/x")
    with pytest.raises(NotifyError, match="webhook hook could not be reached: Connection refused"):
        post_json(closed, {})
    slow = Webhook(delay=1.5)
    try:
        with pytest.raises(NotifyError, match=r"did not answer within 0\.3 s"):
            post_json(slow.settings(timeout_seconds=0.3), {})
    finally:
        slow.stop()


@pytest.mark.asyncio
async def test_summary_leaves_patients_out_unless_asked(store: Store) -> None:
    study = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"  # CT_small.dcm
    body = await summary(store, "study", study, rule="r", ae_title="GW", patient=False)
    assert body is not None
    assert (body["event"], body["rule"], body["gateway"], body["uid"]) == (
        "study.complete",
        "r",
        "GW",
        study,
    )
    assert body["study"]["StudyInstanceUID"] == study
    assert [s["Modality"] for s in body["series"]] == ["CT"]
    assert body["instances"] == 1
    assert "patient" not in body
    assert "CompressedSamples" not in json.dumps(body)  # CT_small's PatientName
    named = await summary(store, "study", study, rule="r", ae_title="GW", patient=True)
    assert named is not None
    assert named["patient"]["PatientName"] == "CompressedSamples^CT1"
    series_uid = body["series"][0]["SeriesInstanceUID"]
    one = await summary(store, "series", series_uid, rule="r", ae_title="GW", patient=False)
    assert one is not None and one["event"] == "series.complete" and one["instances"] == 1
    assert await summary(store, "study", "1.2.3", rule="r", ae_title="GW", patient=False) is None
