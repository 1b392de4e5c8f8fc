"""send_instances against a real pynetdicom receiver that records every C-STORE."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from gateway.config import NodeSettings, PeerSettings
from gateway.scu import sender
from gateway.scu.requestor import IdleAssociations
from gateway.scu.sender import MAX_CONTEXTS, Delivery, context_batches
from gateway.store.store import StoredInstance
from tests.conftest import HOST, TEST_FILES, dataset_bytes, free_port

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
NODE = NodeSettings(ae_title="GATEWAY", acse_timeout=5, dimse_timeout=5, network_timeout=5)


class Recorder:
    """A storage SCP recording (SOP Instance UID, transfer syntax, dataset bytes) per C-STORE."""

    def __init__(
        self,
        syntaxes: list[str] | None = None,
        answer: int = 0x0000,
        port: int | None = None,
        delay: float = 0.0,
    ) -> None:
        self.delay = delay
        self.received: list[tuple[str, str, bytes]] = []
        self.answer = answer
        self.ae = AE(ae_title="RECORDER")
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, syntaxes or ALL_TRANSFER_SYNTAXES)
        self.port = port or free_port()
        self.associations: list[str] = []  # how each association ended: released / aborted
        self.server = self.ae.start_server(
            (HOST, self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                          (evt.EVT_RELEASED, lambda _: self.associations.append("released")),
                          (evt.EVT_ABORTED, lambda _: self.associations.append("aborted"))],
        )  # fmt: skip
        self.nodelay: list[int] = []
        self.requestors: list[tuple[str, str]] = []  # (implementation class UID, version name)

    def _on_store(self, event: Any) -> int:
        if self.delay:
            time.sleep(self.delay)
        requestor = event.assoc.requestor
        self.requestors.append(
            (requestor.implementation_class_uid, requestor.implementation_version_name)
        )
        self.received.append(
            (
                str(event.request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax),
                event.request.DataSet.getvalue(),
            )
        )
        return self.answer

    @property
    def peer(self) -> PeerSettings:
        return PeerSettings(name="recorder", ae_title="RECORDER", host=HOST, port=self.port)

    def stop(self) -> None:
        self.server.shutdown()


def send_instances(
    node: NodeSettings, peer: PeerSettings, instances: list[StoredInstance], **kwargs: Any
) -> list[Delivery]:
    """`gateway.scu.sender.send_instances` on an event loop of its own."""
    return asyncio.run(sender.send_instances(node, peer, instances, **kwargs))


def instance(path: Path) -> StoredInstance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return StoredInstance(
        str(ds.SOPInstanceUID),
        str(ds.SOPClassUID),
        str(ds.file_meta.TransferSyntaxUID),
        path,
        len(dataset_bytes(path)),
    )


FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "MR_small_bigendian.dcm"]


def test_sends_the_stored_bytes_in_their_own_syntax(recorder: Recorder) -> None:
    instances = [instance(TEST_FILES / name) for name in FILES]
    results: list[Delivery] = []
    deliveries = send_instances(NODE, recorder.peer, instances, on_result=results.append)
    assert deliveries == results
    assert [d.delivered for d in deliveries] == [True] * len(FILES)
    assert [uid for uid, _, _ in recorder.received] == [i.sop_instance_uid for i in instances]
    for (_, syntax, data), sent in zip(recorder.received, instances, strict=True):
        assert syntax == sent.transfer_syntax
        assert data == dataset_bytes(sent.path)


def decoded(data: bytes, syntax: str) -> pydicom.Dataset:
    """A received dataset (bytes in *syntax*) decoded, for element-by-element comparison."""
    from io import BytesIO

    from pydicom.filereader import read_dataset
    from pydicom.uid import UID

    uid = UID(syntax)
    return read_dataset(BytesIO(data), uid.is_implicit_VR, uid.is_little_endian)


def _same_elements(received: pydicom.Dataset, source: pydicom.Dataset, where: str) -> None:
    """Every element of *source* is in *received* with its value, sequences item by item.
    Implicit VR carries no VR: a private element is read back as a guess (PS3.5 7.1.3), so its
    presence is what can be compared."""
    changed = {"PixelData", "PhotometricInterpretation", "LossyImageCompression"}
    changed |= {"PlanarConfiguration"}  # decoders give colour-by-pixel
    changed |= {"DataSetTrailingPadding"}  # a receiver may drop it (PS3.10 7.2)
    for elem in source:
        if elem.keyword in changed or elem.tag.group == 0x0002 or elem.tag.element == 0x0000:
            continue  # (gggg,0000): Group Length, dropped when re-encoded (PS3.5 7.2)
        assert elem.tag in received, f"{where}: {elem.keyword or elem.tag} missing"
        if elem.VR == "SQ":
            items = received[elem.tag].value
            assert len(items) == len(elem.value), f"{where}: {elem.keyword}"
            for n, (got, item) in enumerate(zip(items, elem.value, strict=True)):
                _same_elements(got, item, f"{where}: {elem.keyword}[{n}]")
        elif not elem.tag.is_private:
            assert received[elem.tag].value == elem.value, f"{where}: {elem.keyword}"


def assert_same_instance(received: pydicom.Dataset, original: Path) -> None:
    """The same elements with the same values (Pixel Data compared decoded), whatever the
    transfer syntax: what a destination that re-encodes must get."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # real-world files: odd values are theirs to keep
        source = pydicom.dcmread(original)
        received.file_meta = pydicom.dataset.FileMetaDataset()
        received.file_meta.TransferSyntaxUID = EXPLICIT
        _same_elements(received, source, original.name)
        assert received.SOPInstanceUID == source.SOPInstanceUID
        if "PixelData" not in source:
            return
        syntax = source.file_meta.TransferSyntaxUID
        if not syntax.is_compressed and syntax.is_little_endian:  # the same bytes
            assert received.PixelData == source.PixelData, original.name
        else:
            assert np.array_equal(received.pixel_array, source.pixel_array), original.name


