"""The command sets and File Meta the gateway packs itself are byte for byte what pynetdicom
and pydicom encode, and the command sets it decodes itself read as pydicom reads them; the
association policy; descriptors above 1024."""

from __future__ import annotations

import io
import os
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import create_file_meta, decode, encode

from gateway.config import CallerSettings
from gateway.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.net import dimse
from gateway.net.association import encode_command
from gateway.net.dimse import SubOperations, c_store_rq, decode_command, response
from gateway.scp.policy import AssociationPolicy
from gateway.scp.receiving import encode_file_meta
from tests.conftest import (
    HOST,
    TEST_FILES,
    GatewayProcess,
    StoreSCP,
    dcmtk_env,
    require,
    write_variant,
)

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xA900, 0xC000, 0x0111])
@pytest.mark.parametrize(
    ("sop_class", "sop_instance"),
    [(CT, "1.2.3.4.5.6.7.8"), (CT, "1.2.3.4.55"), (None, None)],
)
def test_c_store_response_matches_pynetdicom(
    status: int, sop_class: str | None, sop_instance: str | None
) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.Status = status
    if sop_class:
        rsp.AffectedSOPClassUID = sop_class
        rsp.AffectedSOPInstanceUID = sop_instance
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    packed = response(0x8001, 7, status, sop_class or "", sop_instance or "")
    assert packed == encode(message.command_set, True, True)


@pytest.mark.parametrize("originator", [None, ("MOVER", 3), ("ODD", 65535)])
def test_c_store_request_matches_pynetdicom(originator: tuple[str, int] | None) -> None:
    rq = C_STORE()
    rq.MessageID = 9
    rq.AffectedSOPClassUID = CT
    rq.AffectedSOPInstanceUID = "1.2.3.4.5.6.7"
    rq.Priority = 0
    if originator is not None:
        rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = originator
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    message.command_set.CommandDataSetType = 0x0001
    packed = c_store_rq(9, CT, "1.2.3.4.5.6.7", move_originator=originator)
    assert packed == encode(message.command_set, True, True)


@pytest.mark.parametrize("kind", [(C_MOVE, C_MOVE_RSP, 0x8021), (C_GET, C_GET_RSP, 0x8010)])
@pytest.mark.parametrize(("status", "final"), [(0xFF00, False), (0xFE00, True), (0xB000, True)])
def test_retrieve_responses_match_pynetdicom(kind: tuple[Any, Any, int], status: int,
                                             final: bool) -> None:  # fmt: skip
    primitive_type, message_type, field = kind
    rsp = primitive_type()
    rsp.MessageIDBeingRespondedTo = 5
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    rsp.Status = status
    counts = SubOperations(4)
    counts.completed, counts.failed, counts.warning = 3, 2, 1
    if not final or status == 0xFE00:
        rsp.NumberOfRemainingSuboperations = 4
    rsp.NumberOfCompletedSuboperations = 3
    rsp.NumberOfFailedSuboperations = 2
    rsp.NumberOfWarningSuboperations = 1
    message = message_type()
    message.primitive_to_message(rsp)
    packed = response(field, 5, status, "1.2.840.10008.5.1.4.1.2.2.2", counts=counts,
                      remaining=not final or status == 0xFE00)  # fmt: skip
    assert packed == encode(message.command_set, True, True)


