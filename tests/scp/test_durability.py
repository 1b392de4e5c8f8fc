"""Durability under kill -9, and bounded memory while receiving a 500 MB instance."""

from __future__ import annotations

import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_context

from tests.conftest import HOST, GatewayProcess, dataset_bytes


def _ct(study: str, series: str, number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = "CRASH"
    ds.PatientName = "Durability^Test"
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * 32
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def make_instances(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(count):
        path = directory / f"{number:04d}.dcm"
        _ct(study, series, number).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Sender(threading.Thread):
    """Sends files on one association; remembers each SOP Instance UID acknowledged."""

    def __init__(self, gw: GatewayProcess, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.gw, self.files = gw, files
        self.acknowledged: list[tuple[str, Path]] = []
        self.error: str | None = None

    def run(self) -> None:
        ae = AE(ae_title="CRASHSCU")
        assoc = ae.associate(
            HOST,
            self.gw.port,
            ae_title=self.gw.ae_title,
            contexts=[build_context(CTImageStorage, ExplicitVRLittleEndian)],
        )
        if not assoc.is_established:
            self.error = "not established"
            return
        try:
            for path in self.files:
                status = assoc.send_c_store(path)
                if "Status" not in status:
                    self.error = "no response"
                    return
                if status.Status == 0x0000:
                    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                    self.acknowledged.append((str(uid), path))
        except Exception as exc:  # the gateway was killed under us
            self.error = repr(exc)
        finally:
            if assoc.is_established:
                assoc.abort()
            self.assoc = assoc

    def close(self) -> None:
        """Close what a killed peer left open (pynetdicom keeps the socket of a broken link)."""
        sock = getattr(self, "assoc", None) and self.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.close()


@pytest.fixture
def raw_files() -> Any:
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def test_kill_9_during_four_association_ingest(
    gateway_factory: Any, tmp_path: Path, raw_files: Any
) -> None:
    gw = gateway_factory()
    senders = [Sender(gw, make_instances(tmp_path / f"set{i}", 400)) for i in range(4)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 60
    while sum(len(s.acknowledged) for s in senders) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    gw.kill()  # SIGKILL, mid-ingest
    for sender in senders:
        sender.join(30)
        sender.close()
    acknowledged = [pair for s in senders for pair in s.acknowledged]
    assert 150 <= len(acknowledged) < 1600, "the kill did not land mid-ingest"

    gw.start()
    with sqlite3.connect(gw.data_dir / "index.sqlite") as conn:
        rows = dict(conn.execute("SELECT sop_uid, path FROM instances").fetchall())
    # Every acknowledged instance is present, indexed, and byte-identical to what was sent.
    for uid, source in acknowledged:
        assert uid in rows, uid
        assert dataset_bytes(gw.data_dir / rows[uid]) == dataset_bytes(source)
    # Nothing half-written is visible: every indexed file is whole, no temp file is left.
    from gateway.store.instance import read_received_file

    for relpath in rows.values():
        read_received_file(gw.data_dir / relpath)
    assert not list((gw.data_dir / "tmp").iterdir())
    on_disk = {str(p.relative_to(gw.data_dir)) for p in (gw.data_dir / "objects").rglob("*.dcm")}
    assert on_disk == set(rows.values())
    assert gw.call("status")["instances"] == len(rows)
    log = gw.log_text()
    assert '"store_opened"' in log.split('"gateway_started"')[-2]  # the restart reconciled


def _write_large_instance(path: Path, pixel_bytes: int) -> str:
    """A CT whose 16-bit pixel data is *pixel_bytes* long, written without holding it."""
    rows = 10000
    columns = pixel_bytes // (2 * rows)
    ds = _ct(generate_uid(), generate_uid(), 1)
    del ds.PixelData
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(path, enforce_file_format=True)
    length = rows * columns * 2
    chunk = b"\x01\x02" * (4 * 1024 * 1024)
    with path.open("ab") as fh:
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        written = 0
        while written < length:
            piece = chunk[: min(len(chunk), length - written)]
            fh.write(piece)
            written += len(piece)
    return str(ds.SOPInstanceUID)


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_500_mb_instance_stays_within_100_mb_of_idle(
    gateway_factory: Any, tmp_path: Path, raw_files: Any
) -> None:
    big = tmp_path / "big.dcm"
    uid = _write_large_instance(big, 500 * 1000 * 1000)
    gw = gateway_factory()
    idle = _rss_kib(gw.pid)
    peak = idle
    sender = Sender(gw, [big])
    sender.start()
    while sender.is_alive():
        peak = max(peak, _rss_kib(gw.pid))
        time.sleep(0.02)
    assert sender.error is None, sender.error
    assert [u for u, _ in sender.acknowledged] == [uid]
    peak = max(peak, _rss_kib(gw.pid, "VmHWM"))
    print(f"500 MB instance: idle {idle} KiB, peak {peak} KiB, +{(peak - idle) // 1024} MiB")
    assert peak - idle < 100 * 1024, f"peak {peak} KiB vs idle {idle} KiB"
    with sqlite3.connect(gw.data_dir / "index.sqlite") as conn:
        ((relpath, size),) = conn.execute("SELECT path, size FROM instances").fetchall()
    sent_size, sent_digest = _dataset_digest(big)
    assert size == sent_size
    assert _dataset_digest(gw.data_dir / relpath) == (sent_size, sent_digest)


def _dataset_digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of a Part 10 file's dataset, read in chunks."""
    import hashlib

    with path.open("rb") as fh:
        head = fh.read(144)
        fh.seek(144 + int.from_bytes(head[140:144], "little"))
        digest, size = hashlib.sha256(), 0
        while chunk := fh.read(8 * 1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
