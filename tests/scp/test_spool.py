"""A received file kept in memory while small, spilled to its spool file past the limit: the
same bytes and digest either way, nothing left behind when it is dropped."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gateway.scp.receiving import DatasetSpool

HEAD = b"\x00" * 128 + b"DICM" + b"meta" * 8


def _received(spool: DatasetSpool, chunks: list[bytes]) -> None:
    spool.write(HEAD)
    spool.begin_dataset()
    for chunk in chunks:
        spool.write(memoryview(chunk))
    spool.close()


@pytest.mark.parametrize(
    ("chunks", "in_memory", "spilled"),
    [
        ([b"a" * 100, b"b" * 100], 1024, False),
        ([b"a" * 100, b"b" * 2000, b"c" * 3], 1024, True),  # spills mid-dataset
        ([b"x" * 4096], 64, True),  # spills at the first data fragment
        ([], 1024, False),
    ],
)
def test_kept_in_memory_or_spilled_the_file_is_the_same(
    tmp_path: Path, chunks: list[bytes], in_memory: int, spilled: bool
) -> None:
    spool = DatasetSpool(tmp_path, in_memory=in_memory)
    _received(spool, chunks)
    dataset = b"".join(chunks)
    assert (spool.content is None) == spilled
    assert os.listdir(tmp_path) == ([Path(spool.name).name] if spilled else [])
    if spilled:
        assert spool.dataset_digest == hashlib.sha256(dataset).hexdigest()
    else:
        assert spool.content == HEAD + dataset
        assert spool.dataset_digest is None  # hashed by the check, off the event loop
    kept = spool.content if spool.content is not None else Path(spool.name).read_bytes()
    assert kept == HEAD + dataset
    assert spool.dataset_bytes == len(dataset)


@pytest.mark.parametrize("in_memory", [1 << 20, 64])
def test_too_large_is_dropped_as_it_arrives(tmp_path: Path, in_memory: int) -> None:
    spool = DatasetSpool(tmp_path, max_bytes=1000, in_memory=in_memory)
    _received(spool, [b"a" * 600, b"b" * 600, b"c" * 600])
    assert spool.too_large
    assert spool.dataset_bytes == 1800  # counted to the end
    assert os.listdir(tmp_path) == []
    assert not spool.content


@pytest.mark.parametrize("in_memory", [1 << 20, 64])
def test_an_association_ending_mid_dataset_leaves_nothing(tmp_path: Path, in_memory: int) -> None:
    spool = DatasetSpool(tmp_path, in_memory=in_memory)
    spool.write(HEAD)
    spool.begin_dataset()
    spool.write(b"d" * 500)
    spool.discard()
    assert os.listdir(tmp_path) == []
