"""The asyncio requestor (`gateway.scu.requestor`) against pynetdicom storage SCPs: stored
bytes unchanged (a large file in pieces), re-encoding, responses routed by Message ID, the
DIMSE timeout, and the `PeerError` of each way an association can fail."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import decode
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage

from gateway.config import PeerSettings
from gateway.errors import PeerError
from gateway.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.net.association import Aborted, Association
from gateway.scu import requestor
from gateway.scu.requestor import dataset_offset, open_association, store_instance
from gateway.scu.syntaxes import storage_contexts
from gateway.store.store import StoredInstance
from tests.conftest import HOST, TEST_FILES, dataset_bytes, free_port
from tests.scu.test_sender import IMPLICIT, NODE, Recorder, instance

CT = TEST_FILES / "CT_small.dcm"


async def _associated(recorder: Recorder, stored: StoredInstance, *, transcode: bool = True
                      ) -> Association:  # fmt: skip
    """An association with *recorder* proposing what is proposed for *stored*."""
    pairs = [(stored.sop_class_uid, stored.transfer_syntax)]
    return await open_association(NODE, recorder.peer, storage_contexts(pairs, transcode=transcode))


def _large_ct(path: Path, frames: int) -> Path:
    """CT_small with *frames* 512x512 16-bit frames: ~0.5 MB each."""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.PixelData = np.arange(frames * 512 * 512, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.asyncio
async def test_a_file_larger_than_one_read_goes_out_in_pieces_unchanged(
    recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 frames (12 MB) sent with reads of 1 MB: twelve reads and more, each fragmented to
    the peer's PDU length; the receiver has the stored data set bytes exactly."""
    monkeypatch.setattr(requestor, "_READ_SIZE", 1 << 20)
    stored = instance(_large_ct(tmp_path / "large.dcm", 24))
    small = instance(CT)
    assoc = await _associated(recorder, stored)
    try:
        for each in (stored, small):
            status = await store_instance(assoc, each, transcode=True, peer="recorder",
                                          dimse_timeout=10)  # fmt: skip
            assert status == 0x0000
    finally:
        await assoc.release()
    assert [(uid, syntax) for uid, syntax, _ in recorder.received] == [
        (stored.sop_instance_uid, stored.transfer_syntax),
        (small.sop_instance_uid, small.transfer_syntax),
    ]
    assert recorder.received[0][2] == dataset_bytes(stored.path)
    assert recorder.received[1][2] == dataset_bytes(small.path)
    # the A-ASSOCIATE-RQ named the gateway's implementation (PS3.7 D.3.3.2)
    assert recorder.requestors == [(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)] * 2


@pytest.mark.asyncio
async def test_a_peer_that_takes_implicit_only_gets_the_data_set_re_encoded(
    tmp_path: Path,
) -> None:
    recorder = Recorder(syntaxes=[IMPLICIT])
    try:
        stored = instance(CT)
        assoc = await _associated(recorder, stored)
        try:
            status = await store_instance(assoc, stored, transcode=True, peer="recorder",
                                          dimse_timeout=10)  # fmt: skip
        finally:
            await assoc.release()
        assert status == 0x0000
        ((uid, syntax, data),) = recorder.received
        assert (uid, syntax) == (stored.sop_instance_uid, IMPLICIT)
        received = decode(io.BytesIO(data), True, True)  # Implicit VR Little Endian
        assert received.PixelData == pydicom.dcmread(CT).PixelData
        with pytest.raises(PeerError) as refused:
            await _associated(recorder, stored, transcode=False)
        assert refused.value.kind == "no_context"
        assert "CT Image Storage" in str(refused.value)
    finally:
        recorder.stop()


@pytest.mark.asyncio
async def test_a_failure_status_is_returned_as_answered() -> None:
    recorder = Recorder(answer=0xA700)
    try:
        stored = instance(CT)
        assoc = await _associated(recorder, stored)
        try:
            assert await store_instance(assoc, stored, transcode=True, peer="recorder",
                                        dimse_timeout=10) == 0xA700  # fmt: skip
        finally:
            await assoc.release()
    finally:
        recorder.stop()


@pytest.mark.asyncio
async def test_no_response_within_the_dimse_timeout_aborts() -> None:
    """The receiver takes 2 s per instance, the DIMSE timeout is 0.5 s: the association is
    aborted and the instance fails as `aborted`; the late response goes nowhere."""
    recorder = Recorder(delay=2.0)
    try:
        stored = instance(CT)
        assoc = await _associated(recorder, stored)
        with pytest.raises(PeerError) as failed:
            await store_instance(assoc, stored, transcode=True, peer="recorder",
                                 dimse_timeout=0.5)  # fmt: skip
        assert failed.value.kind == "aborted"
        assert "0.5 s" in str(failed.value)
        assert not assoc.is_established
        with pytest.raises(Aborted), assoc.awaiting(assoc.next_message_id()) as responses:
            await responses.next(1.0)
    finally:
        recorder.stop()


@pytest.mark.asyncio
async def test_each_failure_to_associate_is_a_peer_error_of_its_kind() -> None:
    contexts = [build_context(CTImageStorage, ExplicitVRLittleEndian)]
    down = PeerSettings(name="down", ae_title="DOWN", host=HOST, port=free_port())
    with pytest.raises(PeerError) as unreachable:
        await open_association(NODE, down, contexts)
    assert unreachable.value.kind == "unreachable"
    assert "peer down (DOWN at 127.0.0.1:" in str(unreachable.value)
    recorder = Recorder()
    recorder.ae.require_called_aet = True
    try:
        wrong = PeerSettings(name="wrong", ae_title="NOTTHEM", host=HOST, port=recorder.port)
        with pytest.raises(PeerError) as rejected:
            await open_association(NODE, wrong, contexts)
        assert rejected.value.kind == "rejected" and rejected.value.permanent
        assert "Called AE title not recognised" in str(rejected.value)
        assert "result 1, source 1, reason 7" in str(rejected.value)
    finally:
        recorder.stop()


def test_dataset_offset_reads_the_group_length_and_falls_back_to_parsing(tmp_path: Path) -> None:
    assert dataset_offset(CT) == len(CT.read_bytes()) - len(dataset_bytes(CT))
    # No (0002,0000) group length (its 12 bytes cut out): the meta is parsed element by element.
    raw = CT.read_bytes()
    offset = dataset_offset(CT)
    path = tmp_path / "no-group-length.dcm"
    path.write_bytes(raw[:132] + raw[144:])
    assert dataset_offset(path) == offset - 12