def test_peer_taking_only_implicit_gets_every_syntax_re_encoded() -> None:
    """Explicit LE, Explicit BE, JPEG 2000 and RLE instances to a peer that accepts Implicit VR
    Little Endian only: each arrives in Implicit VR with the same elements and pixels."""
    recorder = Recorder(syntaxes=["1.2.840.10008.1.2"])
    try:
        instances = [instance(TEST_FILES / name) for name in FILES]
        deliveries = send_instances(NODE, recorder.peer, instances)
        assert [d.delivered for d in deliveries] == [True] * len(FILES), deliveries
        assert [uid for uid, _, _ in recorder.received] == [i.sop_instance_uid for i in instances]
        for (_, syntax, data), sent in zip(recorder.received, instances, strict=True):
            assert syntax == "1.2.840.10008.1.2"
            assert_same_instance(decoded(data, syntax), sent.path)
    finally:
        recorder.stop()


def test_stored_syntax_is_preferred_to_re_encoding() -> None:
    """A peer that takes Explicit VR Little Endian and RLE gets the RLE instance as stored and
    the JPEG 2000 one decompressed to Explicit VR (preferred to Implicit)."""
    recorder = Recorder(syntaxes=[EXPLICIT, IMPLICIT, "1.2.840.10008.1.2.5"])  # and RLE
    try:
        rle, j2k = (instance(TEST_FILES / n) for n in ("SC_rgb_rle.dcm", "JPEG2000.dcm"))
        assert all(d.delivered for d in send_instances(NODE, recorder.peer, [rle, j2k]))
        (_, rle_syntax, rle_data), (_, j2k_syntax, j2k_data) = recorder.received
        assert (rle_syntax, rle_data) == (rle.transfer_syntax, dataset_bytes(rle.path))
        assert j2k_syntax == "1.2.840.10008.1.2.1"
        assert_same_instance(decoded(j2k_data, j2k_syntax), j2k.path)
    finally:
        recorder.stop()