@pytest.mark.parametrize(
    "uids",
    [
        (CT, "1.2.3.4.5.6.7.8.9", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.44", "1.2.840.10008.1.2.4.50"),
        ("1.2.826.0.1.3680043.9.9999.1", "2.25.1234567890123", "1.2.840.10008.1.2"),
    ],
)
def test_file_meta_matches_pydicom(uids: tuple[str, str, str]) -> None:
    expected = io.BytesIO()
    meta = create_file_meta(
        sop_class_uid=uids[0],
        sop_instance_uid=uids[1],
        transfer_syntax=uids[2],
        implementation_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version=IMPLEMENTATION_VERSION_NAME,
    )
    write_file_meta_info(expected, meta)
    assert encode_file_meta(*uids) == expected.getvalue()
    # the gateway names itself, a valid UID and version name (PS3.5 9.1, PS3.7 D.3.3.2.2)
    assert IMPLEMENTATION_CLASS_UID.startswith("2.25.") and len(IMPLEMENTATION_CLASS_UID) <= 64
    assert meta.ImplementationClassUID.is_valid
    assert 1 <= len(IMPLEMENTATION_VERSION_NAME) <= 16 and IMPLEMENTATION_VERSION_NAME.isascii()


def _command(**elements: Any) -> Dataset:
    command = Dataset()
    for keyword, value in elements.items():
        setattr(command, keyword, value)
    return command


@pytest.mark.parametrize(
    "command",
    [
        _command(AffectedSOPClassUID=CT, CommandField=0x0001, MessageID=65535, Priority=2,
                 CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.3.4.55",
                 MoveOriginatorApplicationEntityTitle=" ODD", MoveOriginatorMessageID=3),
        _command(AffectedSOPClassUID=CT, CommandField=0x0021, MessageID=1,
                 MoveDestination="GATEWAY", Priority=0, CommandDataSetType=0x0001),
        _command(CommandField=0x8020, MessageIDBeingRespondedTo=4, CommandDataSetType=0x0101,
                 Status=0xC000, OffendingElement=[0x00100010, 0x00080052],
                 ErrorComment="bad key  "),
        _command(CommandField=0x8021, MessageIDBeingRespondedTo=4, CommandDataSetType=0x0101,
                 Status=0xFF00, NumberOfRemainingSuboperations=0,
                 NumberOfCompletedSuboperations=65535, NumberOfFailedSuboperations=1,
                 NumberOfWarningSuboperations=0, OffendingElement=0x00100020),
        _command(RequestedSOPClassUID="1.2.840.10008.3.1.2.3.3", CommandField=0x0120,
                 MessageID=2, CommandDataSetType=0x0001, RequestedSOPInstanceUID="1.2.3"),
        _command(CommandField=0x0FFF, MessageIDBeingRespondedTo=6, CommandDataSetType=0x0101),
    ],
    ids=["c-store-rq", "c-move-rq", "c-find-rsp-error", "c-move-rsp", "n-set-rq", "c-cancel"],
)  # fmt: skip
def test_decoded_command_reads_as_pydicom_reads_it(command: Dataset) -> None:
    encoded = encode_command(command)
    ours = decode_command(encoded)
    theirs = decode(io.BytesIO(encoded), True, True)
    for element in theirs:
        value = element.value
        expected = [int(v) for v in value] if element.VR == "AT" and element.VM > 1 else value
        assert getattr(ours, element.keyword) == expected, element.keyword
    assert len(ours._values) == len(theirs)
    assert "Status" in ours or not hasattr(theirs, "Status")
    with pytest.raises(AttributeError):
        _ = ours.NoSuchKeyword


@pytest.mark.parametrize(
    "encoded",
    [
        b"\x00\x00\x00\x01\x04\x00\x00\x00\x01\x00",  # runs past the end
        b"\x00\x00\x00\x01\xff\xff\xff\xff",  # undefined length
        b"\x08\x00\x18\x00\x02\x00\x00\x00\x31\x00",  # outside group 0000
        b"\x00\x00\x00\x01\x02\x00",  # a partial header
        b"\x00\x00\x00\x01\x03\x00\x00\x00\x01\x00\x00",  # a US of 3 bytes
    ],
)
def test_malformed_command_sets_are_refused(encoded: bytes) -> None:
    with pytest.raises(ValueError):
        decode_command(encoded)


def test_made_up_command_elements_are_kept_as_bytes_and_remembered_nowhere() -> None:
    made_up = b"".join(
        struct.pack("<HHI", 0, elem, 2) + b"\x01\x00" for elem in range(0x6000, 0x6400, 2)
    )
    command = decode_command(struct.pack("<HHI", 0, 0x0100, 2) + b"\x01\x00" + made_up)
    assert command.CommandField == 1 and command.get("(0000,6002)") == b"\x01\x00"
    group_0000 = [tag for tag in DicomDictionary if tag >> 16 == 0]
    assert set(dimse._COMMAND_ELEMENTS) <= {tag & 0xFFFF for tag in group_0000}


def test_policy_decisions() -> None:
    policy = AssociationPolicy(
        ae_title="GATEWAY",
        check_called_ae=True,
        allowed_callers=(
            CallerSettings(ae_title="CT1", host="10.0.0.1"),
            CallerSettings(ae_title="MR"),
        ),
        max_associations=2,
    )
    assert policy.rejection("CT1", "GATEWAY", "10.0.0.1", 1) is None
    assert policy.rejection("MR  ", "GATEWAY ", "10.9.9.9", 2) is None
    assert policy.rejection("CT1", "OTHER", "10.0.0.1", 1)[0] == "called_ae_title_not_recognised"  # type: ignore[index]
    assert policy.rejection("XX", "GATEWAY", "10.0.0.1", 1)[0] == "calling_ae_title_not_allowed"  # type: ignore[index]
    assert policy.rejection("CT1", "GATEWAY", "10.0.0.2", 1)[0] == "calling_host_not_allowed"  # type: ignore[index]
    assert policy.rejection("MR", "GATEWAY", "h", 3) == ("association_limit_reached", 2, 3, 2)


def test_descriptors_above_1024(tmp_path: Path) -> None:
    """Nothing depends on descriptor numbers below 1024 (select() fails above 1023): with 1100
    descriptors held open, every socket, pipe and file the gateway opens is numbered above them,
    and it still serves C-ECHO, C-STORE, C-FIND and C-MOVE, and echoes a peer."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    scp = StoreSCP(tmp_path / "received")
    gw = GatewayProcess(tmp_path / "gw")
    try:
        gw.write_config(peers=[{"name": "storescp", "ae_title": scp.ae_title, "host": HOST,
                                "port": scp.port}])  # fmt: skip
        gw.start(pass_fds=tuple(held))
        assert max(int(fd) for fd in os.listdir(f"/proc/{gw.pid}/fd")) > 1100
        study, sop = generate_uid(), generate_uid()
        path = write_variant(TEST_FILES / "CT_small.dcm", tmp_path / "ct.dcm",
                             StudyInstanceUID=study, SOPInstanceUID=sop)  # fmt: skip
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
        _dcmtk(gw, "echoscu")
        _dcmtk(gw, "storescu", files=[str(path)])
        assert study in _dcmtk(gw, "findscu", "-S", *keys)
        _dcmtk(gw, "movescu", "-S", "-aem", scp.ae_title, *keys)
        assert len(scp.files()) == 1
        assert gw.call("echo", {"peer": "storescp"})["status"] == 0
    finally:
        gw.stop()
        scp.stop()
        for fd in held:
            os.close(fd)


def _dcmtk(gw: GatewayProcess, tool: str, *args: str, files: Sequence[str] = ()) -> str:
    result = subprocess.run(
        [require(tool), "-aec", gw.ae_title, *args, HOST, str(gw.port), *files],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr
