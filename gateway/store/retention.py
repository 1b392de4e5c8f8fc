"""Retention: studies whose work is over leave the store once they are old enough.

With `[retention] delete_after_days` above 0, a sweep every `check_seconds` deletes each study
whose last instance arrived more than that long ago and that nothing still needs:

- no rule is waiting on it or on one of its series (no open completion);
- none of its dispatch jobs is queued, running or failed (done and cancelled jobs are over;
  a failed one waits for an operator, so its study is kept).

A study no rule matched, or one a `discard` rule dropped, has no job and goes at the same age.
Deleting a study removes its rows and files (`Store.delete_study`, which also clears the
targets' delivery ledger for its instances), its closed jobs and completions, and what the
completion engine remembered of its series, so the same study received again is handled as new.
docs/storage.md describes it.
"""

from __future__ import annotations

import functools
import sqlite3
import time

import anyio
import structlog

from gateway.config import RetentionSettings
from gateway.errors import GatewayError
from gateway.store.store import Store

__all__ = ["Retention"]

log = structlog.get_logger(__name__)

_BATCH = 200

_ELIGIBLE = """
SELECT st.study_uid FROM studies st
WHERE (SELECT max(i.received_at) FROM series s JOIN instances i ON i.series_pk = s.pk
       WHERE s.study_pk = st.pk) < ?
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = st.study_uid
                  AND j.state IN ('queued', 'running', 'failed'))
  AND NOT EXISTS (SELECT 1 FROM completions c WHERE c.study_uid = st.study_uid
                  AND c.state = 'waiting')
LIMIT ?
"""


class Retention:
    """The periodic sweep; `sweep()` runs one pass, `run()` repeats it until cancelled."""

    def __init__(self, store: Store, settings: RetentionSettings) -> None:
        self.store = store
        self.settings = settings

    @property
    def enabled(self) -> bool:
        return self.settings.delete_after_days > 0

    async def eligible(self, now: float | None = None, limit: int = _BATCH) -> list[str]:
        """Study Instance UIDs that may be deleted now."""
        cutoff = (time.time() if now is None else now) - self.settings.delete_after_days * 86400
        return await self.store.read(
            lambda conn: [row[0] for row in conn.execute(_ELIGIBLE, (cutoff, limit))]
        )

    async def sweep(self, now: float | None = None) -> int:
        """Delete every eligible study; return how many were deleted."""
        deleted = 0
        while True:
            studies = await self.eligible(now)
            for study_uid in studies:
                await self.store.write(functools.partial(_forget, study_uid=study_uid))
                instances = await self.store.delete_study(study_uid, by="retention")
                log.info("retention_deleted", study_uid=study_uid, instances=instances)
                deleted += 1
            if len(studies) < _BATCH:
                return deleted

    async def run(self) -> None:
        """Sweep every `check_seconds` (the first sweep at start-up) until cancelled."""
        if not self.enabled:
            return
        log.info(
            "retention_started",
            delete_after_days=self.settings.delete_after_days,
            check_seconds=self.settings.check_seconds,
        )
        while True:
            try:
                count = await self.sweep()
                if count:
                    log.info("retention_swept", studies_deleted=count)
            except GatewayError as exc:
                log.error("retention_failed", error=str(exc))
            await anyio.sleep(self.settings.check_seconds)


def _forget(conn: sqlite3.Connection, study_uid: str) -> None:
    """The study's closed jobs and completions, and its series' remembered rules."""
    conn.execute(
        "DELETE FROM series_rules WHERE series_uid IN (SELECT s.series_uid FROM series s"
        " JOIN studies st ON s.study_pk = st.pk WHERE st.study_uid = ?)",
        (study_uid,),
    )
    conn.execute("DELETE FROM completions WHERE study_uid = ? AND state != 'waiting'", (study_uid,))
    conn.execute(
        "DELETE FROM jobs WHERE study_uid = ? AND state IN ('done', 'cancelled')", (study_uid,)
    )