def test_transcode_false_sends_stored_syntaxes_only() -> None:
    recorder = Recorder(syntaxes=["1.2.840.10008.1.2.1"])  # Explicit VR Little Endian only
    try:
        peer = recorder.peer.model_copy(update={"transcode": False})
        instances = [instance(TEST_FILES / n) for n in ("CT_small.dcm", "JPEG2000.dcm")]
        ct, jpeg = send_instances(NODE, peer, instances)
        assert ct.delivered
        assert not jpeg.delivered and jpeg.status is None
        assert jpeg.error == (
            "no_context: peer recorder accepted no presentation context for Secondary Capture"
            " Image Storage (1.2.840.10008.5.1.4.1.1.7) in JPEG 2000 Image Compression"
            " (1.2.840.10008.1.2.4.91) (proposed: JPEG 2000 Image Compression"
            " (1.2.840.10008.1.2.4.91)) (transcode = false: stored syntaxes only)"
        )
        assert len(recorder.received) == 1
    finally:
        recorder.stop()


def test_no_accepted_context_names_what_was_proposed() -> None:
    """A peer that takes no syntax the gateway can send (only JPEG baseline here) fails that
    instance, naming the class and the syntaxes proposed; nothing is compressed. Alone, the
    association has no context at all (pynetdicom aborts it): the same error."""
    recorder = Recorder(syntaxes=["1.2.840.10008.1.2.4.50"])
    try:
        ct_file, jpeg_file = (TEST_FILES / n for n in ("CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm"))
        ct, jpeg = send_instances(NODE, recorder.peer, [instance(ct_file), instance(jpeg_file)])
        assert jpeg.delivered
        (alone,) = send_instances(NODE, recorder.peer, [instance(ct_file)])
        assert alone.error == ct.error
        assert not ct.delivered and not ct.permanent
        assert ct.error == (
            "no_context: peer recorder accepted no presentation context for CT Image Storage"
            " (1.2.840.10008.5.1.4.1.1.2) in Explicit VR Little Endian (1.2.840.10008.1.2.1)"
            " (proposed: Explicit VR Little Endian (1.2.840.10008.1.2.1), Implicit VR Little"
            " Endian (1.2.840.10008.1.2))"
        )
        assert [uid for uid, _, _ in recorder.received] == [jpeg.sop_instance_uid]
    finally:
        recorder.stop()


