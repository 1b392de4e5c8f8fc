"""Rules end to end: DCMTK sends to the gateway, complete series and studies reach their targets."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from gateway.errors import ControlError
from tests.conftest import (
    HOST,
    TEST_FILES,
    GatewayProcess,
    OrthancProcess,
    dataset_bytes,
    dcmtk_env,
    require,
    write_variant,
)
from tests.scp.test_query_retrieve import index_rows, stored_dataset
from tests.scu.test_notify import Webhook
from tests.scu.test_sender import Recorder

CT = TEST_FILES / "CT_small.dcm"
# The rule waits open on a study: their scopes (from the gateway's index).
WAITING = "SELECT scope FROM completions WHERE study_uid = ? AND state = 'waiting'"


def storescu(gw: GatewayProcess, files: list[Path], calling: str = "CT1") -> None:
    result = subprocess.run(
        [require("storescu"), "-aet", calling, "-aec", gw.ae_title, HOST, str(gw.port),
         *map(str, files)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def make_series(directory: Path, count: int, study: str, description: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    return [
        write_variant(CT, directory / f"{series}-{n}.dcm", StudyInstanceUID=study,
                      SeriesInstanceUID=series, SOPInstanceUID=generate_uid(), InstanceNumber=n,
                      SeriesDescription=description)
        for n in range(1, count + 1)
    ]  # fmt: skip


def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_series_route_delivers_each_instance_once_after_completion(
    gateway_factory: Any, recorder: Recorder, tmp_path: Path
) -> None:
    folder = tmp_path / "export"
    gw = gateway_factory(
        peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": recorder.port}],
        folders=[{"name": "export", "path": str(folder)}],
        rules=[
            {"name": "ct", "match": 'Modality == "CT" and CallingAE == "CT1"',
             "targets": ["rec", "export"], "quiet_seconds": 1.0},
            {"name": "also-ct", "match": 'Modality == "CT"', "targets": ["rec"],
             "quiet_seconds": 1.0},
        ],
    )  # fmt: skip
    study = generate_uid()
    files = make_series(tmp_path / "in", 5, study, "AX")
    storescu(gw, files)
    assert recorder.received == []  # not before the series is complete
    wait_until(lambda: len(recorder.received) >= 5)
    wait_until(lambda: all(j["state"] == "done" for j in gw.call("jobs.list")["jobs"]))
    time.sleep(0.5)
    uids = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    # Two rules route the same series to `rec`: it is sent once, as the gateway stored it.
    assert sorted(uid for uid, _, _ in recorder.received) == sorted(uids)
    for uid, _, data in recorder.received:
        assert data == stored_dataset(gw, uid)
    written = sorted(folder.rglob("*.dcm"))
    assert len(written) == 5
    assert {p.stem for p in written} == uids
    for path in written:  # the folder holds the stored file itself
        assert dataset_bytes(path) == stored_dataset(gw, path.stem)
    jobs = gw.call("jobs.list")["jobs"]
    assert sorted(j["target"] for j in jobs) == ["export", "rec"]
    assert all(j["delivered"] == 5 for j in jobs)


def events(gw: GatewayProcess, *names: str) -> list[dict[str, Any]]:
    """The gateway's JSON log records of the events *names*, in order."""
    records = [json.loads(line) for line in gw.log_text().splitlines() if line.startswith("{")]
    return [r for r in records if r.get("event") in names]


