"""Notifications: the JSON summary a `notify` rule POSTs to a `[[webhooks]]` entry.

`summary` reads what the index holds of a completed series or study (no patient attributes
unless the webhook sets `patient_names = true`); `post_json` sends it. A notification is a
dispatch job like any other (docs/dispatch.md): a 2xx answer ends it, anything else (another
status, a redirect, a timeout, a refused connection) fails the attempt with that reason and the
job is retried with backoff. docs/rules.md shows the payload.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from gateway import __version__
from gateway.config import WebhookSettings
from gateway.store.store import Store

__all__ = ["NotifyError", "post_json", "summary"]


class NotifyError(Exception):
    """The webhook did not accept the notification; the message says why."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer the gateway does not follow (it would turn a POST into a GET)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


async def summary(
    store: Store,
    scope: str,
    uid: str,
    *,
    rule: str,
    ae_title: str,
    patient: bool,
) -> dict[str, Any] | None:
    """The notification for a completed series or study; None when nothing of it is stored."""
    column = "s.series_uid" if scope == "series" else "st.study_uid"

    def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
        rows = conn.execute(
            "SELECT st.study_uid, st.accession_number, st.study_date, st.study_time,"
            " st.study_id, st.study_description, s.series_uid, s.series_number, s.modality,"
            " s.series_description, s.body_part_examined,"
            " (SELECT count(*) FROM instances i WHERE i.series_pk = s.pk),"
            " p.patient_id, p.patient_name, p.patient_birth_date, p.patient_sex"
            " FROM series s JOIN studies st ON s.study_pk = st.pk"
            " JOIN patients p ON st.patient_pk = p.pk"
            f" WHERE {column} = ? ORDER BY s.series_number, s.pk",
            (uid,),
        ).fetchall()
        if not rows:
            return None
        first = rows[0]
        body: dict[str, Any] = {
            "event": f"{scope}.complete",
            "rule": rule,
            "gateway": ae_title,
            "scope": scope,
            "uid": uid,
            "completed_at": datetime.fromtimestamp(time.time(), UTC).isoformat(),
            "study": {
                "StudyInstanceUID": first[0],
                "AccessionNumber": first[1] or "",
                "StudyDate": first[2] or "",
                "StudyTime": first[3] or "",
                "StudyID": first[4] or "",
                "StudyDescription": first[5] or "",
            },
            "series": [
                {
                    "SeriesInstanceUID": row[6],
                    "SeriesNumber": row[7],
                    "Modality": row[8] or "",
                    "SeriesDescription": row[9] or "",
                    "BodyPartExamined": row[10] or "",
                    "instances": row[11],
                }
                for row in rows
            ],
            "instances": sum(row[11] for row in rows),
        }
        if patient:
            body["patient"] = {
                "PatientID": first[12],
                "PatientName": first[13] or "",
                "PatientBirthDate": first[14] or "",
                "PatientSex": first[15] or "",
            }
        return body

    return await store.read(read)


def post_json(hook: WebhookSettings, payload: dict[str, Any]) -> int:
    """POST *payload* to the webhook (blocking); return the 2xx status, or raise NotifyError."""
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": f"dicom-gateway/{__version__}",
        **hook.headers,
    }
    request = urllib.request.Request(hook.url, data=data, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=hook.timeout_seconds) as response:
            response.read(64 * 1024)
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response and its connection
        raise NotifyError(f"webhook {hook.name} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason.strerror if isinstance(exc.reason, OSError) else exc.reason
        raise NotifyError(f"webhook {hook.name} could not be reached: {reason}") from None
    except TimeoutError:
        raise NotifyError(
            f"webhook {hook.name} did not answer within {hook.timeout_seconds:g} s"
        ) from None
    except OSError as exc:
        raise NotifyError(f"webhook {hook.name}: {exc.strerror or exc}") from None
    if not 200 <= status < 300:
        raise NotifyError(f"webhook {hook.name} answered HTTP {status}")
    return status
