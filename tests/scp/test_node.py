"""The node in-process: TCP_NODELAY on the sockets it accepts and opens, and nothing
process-wide changed by starting and stopping it."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pydicom.config
import pytest
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from gateway.config import NodeSettings, PeerSettings, Settings
from gateway.net.association import Association
from gateway.scp.bridge import LoopBridge
from gateway.scp.node import DicomNode
from gateway.scu.requestor import end_association, open_association
from gateway.store.store import Store
from tests.conftest import HOST


def _nodelay(assoc: Association) -> int:
    sock = assoc._writer.get_extra_info("socket")
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def _process_settings() -> list[object]:
    return [_config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET,
            _config.UNRESTRICTED_STORAGE_SERVICE, _config.LOG_HANDLER_LEVEL,
            pydicom.config.settings.writing_validation_mode,
            pydicom.config.settings.reading_validation_mode]  # fmt: skip


@pytest.mark.asyncio
async def test_accepted_and_opened_sockets_have_nodelay(tmp_path: Path) -> None:
    settings = Settings(node=NodeSettings(host=HOST, port=0, data_dir=tmp_path / "data"))
    store = Store(settings.node.data_dir)
    await store.open()
    before = _process_settings()
    node = DicomNode(settings, store, LoopBridge(asyncio.get_running_loop()))
    await node.open()
    try:
        # A pynetdicom requestor (which leaves Nagle on at its end): the node's socket has it
        # off. The association stays open until the node's side was looked at.
        checked = threading.Event()

        def associate() -> int:
            ae = AE(ae_title="PROBE")
            ae.add_requested_context(Verification)
            assoc = ae.associate(HOST, node.port, ae_title="GATEWAY")
            assert assoc.is_established
            try:
                checked.wait(10)
                return int(assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP,
                                                              socket.TCP_NODELAY))  # fmt: skip
            finally:
                assoc.release()

        async def accepted() -> list[Association]:
            while not node._acceptor._established:
                await asyncio.sleep(0.01)
            return list(node._acceptor._established)

        requestor = asyncio.create_task(asyncio.to_thread(associate))
        (inbound,) = await asyncio.wait_for(accepted(), 5)
        assert _nodelay(inbound) != 0
        checked.set()
        assert await requestor == 0  # pynetdicom's own side: the test sees a change
        # A socket the node opens (dispatch, C-MOVE destinations, echo, retrieval).
        peer = PeerSettings(name="self", ae_title="GATEWAY", host=HOST, port=node.port)
        outbound = await open_association(settings.node, peer, [build_context(Verification)])
        try:
            assert _nodelay(outbound) != 0
        finally:
            await end_association(outbound)
        assert _process_settings() == before
    finally:
        await node.close(1.0)
        await store.close()
    assert _process_settings() == before