def test_study_reaches_orthanc_complete_and_not_before(
    gateway_factory: Any, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    gw = gateway_factory(
        peers=[{"name": "orthanc", "ae_title": orthanc.ae_title, "host": HOST,
                "port": orthanc.port}],
        rules=[{"name": "study", "match": 'Modality == "CT"', "level": "study",
                "targets": ["orthanc"], "quiet_seconds": 1.5}],
    )  # fmt: skip
    study = generate_uid()
    first = make_series(tmp_path / "a", 3, study, "T1")
    second = make_series(tmp_path / "b", 4, study, "T2")
    storescu(gw, first)
    time.sleep(0.8)
    storescu(gw, second)  # resets the study's wait
    wait_until(lambda: orthanc.instance_count() == 7)
    # Complete only a quiet period after the last instance (the second series reset the
    # wait), whatever the machine's load: the job was made after that, and sent after it.
    with sqlite3.connect(f"file:{gw.data_dir / 'index.sqlite'}?mode=ro", uri=True) as conn:
        ((last,),) = conn.execute(
            "SELECT max(i.received_at) FROM instances i JOIN series s ON i.series_pk = s.pk"
            " JOIN studies st ON s.study_pk = st.pk WHERE st.study_uid = ?",
            (study,),
        ).fetchall()
    (job,) = gw.call("jobs.list")["jobs"]
    assert job["created_at"] >= last + 1.5, (job["created_at"], last)
    (found,) = orthanc.rest("/studies")
    assert orthanc.rest(f"/studies/{found}")["MainDicomTags"]["StudyInstanceUID"] == study
    assert len(orthanc.rest(f"/studies/{found}/series")) == 2


def test_target_down_retries_then_delivers_once(gateway_factory: Any, tmp_path: Path) -> None:
    from tests.conftest import free_port

    port = free_port()
    gw = gateway_factory(
        peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": port}],
        rules=[{"name": "ct", "match": 'Modality == "CT"', "targets": ["rec"],
                "quiet_seconds": 0.5}],
        dispatch={"retry_base_seconds": 0.5, "retry_max_seconds": 1.0},
    )  # fmt: skip
    files = make_series(tmp_path / "in", 3, generate_uid(), "AX")
    storescu(gw, files)
    wait_until(lambda: any(j["attempts"] >= 1 for j in gw.call("jobs.list")["jobs"]))
    (job,) = gw.call("jobs.list")["jobs"]
    # Queued for its next attempt, or already running it (the backoff may be near zero).
    assert job["state"] in ("queued", "running") and job["last_error"].startswith("unreachable: ")
    recorder = Recorder(port=port)  # the target comes up
    try:
        wait_until(lambda: gw.call("jobs.list")["jobs"][0]["state"] == "done", timeout=60)
        assert sorted(u for u, _, _ in recorder.received) == sorted(
            str(pydicom.dcmread(f).SOPInstanceUID) for f in files
        )
    finally:
        recorder.stop()


def test_operator_force_completes_a_study_from_the_cli(
    gateway_factory: Any, recorder: Recorder, tmp_path: Path
) -> None:
    gw = gateway_factory(
        peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": recorder.port}],
        rules=[{"name": "study", "match": 'Modality == "CT"', "level": "study",
                "targets": ["rec"], "quiet_seconds": 600, "priority": "urgent"}],
    )  # fmt: skip
    study = generate_uid()
    storescu(gw, make_series(tmp_path / "in", 2, study, "AX"))
    # The rule waits on the study (the engine takes arrivals within 0.1 s).
    wait_until(lambda: index_rows(gw, WAITING, (study,)) == [("study",)])
    assert recorder.received == []
    forced = gw.cli("studies", "force-complete", study)
    assert "1 pending rule wait(s) completed" in forced.stdout
    wait_until(lambda: len(recorder.received) == 2)
    wait_until(lambda: "done" in gw.cli("jobs", "list").stdout)
    listing = gw.cli("jobs", "list", "--json")
    import json

    (job,) = json.loads(listing.stdout)["jobs"]
    assert (job["scope"], job["uid"], job["priority"], job["delivered"]) == (
        "study",
        study,
        "urgent",
        2,
    )
    assert "0 job(s) requeued" in gw.cli("jobs", "retry").stdout


def test_kill_9_mid_dispatch_resumes_and_resends_at_most_in_flight(
    gateway_factory: Any, tmp_path: Path
) -> None:
    from collections import Counter

    slow = Recorder(delay=0.03)  # each C-STORE takes the target 30 ms
    try:
        gw = gateway_factory(
            peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": slow.port}],
            rules=[{"name": "ct", "match": 'Modality == "CT"', "targets": ["rec"],
                    "quiet_seconds": 0.3}],
        )  # fmt: skip
        files = make_series(tmp_path / "in", 120, generate_uid(), "AX")
        storescu(gw, files)
        wait_until(lambda: len(slow.received) >= 30)
        gw.kill()  # SIGKILL mid-dispatch
        before = len(slow.received)
        assert before < 120, "the dispatch finished before the kill"
        gw.start()
        wait_until(lambda: gw.call("jobs.list")["jobs"][0]["state"] == "done", timeout=60)
        counts = Counter(uid for uid, _, _ in slow.received)
        expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        assert set(counts) == expected  # nothing lost
        duplicates = sum(n - 1 for n in counts.values())
        assert duplicates <= 2, counts.most_common(3)  # at most what was in flight at the kill
        (job,) = gw.call("jobs.list")["jobs"]
        assert job["delivered"] == 120
    finally:
        slow.stop()


class StallingRecorder(Recorder):
    """A receiver whose first C-STORE hangs for *stall* seconds (then succeeds)."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.stalled: list[str] = []
        super().__init__()

    def _on_store(self, event: Any) -> int:
        if not self.stalled:
            self.stalled.append(str(event.request.AffectedSOPInstanceUID))
            time.sleep(self.stall)
        return super()._on_store(event)


def test_a_stalled_send_loses_its_lease_and_another_attempt_delivers(
    gateway_factory: Any, tmp_path: Path
) -> None:
    """The peer hangs on the first C-STORE (within the DIMSE timeout): the job's lease runs
    out, it is claimed again while the first attempt still hangs, and that attempt delivers;
    the hung one, when it returns, changes nothing."""
    receiver = StallingRecorder(stall=8.0)
    try:
        gw = gateway_factory(
            peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": receiver.port}],
            rules=[{"name": "ct", "match": 'Modality == "CT"', "targets": ["rec"],
                    "quiet_seconds": 0.3}],
            dispatch={"lease_seconds": 1.5, "per_target_concurrency": 1},  # its one slot hangs
        )  # fmt: skip
        files = make_series(tmp_path / "in", 3, generate_uid(), "AX")
        storescu(gw, files)
        wait_until(lambda: len(receiver.stalled) == 1)  # the first attempt hangs from here
        started = time.monotonic()
        wait_until(lambda: gw.call("jobs.list")["jobs"][0]["state"] == "done", timeout=20)
        assert time.monotonic() - started < receiver.stall  # the first attempt still hangs
        (job,) = gw.call("jobs.list")["jobs"]
        assert (job["attempts"], job["delivered"], job["lease_owner"]) == (1, 3, None)
        assert "lease expired" in gw.log_text()
        expected = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
        assert {uid for uid, _, _ in receiver.received} == expected
        # The hung attempt returns: its end is refused (state null), the job stays as it is.
        (first,) = [e for e in events(gw, "job_started") if e["attempt"] == 1]

        def hung_attempt_ended() -> list[dict[str, Any]]:
            return [e for e in events(gw, "job_done", "job_failed")
                    if e["lease"] == first["lease"]]  # fmt: skip

        wait_until(hung_attempt_ended, timeout=receiver.stall + 20)
        assert [e["state"] for e in hung_attempt_ended()] == [None]
        (after,) = gw.call("jobs.list")["jobs"]
        assert (after["state"], after["attempts"], after["delivered"]) == ("done", 1, 3)
    finally:
        receiver.stop()


def test_notify_posts_a_summary_once_complete_retrying_and_discard_sends_nothing(
    gateway_factory: Any, recorder: Recorder, tmp_path: Path
) -> None:
    hook = Webhook(answers=[503])  # the first attempt fails, the retry is accepted
    try:
        gw = gateway_factory(
            peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST,
                    "port": recorder.port}],
            webhooks=[{"name": "ris", "url": hook.url, "headers": {"X-Token": "t"}}],
            rules=[
                {"name": "tell", "match": 'CallingAE == "CT1"', "action": "notify",
                 "level": "study", "targets": ["ris"], "quiet_seconds": 0.5},
                {"name": "drop", "match": 'CallingAE == "MR1"', "action": "discard"},
                {"name": "ct", "match": 'CallingAE == "MR1"', "targets": ["rec"],
                 "quiet_seconds": 0.3},
            ],
            dispatch={"retry_base_seconds": 0.2, "retry_max_seconds": 0.5},
        )  # fmt: skip
        study = generate_uid()
        storescu(gw, make_series(tmp_path / "a", 2, study, "AX"))
        storescu(gw, make_series(tmp_path / "b", 1, study, "COR"))
        storescu(gw, make_series(tmp_path / "c", 2, generate_uid(), "AX"), calling="MR1")
        assert hook.attempts == 0  # nothing before the study is complete
        wait_until(lambda: len(hook.requests) == 1)
        (_, headers, body), attempts = hook.requests[0], hook.attempts
        assert attempts == 2 and headers["X-Token"] == "t"
        assert (body["event"], body["rule"], body["uid"], body["instances"]) == (
            "study.complete",
            "tell",
            study,
            3,
        )
        assert sorted(s["SeriesDescription"] for s in body["series"]) == ["AX", "COR"]
        assert "patient" not in body and "CompressedSamples" not in json.dumps(body)
        # The job is done once the webhook's answer is read and recorded, just after the
        # request arrived there.
        wait_until(lambda: gw.call("jobs.list")["jobs"][0]["state"] != "running")
        (job,) = gw.call("jobs.list")["jobs"]
        assert (job["target"], job["state"], job["attempts"]) == ("ris", "done", 1)
        assert "webhook ris answered HTTP 503" in gw.log_text()
        time.sleep(0.5)
        assert recorder.received == [] and len(hook.requests) == 1  # discarded: nothing sent
    finally:
        hook.stop()


def test_series_and_study_rules_to_one_target_send_each_instance_once(
    gateway_factory: Any, recorder: Recorder, tmp_path: Path
) -> None:
    gw = gateway_factory(
        peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": recorder.port}],
        rules=[
            {"name": "each-series", "match": 'Modality == "CT"', "targets": ["rec"],
             "quiet_seconds": 0.3},
            {"name": "whole-study", "match": 'Modality == "CT"', "level": "study",
             "targets": ["rec"], "quiet_seconds": 0.6},
        ],
    )  # fmt: skip
    study = generate_uid()
    files = make_series(tmp_path / "a", 3, study, "AX") + make_series(tmp_path / "b", 2, study, "S")
    storescu(gw, files)
    wait_until(lambda: len(gw.call("jobs.list")["jobs"]) == 3)
    wait_until(lambda: all(j["state"] == "done" for j in gw.call("jobs.list")["jobs"]))
    time.sleep(0.3)
    received = sorted(uid for uid, _, _ in recorder.received)
    assert received == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    jobs = {j["scope"]: j for j in gw.call("jobs.list")["jobs"]}
    assert sum(j["delivered"] for j in gw.call("jobs.list")["jobs"]) == 5
    assert jobs["study"]["delivered"] == 0  # the series jobs had delivered all of it


def test_urgent_jobs_overtake_queued_low_ones(gateway_factory: Any, tmp_path: Path) -> None:
    slow = Recorder(delay=0.3)
    try:
        gw = gateway_factory(
            peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": slow.port}],
            rules=[
                {"name": "busy", "match": 'SeriesDescription == "BUSY"', "targets": ["rec"],
                 "quiet_seconds": 0.2},
                {"name": "low", "match": 'SeriesDescription == "LOW"', "targets": ["rec"],
                 "priority": "low", "quiet_seconds": 0.2},
                {"name": "urgent", "match": 'SeriesDescription == "URGENT"',
                 "targets": ["rec"], "priority": "urgent", "quiet_seconds": 0.2},
            ],
            dispatch={"per_target_concurrency": 1},
        )  # fmt: skip
        busy = make_series(tmp_path / "a", 6, generate_uid(), "BUSY")
        low = make_series(tmp_path / "b", 2, generate_uid(), "LOW")
        urgent = make_series(tmp_path / "c", 2, generate_uid(), "URGENT")
        storescu(gw, busy)
        wait_until(lambda: len(slow.received) >= 1)  # the one slot is taken
        storescu(gw, low)  # queued first ...
        storescu(gw, urgent)  # ... and overtaken
        wait_until(lambda: len(slow.received) == 10, timeout=30)
        order = [uid for uid, _, _ in slow.received]
        uids = {name: {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
                for name, files in (("busy", busy), ("low", low), ("urgent", urgent))}  # fmt: skip
        assert set(order[:6]) == uids["busy"]
        assert set(order[6:8]) == uids["urgent"] and set(order[8:]) == uids["low"]
    finally:
        slow.stop()


def test_retention_deletes_studies_whose_work_is_over(
    gateway_factory: Any, recorder: Recorder, tmp_path: Path
) -> None:
    from tests.conftest import free_port

    gw = gateway_factory(
        peers=[
            {"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": recorder.port},
            {"name": "down", "ae_title": "DOWN", "host": HOST, "port": free_port()},
        ],
        rules=[
            {"name": "send", "match": 'SeriesDescription == "SEND"', "targets": ["rec"],
             "quiet_seconds": 0.2},
            {"name": "stuck", "match": 'SeriesDescription == "STUCK"', "targets": ["down"],
             "quiet_seconds": 0.2},
        ],
        dispatch={"max_attempts": 1},
        retention={"delete_after_days": 1.5 / 86400, "check_seconds": 0.2},
    )  # fmt: skip
    sent, stuck, unmatched = generate_uid(), generate_uid(), generate_uid()
    storescu(gw, make_series(tmp_path / "a", 2, sent, "SEND"))
    storescu(gw, make_series(tmp_path / "b", 2, stuck, "STUCK"))
    storescu(gw, make_series(tmp_path / "c", 2, unmatched, "OTHER"))

    def held() -> set[str]:
        return {s["study_uid"] for s in gw.call("studies.search")["studies"]}

    assert held() == {sent, stuck, unmatched}
    wait_until(lambda: held() == {stuck})
    assert len(recorder.received) == 2  # delivered before it went
    states = {(j["target"], j["state"]) for j in gw.call("jobs.list")["jobs"]}
    assert states == {("down", "failed")}  # the done job went with its study
    assert '"retention_deleted"' in gw.log_text()


def test_low_disk_refuses_new_instances_with_a700(gateway_factory: Any) -> None:
    gw = gateway_factory(node={"min_free_mb": 1 << 40})  # more than any disk has free
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, gw.port, ae_title=gw.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(pydicom.dcmread(CT))
    finally:
        assoc.release()
    assert status.Status == 0xA700
    status_now = gw.call("status")
    assert status_now["instances"] == 0 and status_now["accepting_instances"] is False
    assert "low disk" in gw.log_text() and "node.min_free_mb" in gw.log_text()


def test_rules_reload_refuses_a_bad_file_and_applies_a_good_one(
    gateway_factory: Any, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    folders = [{"name": "first", "path": str(first)}, {"name": "second", "path": str(second)}]

    def rule(match: str, target: str) -> dict[str, Any]:
        return {"name": "ct", "match": match, "targets": [target], "quiet_seconds": 0.2}

    gw = gateway_factory(folders=folders, rules=[rule('Modality == "CT"', "first")])
    gw.write_config(folders=folders, rules=[rule('Modality == "CT" and (', "second")])
    with pytest.raises(ControlError) as caught:
        gw.call("rules.reload")
    assert caught.value.code == -32011
    assert "rules.0.match: rule 'ct': column 23: expected a condition after" in caught.value.message
    gw.write_config(folders=folders, rules=[rule('SeriesDescription matches "AX(?=T1)"', "second")])
    with pytest.raises(ControlError) as caught:
        gw.call("rules.reload")  # RE2 refuses lookahead, as config check and serve do
    assert caught.value.code == -32011
    assert (
        "rules.0.match: rule 'ct': column 27: invalid regular expression \"AX(?=T1)\": invalid"
        " perl operator: (?=" in caught.value.message
    )
    storescu(gw, make_series(tmp_path / "a", 2, generate_uid(), "AX"))
    wait_until(lambda: len(list(first.rglob("*.dcm"))) == 2)  # the running rules still hold

    gw.write_config(folders=folders, rules=[rule('Modality == "CT"', "second")],
                    node={**gw._base["node"], "max_associations": 5})  # fmt: skip
    result = gw.cli("rules", "reload")
    assert "rules now: ct" in result.stdout
    assert "applied only at the next start: node" in result.stdout
    storescu(gw, make_series(tmp_path / "b", 3, generate_uid(), "AX"))
    wait_until(lambda: len(list(second.rglob("*.dcm"))) == 3)
    assert len(list(first.rglob("*.dcm"))) == 2


def test_a_peer_that_rejects_our_called_title_fails_at_once_until_the_config_changes(
    gateway_factory: Any, recorder: Recorder, tmp_path: Path
) -> None:
    """A-ASSOCIATE-RJ "called AE title not recognised" is permanent: the job fails on its first
    attempt (no retries against a peer that will keep refusing), with the reject's result,
    source and reason. Correcting the peer's AE title and reloading queues it again, and it
    delivers."""
    recorder.ae.require_called_aet = True

    def peers(title: str) -> list[dict[str, Any]]:
        return [{"name": "rec", "ae_title": title, "host": HOST, "port": recorder.port}]

    rules = [{"name": "ct", "match": 'Modality == "CT"', "targets": ["rec"], "quiet_seconds": 0.5}]
    gw = gateway_factory(peers=peers("WRONG"), rules=rules)
    files = make_series(tmp_path / "in", 2, generate_uid(), "AX")
    storescu(gw, files)
    wait_until(lambda: [j["state"] for j in gw.call("jobs.list")["jobs"]] == ["failed"])
    (job,) = gw.call("jobs.list")["jobs"]
    assert job["attempts"] == 1
    assert job["last_error"].startswith("rejected: peer rec (WRONG at ")
    assert (
        "Called AE title not recognised (A-ASSOCIATE-RJ result 1, source 1, reason 7)"
        in (job["last_error"])
    )
    gw.write_config(peers=peers("RECORDER"), rules=rules)
    assert gw.call("rules.reload")["peers_changed"] == ["rec"]
    wait_until(lambda: [j["state"] for j in gw.call("jobs.list")["jobs"]] == ["done"], timeout=60)
    assert sorted(u for u, _, _ in recorder.received) == sorted(
        str(pydicom.dcmread(f).SOPInstanceUID) for f in files
    )
