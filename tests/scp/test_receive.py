"""Receiving: DCMTK and pynetdicom senders against a running gateway process."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from gateway.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from tests.conftest import (
    CHARSET_FILES,
    HOST,
    TEST_FILES,
    GatewayProcess,
    dataset_bytes,
    dcmtk_env,
    free_port,
    require,
    write_variant,
)

CT = TEST_FILES / "CT_small.dcm"
NOT_ACCEPTED = -1


def storescu(
    gw: GatewayProcess, *files: Path, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require("storescu"),
            "-R",
            *extra,
            "-aec",
            gw.ae_title,
            HOST,
            str(gw.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=120,
    )


def index_rows(gw: GatewayProcess, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(gw.data_dir / "index.sqlite") as conn:
        return conn.execute(sql, params).fetchall()


def stored_dataset(gw: GatewayProcess, sop_uid: str) -> bytes:
    (path,) = index_rows(gw, "SELECT path FROM instances WHERE sop_uid = ?", (sop_uid,))[0]
    return dataset_bytes(gw.data_dir / path)


@pytest.fixture
def raw_sender() -> Iterator[AE]:
    """A pynetdicom SCU that sends a file's bytes exactly as they are on disk."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield AE(ae_title="RAWSCU")
    _config.STORE_SEND_CHUNKED_DATASET = previous


def send_raw(ae: AE, gw: GatewayProcess, path: Path) -> int:
    """C-STORE *path* on a context of its own SOP class and transfer syntax; return the status.

    NOT_ACCEPTED when the gateway accepts no context for it.
    """
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bad files are bad on purpose
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
        context = build_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate(HOST, gw.port, ae_title=gw.ae_title, contexts=[context])
        if not assoc.is_established:
            return NOT_ACCEPTED
        try:
            status = assoc.send_c_store(path)
            return int(status.Status)
        finally:
            assoc.release()


