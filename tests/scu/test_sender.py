"""send_instances against a real pynetdicom receiver that records every C-STORE."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt

from gateway.config import NodeSettings, PeerSettings
from gateway.scu.sender import MAX_CONTEXTS, Delivery, context_batches, send_instances
from gateway.store.store import InstanceFile
from tests.conftest import HOST, TEST_FILES, dataset_bytes, free_port

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
        self.server = self.ae.start_server(
            (HOST, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.nodelay: list[int] = []

    def _on_store(self, event: Any) -> int:
        if self.delay:
            time.sleep(self.delay)
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


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.stop()


@pytest.fixture(autouse=True)
def _restore_send_mode() -> Iterator[None]:
    previous = _config.STORE_SEND_CHUNKED_DATASET
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def instance(path: Path) -> InstanceFile:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceFile(
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


def test_no_accepted_context_fails_that_instance_only() -> None:
    recorder = Recorder(syntaxes=["1.2.840.10008.1.2.1"])  # Explicit VR Little Endian only
    try:
        instances = [instance(TEST_FILES / n) for n in ("CT_small.dcm", "JPEG2000.dcm")]
        ct, jpeg = send_instances(NODE, recorder.peer, instances)
        assert ct.delivered
        assert not jpeg.delivered and jpeg.status is None
        assert (jpeg.error or "").startswith("no_context: peer recorder accepted no presentation")
        assert "Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7)" in (jpeg.error or "")
        assert "1.2.840.10008.1.2.4.91" in (jpeg.error or "") or "1.2.840.10008.1.2.4.90" in (
            jpeg.error or ""
        )
        assert len(recorder.received) == 1
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


def test_context_batches_hold_at_most_128_pairs() -> None:
    def fake(n: int) -> InstanceFile:
        return InstanceFile(f"1.2.{n}", f"1.2.840.{n % 200}", "1.2.840.10008.1.2.1", Path("x"), 1)

    instances = [fake(n) for n in range(500)]
    batches = list(context_batches(instances))
    assert [i for b in batches for i in b] == instances
    for batch in batches:
        assert len({(i.sop_class_uid, i.transfer_syntax) for i in batch}) <= MAX_CONTEXTS
    assert len(batches) == 4  # 200 distinct pairs, met in order: 128 + 72 + 128 + 72