def test_undecodable_instance_fails_permanently_and_the_rest_go(tmp_path: Path) -> None:
    """JPEG 2000 pixel data cut short cannot be decompressed for an uncompressed-only peer: that
    instance fails (kind transcode, permanent), the next one is still sent."""
    source = pydicom.dcmread(TEST_FILES / "JPEG2000.dcm")
    frames = source.PixelData
    source.PixelData = frames[: len(frames) // 3] + b"\x00"
    broken = tmp_path / "broken.dcm"
    source.save_as(broken)
    recorder = Recorder(syntaxes=["1.2.840.10008.1.2"])
    try:
        bad, ct = send_instances(
            NODE, recorder.peer, [instance(broken), instance(TEST_FILES / "CT_small.dcm")]
        )
        assert not bad.delivered and bad.permanent
        assert (bad.error or "").startswith(
            "transcode: broken.dcm: cannot re-encode JPEG 2000 Image Compression"
            " (1.2.840.10008.1.2.4.91) as Implicit VR Little Endian (1.2.840.10008.1.2): "
        )
        assert ct.delivered
        assert [uid for uid, _, _ in recorder.received] == [ct.sop_instance_uid]
    finally:
        recorder.stop()


@pytest.mark.parametrize(("answer", "delivered"), [(0xB000, True), (0xB007, True), (0xA700, False)])
def test_warning_counts_as_delivered_failure_does_not(answer: int, delivered: bool) -> None:
    recorder = Recorder(answer=answer)
    try:
        (result,) = send_instances(NODE, recorder.peer, [instance(TEST_FILES / "CT_small.dcm")])
        assert result.status == answer
        assert result.delivered is delivered
        if not delivered:
            assert result.error == "status: peer recorder answered C-STORE with 0xA700"
    finally:
        recorder.stop()


def test_unreachable_peer_fails_every_instance() -> None:
    """Each refused attempt's socket is closed (pynetdicom drops it open): no ResourceWarning,
    which the suite turns into an error, when the garbage collector runs."""
    peer = PeerSettings(name="down", ae_title="DOWN", host=HOST, port=free_port())
    results = send_instances(NODE, peer, [instance(TEST_FILES / n) for n in FILES[:2]])
    assert [r.delivered for r in results] == [False, False]
    assert all((r.error or "").startswith("unreachable: peer down") for r in results)
    assert all("connection refused" in (r.error or "") and not r.permanent for r in results)
    import gc

    gc.collect()  # a socket left open would warn here


def test_rejected_association_is_reported(recorder: Recorder) -> None:
    peer = PeerSettings(name="recorder", ae_title="RECORDER", host=HOST, port=recorder.port)
    recorder.ae.require_calling_aet = ["SOMEONE"]
    (result,) = send_instances(NODE, peer, [instance(TEST_FILES / "CT_small.dcm")])
    assert not result.delivered and result.permanent
    assert result.error == (
        f"rejected: peer recorder (RECORDER at 127.0.0.1:{recorder.port}) rejected the"
        " association: Rejected Permanent, Service User, Calling AE title not recognised"
        " (A-ASSOCIATE-RJ result 1, source 1, reason 3)"
    )


def test_context_batches_hold_at_most_128_contexts() -> None:
    """Each (SOP class, syntax) pair is a context, and each SOP class one more for the
    uncompressed fallback unless the peer has transcode = false."""
    from gateway.scu.syntaxes import context_count

    def fake(n: int) -> StoredInstance:
        return StoredInstance(f"1.2.{n}", f"1.2.840.{n % 200}", "1.2.840.10008.1.2.1", Path("x"), 1)

    instances = [fake(n) for n in range(500)]
    for transcode, count in ((False, 4), (True, 8)):  # 128 + 72 + 128 + 72; or by 64 classes
        batches = list(context_batches(instances, transcode=transcode))
        assert [i for b in batches for i in b] == instances
        for batch in batches:
            pairs = {(i.sop_class_uid, i.transfer_syntax) for i in batch}
            assert context_count(pairs, transcode=transcode) <= MAX_CONTEXTS
        assert len(batches) == count


def test_an_idle_association_serves_the_next_send_and_is_released_after_the_delay(
    recorder: Recorder,
) -> None:
    """Three sends within the delay: CT, CT again (the same proposal: the kept association),
    then MR, whose context the kept one was not proposed (a new association, kept in place of
    the CT one, which is released: one idle association per peer). After the delay the MR one
    is released too, A-RELEASE."""
    ct, mr = instance(TEST_FILES / "CT_small.dcm"), instance(TEST_FILES / "MR_small.dcm")

    async def sends() -> list[list[Delivery]]:
        idle = IdleAssociations(0.5)
        results = [
            await sender.send_instances(NODE, recorder.peer, [each], idle=idle)
            for each in (ct, ct, mr)
        ]
        await asyncio.sleep(0.2)
        assert recorder.associations == ["released"]  # the CT one, when the MR one was kept
        assert len(recorder.ae.active_associations) == 1
        await asyncio.sleep(1.0)
        return results

    results = asyncio.run(sends())
    assert [d.delivered for batch in results for d in batch] == [True, True, True]
    assert [uid for uid, _, _ in recorder.received] == [
        ct.sop_instance_uid, ct.sop_instance_uid, mr.sop_instance_uid
    ]  # fmt: skip
    _until(lambda: recorder.associations == ["released", "released"])


def test_an_idle_association_the_peer_ended_is_replaced_without_a_failure() -> None:
    """The receiver aborts associations idle for 0.3 s; the gateway keeps them 5 s. The
    second send finds the kept association gone and delivers on a new one."""
    recorder = Recorder()
    recorder.ae.network_timeout = 0.3
    try:
        ct = instance(TEST_FILES / "CT_small.dcm")

        async def sends() -> list[Delivery]:
            idle = IdleAssociations(5.0)
            try:
                first = await sender.send_instances(NODE, recorder.peer, [ct], idle=idle)
                await asyncio.sleep(1.0)  # the receiver's idle timeout passes
                second = await sender.send_instances(NODE, recorder.peer, [ct], idle=idle)
            finally:
                await idle.close()
            return first + second

        deliveries = asyncio.run(sends())
        assert [d.delivered for d in deliveries] == [True, True], deliveries
        assert len(recorder.received) == 2
        _until(lambda: sorted(recorder.associations) == ["aborted", "released"])
    finally:
        recorder.stop()


def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