def test_echo(gateway: GatewayProcess) -> None:
    result = subprocess.run(
        [require("echoscu"), "-aec", gateway.ae_title, HOST, str(gateway.port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
    )
    assert result.returncode == 0, result.stderr
    assert '"association_accepted"' in gateway.log_text()


def _sendable_files() -> list[Path]:
    return sorted(TEST_FILES.glob("*.dcm")) + sorted(CHARSET_FILES.glob("*.dcm"))


def _sent_ok(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and "Failed" not in result.stderr


class CaptureSCP:
    """A pynetdicom storage SCP that records the dataset bytes of every C-STORE, in order."""

    def __init__(self) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.received: list[tuple[str, bytes]] = []
        self.ae = AE(ae_title="CAPTURE")
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.port = free_port()
        self.server = self.ae.start_server(
            (HOST, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.received.append((uid, event.request.DataSet.getvalue()))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_every_pydicom_file_dcmtk_sends_is_stored(gateway: GatewayProcess) -> None:
    """What DCMTK can send, the gateway stores as DCMTK sent it (or refuses, saying why); where
    files share a SOP Instance UID, the first one sent is held (`keep_first`); C-GET returns
    every held instance byte for byte."""
    import pydicom

    capture = CaptureSCP()
    try:
        outcomes: list[tuple[Path, bytes | None, bool]] = []
        for path in _sendable_files():  # in order: the duplicate policy depends on it
            before = len(capture.received)
            reference = subprocess.run(
                [require("storescu"), "-R", "-aec", "CAPTURE", HOST, str(capture.port),
                 str(path)],
                capture_output=True, text=True, env=dcmtk_env(), timeout=120,
            )  # fmt: skip
            sent = capture.received[before][1] if _sent_ok(reference) else None
            outcomes.append((path, sent, _sent_ok(storescu(gateway, path))))
    finally:
        capture.stop()
    sendable = [(path, sent, ok) for path, sent, ok in outcomes if sent is not None]
    assert len(sendable) >= 40
    # Refused for what they are: no SOP Class UID, no Study UID, a truncated dataset.
    expected_refusals = {
        "MR_truncated.dcm", "rtplan_truncated.dcm", "UN_sequence.dcm", "empty_charset_LEI.dcm",
        "nested_priv_SQ.dcm", "priv_SQ.dcm", "chrSQEncoding.dcm", "chrSQEncoding1.dcm",
        "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm",
        "SC_rgb_jls_lossy_sample.dcm", "SC_rgb_jpeg.dcm",
    }  # fmt: skip
    held: dict[str, bytes] = {}
    shared = 0
    for path, sent, ok in sendable:
        assert ok == (path.name not in expected_refusals), path.name
        if not ok:
            continue
        uid = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)
        if uid in held:
            shared += 1
        else:
            held[uid] = sent  # keep_first: the first copy sent is the one held
    assert shared >= 2, "the pydicom files that share SOP Instance UIDs were not sent"
    assert {uid: stored_dataset(gateway, uid) for uid in held} == held
    assert gateway.call("status")["instances"] == len(held)
    refused = [path for path, _, ok in sendable if not ok]
    assert gateway.log_text().count('"instance_refused"') >= len(refused)
    # Everything comes back by C-GET exactly as it was received.
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    from tests.scp.test_query_retrieve import c_get

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = [r[0] for r in index_rows(gateway, "SELECT study_uid FROM studies")]
    result = c_get(gateway, query, StudyRootQueryRetrieveInformationModelGet)
    assert result.final.Status == 0x0000
    assert result.final.NumberOfCompletedSuboperations == len(held)
    assert result.received == held


def test_bytes_are_stored_as_received(gateway: GatewayProcess, raw_sender: AE) -> None:
    names = ("CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
             "image_dfl.dcm", "rtdose_rle.dcm")  # fmt: skip
    for name in names:
        path = TEST_FILES / name
        assert send_raw(raw_sender, gateway, path) == 0x0000, name
        import pydicom

        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert stored_dataset(gateway, uid) == dataset_bytes(path), name
        # The checksum the receiver computed while the bytes arrived is the dataset's SHA-256.
        ((checksum, size),) = index_rows(
            gateway, "SELECT checksum, size FROM instances WHERE sop_uid = ?", (uid,)
        )
        assert checksum == hashlib.sha256(dataset_bytes(path)).hexdigest(), name
        assert size == len(dataset_bytes(path)), name


@pytest.mark.parametrize(
    ("attributes", "status", "reason"),
    [
        ({"SOPInstanceUID": "../../x"}, 0xC000, "SOPInstanceUID is not a valid UID"),
        ({"StudyInstanceUID": None}, 0xC000, "StudyInstanceUID is missing"),
        ({"SeriesInstanceUID": "1.2.abc"}, 0xC000, "SeriesInstanceUID is not a valid UID"),
    ],
)
def test_bad_identifiers_refused(
    gateway: GatewayProcess,
    raw_sender: AE,
    tmp_path: Path,
    attributes: dict[str, Any],
    status: int,
    reason: str,
) -> None:
    bad = write_variant(CT, tmp_path / "bad.dcm", **attributes)
    assert send_raw(raw_sender, gateway, bad) == status
    assert gateway.call("status")["instances"] == 0
    assert reason in gateway.log_text()
    assert not list((gateway.data_dir / "objects").rglob("*.dcm"))


def test_real_file_whose_meta_and_dataset_disagree(gateway: GatewayProcess, raw_sender: AE) -> None:
    # rtplan.dcm's File Meta names another SOP Instance than its dataset.
    assert send_raw(raw_sender, gateway, TEST_FILES / "rtplan.dcm") == 0xA900
    assert gateway.call("status")["instances"] == 0


def test_dataset_uid_differs_from_request(
    gateway: GatewayProcess, raw_sender: AE, tmp_path: Path
) -> None:
    # The request takes its SOP Instance UID from the File Meta; the dataset says another.
    import pydicom

    ds = pydicom.dcmread(CT)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    mismatched = tmp_path / "mismatch.dcm"
    ds.save_as(mismatched)
    assert send_raw(raw_sender, gateway, mismatched) == 0xA900
    assert gateway.call("status")["instances"] == 0
    assert "differs from the request" in gateway.log_text()


def test_truncated_dataset_refused(gateway: GatewayProcess, raw_sender: AE) -> None:
    assert send_raw(raw_sender, gateway, TEST_FILES / "MR_truncated.dcm") == 0xC000
    assert gateway.call("status")["instances"] == 0
    assert "dataset truncated" in gateway.log_text()


def test_disk_failure_is_out_of_resources(gateway: GatewayProcess, raw_sender: AE) -> None:
    objects = gateway.data_dir / "objects"
    shutil.rmtree(objects)
    objects.write_bytes(b"")  # the store cannot create its buckets
    assert send_raw(raw_sender, gateway, CT) == 0xA700
    assert gateway.call("status")["instances"] == 0
    assert "instance_not_stored" in gateway.log_text()
    objects.unlink()
    objects.mkdir()
    assert send_raw(raw_sender, gateway, CT) == 0x0000
    assert gateway.call("status")["instances"] == 1


def _variant(tmp_path: Path, text: str) -> Path:
    return write_variant(CT, tmp_path / f"{text}.dcm", StudyDescription=text)


@pytest.mark.parametrize("policy", ["keep_first", "overwrite", "reject"])
def test_duplicate_policy_over_dicom(gateway_factory: Any, tmp_path: Path, policy: str) -> None:
    gw = gateway_factory(node={"duplicate_policy": policy})
    first, second = _variant(tmp_path, "FIRST"), _variant(tmp_path, "SECOND")
    assert storescu(gw, first).returncode == 0
    identical = storescu(gw, first)
    assert identical.returncode == 0 and "Failed" not in identical.stderr
    other = storescu(gw, second, extra=("-v",))
    if policy == "reject":
        assert "Received Store Response (Error: CannotUnderstand)" in other.stderr, other.stderr
        assert '"status": "0xC111"' in gw.log_text()
    else:
        assert other.returncode == 0, other.stderr
    kept = "SECOND" if policy == "overwrite" else "FIRST"
    assert index_rows(gw, "SELECT study_description FROM studies") == [(kept,)]
    assert index_rows(gw, "SELECT count(*) FROM instances") == [(1,)]
    assert len(list((gw.data_dir / "objects").rglob("*.dcm"))) == 1


def test_one_uid_in_another_series_is_refused_and_the_association_goes_on(
    gateway_factory: Any, tmp_path: Path
) -> None:
    """DCMTK storescu sends CT, then the same SOP Instance UID in another series with other
    content, then MR on the same association: the second gets 0xC112 whatever the policy,
    logged with both series; CT stays as it was and MR is stored."""
    gw = gateway_factory(node={"duplicate_policy": "overwrite"})
    series = "1.2.826.0.1.3680043.8.498.77"
    clash = write_variant(CT, tmp_path / "clash.dcm", SeriesInstanceUID=series,
                          StudyDescription="another object")  # fmt: skip
    mr = TEST_FILES / "MR_small.dcm"
    sent = storescu(gw, CT, clash, mr, extra=("-nh", "-v"))  # it halts at a failure by default
    responses = re.findall(r"Received Store Response \((.*)\)", sent.stderr)
    assert responses == ["Success", "Error: CannotUnderstand", "Success"], sent.stderr
    held = index_rows(gw, "SELECT s.series_uid, st.study_description FROM series s"
                      " JOIN studies st ON s.study_pk = st.pk ORDER BY s.pk")  # fmt: skip
    ct = pydicom.dcmread(CT, stop_before_pixels=True)
    assert held[0] == (ct.SeriesInstanceUID, ct.get("StudyDescription"))
    assert len(held) == 2  # CT's series and MR's
    assert index_rows(gw, "SELECT count(*) FROM instances") == [(2,)]
    assert len(list((gw.data_dir / "objects").rglob("*.dcm"))) == 2
    (refused,) = [
        json.loads(line) for line in gw.log_text().splitlines()
        if line.startswith("{") and '"instance_refused"' in line
    ]  # fmt: skip
    assert refused["status"] == "0xC112"
    assert (
        ct.SeriesInstanceUID in refused["reason"]
        and "1.2.826.0.1.3680043.8.498.77" in refused["reason"]
    )
    assert gw.call("status")["sop_instance_uid_conflicts"] == 1


def test_private_sop_class_only_when_configured(
    gateway_factory: Any, raw_sender: AE, tmp_path: Path
) -> None:
    private_class = "1.2.826.0.1.3680043.9.9999.1"
    private = write_variant(CT, tmp_path / "private.dcm", SOPClassUID=private_class)
    import pydicom

    ds = pydicom.dcmread(private)
    ds.file_meta.MediaStorageSOPClassUID = private_class
    ds.save_as(private)
    closed = gateway_factory("closed")
    assert send_raw(raw_sender, closed, private) == NOT_ACCEPTED
    assert closed.call("status")["instances"] == 0
    opened = gateway_factory("open", node={"accept_unknown_sop_classes": True})
    assert send_raw(raw_sender, opened, private) == 0x0000
    assert opened.call("status")["instances"] == 1


def test_verification_from_pynetdicom_sets_nodelay_on_both_ends(gateway: GatewayProcess) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, gateway.port, ae_title=gateway.ae_title)
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000


def test_the_gateway_names_its_implementation_to_peers_and_in_its_files(
    gateway: GatewayProcess,
) -> None:
    """The A-ASSOCIATE-AC carries the gateway's Implementation Class UID and Version Name
    (PS3.7 D.3.3.2), seen by pynetdicom and by DCMTK, and a stored file's File Meta names the
    gateway as the implementation that wrote it (PS3.10 7.1)."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, gateway.port, ae_title=gateway.ae_title)
    assert assoc.is_established
    assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
    ds = pydicom.dcmread(CT)
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    (path,) = index_rows(gateway, "SELECT path FROM instances WHERE sop_uid = ?",
                         (str(ds.SOPInstanceUID),))[0]  # fmt: skip
    meta = pydicom.dcmread(gateway.data_dir / path, stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME

    echo = subprocess.run(
        [require("echoscu"), "-d", "-aec", gateway.ae_title, HOST, str(gateway.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert echo.returncode == 0, echo.stderr
    # DCMTK's debug log (stderr) dumps the A-ASSOCIATE-RQ, "Their" fields empty, then the -AC
    named = re.findall(r"Their Implementation (Class UID|Version Name):[ ]*(\S*)", echo.stderr)
    assert [(field, value) for field, value in named if value] == [
        ("Class UID", IMPLEMENTATION_CLASS_UID),
        ("Version Name", IMPLEMENTATION_VERSION_NAME),
    ]


@pytest.mark.parametrize(
    ("scu", "scp"), [(True, False), (True, True)], ids=["scu-only", "scu-and-scp"]
)
def test_a_sender_that_states_its_roles_can_store(
    gateway: GatewayProcess, scu: bool, scp: bool
) -> None:
    """SCP/SCU Role Selection (PS3.7 D.3.3.4) proposed by a storage SCU: the context is accepted
    with the sender as SCU, the reply grants what was proposed and nothing more, and the
    C-STORE is stored."""
    import pydicom
    from pynetdicom import build_role
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="ROLESCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    replies: list[Any] = []

    def on_accepted(event: Any) -> None:
        replies.extend(event.assoc.acceptor.role_selection.values())

    assoc = ae.associate(
        HOST, gateway.port, ae_title=gateway.ae_title,
        ext_neg=[build_role(CTImageStorage, scu_role=scu, scp_role=scp)],
        evt_handlers=[(evt.EVT_ACCEPTED, on_accepted)],
    )  # fmt: skip
    assert assoc.is_established
    try:
        (context,) = assoc.accepted_contexts
        assert context.as_scu is True and context.as_scp is scp
        ((granted_scu, granted_scp),) = [(r.scu_role, r.scp_role) for r in replies]
        assert (granted_scu, granted_scp) == (True, scp)
        ds = pydicom.dcmread(CT)
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    assert index_rows(gateway, "SELECT count(*) FROM instances") == [(1,)]


RETIRED = {
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.5": "Nuclear Medicine Image Storage (Retired)",
}


def test_retired_storage_classes_are_stored_and_sent_back(
    gateway_factory: Any, storescp: Any, tmp_path: Path
) -> None:
    """Instances of retired Storage SOP Classes (older US and NM equipment) are accepted from
    DCMTK storescu and go back out by C-MOVE to DCMTK storescp, bytes unchanged."""
    import pydicom

    from tests.scp.test_query_retrieve import movescu

    gw = gateway_factory(
        peers=[{"name": "dest", "ae_title": storescp.ae_title, "host": HOST,
                "port": storescp.port}],
    )  # fmt: skip
    files = []
    for n, sop_class in enumerate(RETIRED, start=1):
        ds = pydicom.dcmread(CT)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
            f"1.2.826.0.1.3680043.8.498.5{n}"
        )
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.6{n}"
        files.append(tmp_path / f"retired{n}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    sent = storescu(gw, *files, extra=("-v",))
    assert sent.stderr.count("Received Store Response (Success)") == 2, sent.stderr
    assert {row[0] for row in index_rows(gw, "SELECT sop_class_uid FROM instances")} == set(RETIRED)
    study = str(pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID)
    moved = movescu(gw, storescp.ae_title, "S", "QueryRetrieveLevel=STUDY",
                    f"StudyInstanceUID={study}")  # fmt: skip
    final = moved.stderr[moved.stderr.rindex("Received Final Move Response") :]
    assert re.search(r"Completed Suboperations\s*:\s*2\n", final), final
    assert re.search(r"DIMSE Status\s*:\s*0x0000: Success", final), final
    received = {str(pydicom.dcmread(p).SOPClassUID): p for p in storescp.files()}
    assert set(received) == set(RETIRED)
    for path in files:
        uid = str(pydicom.dcmread(path).SOPInstanceUID)
        (kept,) = [p for p in received.values() if str(pydicom.dcmread(p).SOPInstanceUID) == uid]
        assert dataset_bytes(kept) == stored_dataset(gw, uid)


def test_an_instance_on_an_inappropriate_context_is_refused_and_the_association_goes_on(
    gateway: GatewayProcess,
) -> None:
    """pydicom's rtdose_rle.dcm: its meta and dataset name different SOP classes, so DCMTK
    dcmsend puts it on a context of another class. It gets 0x0122 (SOP Class not supported),
    logged with the reason; the CT after it on the same association is stored; nothing of the
    refused dataset stays in tmp/."""
    sent = subprocess.run(
        [require("dcmsend"), "-v", "-aec", gateway.ae_title, HOST, str(gateway.port),
         str(TEST_FILES / "rtdose_rle.dcm"), str(CT)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=120,
    )  # fmt: skip
    output = sent.stdout + sent.stderr
    responses = re.findall(r"Received C-STORE Response \((.*)\)", output)
    assert responses == ["Refused: SOPClassNotSupported", "Success"], output
    assert "Aborted" not in output
    (refused,) = [
        json.loads(line) for line in gateway.log_text().splitlines()
        if line.startswith("{") and '"dimse_request_refused"' in line
    ]  # fmt: skip
    assert refused["status"] == "0x0122" and "negotiated for" in refused["reason"]
    (ended,) = [
        json.loads(line) for line in gateway.log_text().splitlines()
        if line.startswith("{") and '"association_released"' in line
    ]  # fmt: skip
    assert (ended["stored"], ended["refused"]) == (1, 1)
    assert index_rows(gateway, "SELECT count(*) FROM instances") == [(1,)]
    assert list((gateway.data_dir / "tmp").iterdir()) == []


def test_extended_negotiation_items_are_not_claimed_and_never_refuse(
    gateway: GatewayProcess,
) -> None:
    """A requestor proposing extended negotiation the node does not support (SOP Class Extended
    Negotiation for relational C-FIND, SOP Class Common Extended Negotiation, User Identity
    with a positive response requested, an Asynchronous Operations Window of 5) is accepted;
    nothing is claimed back (PS3.7 D.3.3.5, D.3.3.6, D.3.3.7: an acceptor that does not support
    an item leaves it out of its reply; PS3.7 D.3.3.3: the window reply is 1/1, no asynchrony),
    and C-STORE works."""
    import pydicom
    from pynetdicom.pdu_primitives import (
        AsynchronousOperationsWindowNegotiation,
        SOPClassCommonExtendedNegotiation,
        SOPClassExtendedNegotiation,
        UserIdentityNegotiation,
    )
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

    relational = SOPClassExtendedNegotiation()
    relational.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    relational.service_class_application_information = b"\x01"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = CTImageStorage
    common.service_class_uid = "1.2.840.10008.4.2"
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"operator"
    identity.positive_response_requested = True
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    ae = AE(ae_title="EXTNEG")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(
        HOST, gateway.port, ae_title=gateway.ae_title,
        ext_neg=[relational, common, identity, window],
    )  # fmt: skip
    assert assoc.is_established
    try:
        reply = assoc.acceptor
        assert reply.extended_negotiation == [] and reply.user_identity is None
        assert reply.asynchronous_operations in ((1, 1), None)
        assert len(assoc.accepted_contexts) == 2
        assert assoc.send_c_store(pydicom.dcmread(CT)).Status == 0x0000
    finally:
        assoc.release()


def test_a_dataset_past_max_instance_bytes_is_dropped_and_the_association_goes_on(
    gateway_factory: Any,
) -> None:
    """`[node] max_instance_bytes = 20000`: DCMTK storescu sends CT_small (38,870 dataset
    bytes), then MR_small (9,496) on the same association. The CT is refused 0xA700 once its
    bytes pass the limit, nothing of it stays in tmp/ or the index, and the MR is stored."""
    gw = gateway_factory(node={"max_instance_bytes": 20000})
    mr = TEST_FILES / "MR_small.dcm"
    sent = subprocess.run(
        [require("storescu"), "-v", "-nh", "-aec", gw.ae_title, HOST, str(gw.port),
         str(CT), str(mr)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=120,
    )  # fmt: skip
    output = sent.stdout + sent.stderr
    responses = re.findall(r"Received Store Response \((.*?)\)", output)
    assert len(responses) == 2 and "Success" not in responses[0], output
    assert "0xa700" in output.lower() or "OutOfResources" in responses[0], output
    assert responses[1] == "Success"
    assert output.count("Association Accepted") == 1
    (refused,) = [
        json.loads(line) for line in gw.log_text().splitlines()
        if line.startswith("{") and '"instance_refused"' in line
    ]  # fmt: skip
    assert refused["status"] == "0xA700" and "node.max_instance_bytes (20000" in refused["reason"]
    assert index_rows(gw, "SELECT sop_uid FROM instances") == [
        (str(pydicom.dcmread(mr, stop_before_pixels=True).SOPInstanceUID),)
    ]
    assert list((gw.data_dir / "tmp").iterdir()) == []
