"""The node in-process: TCP_NODELAY on the sockets it accepts and opens."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from gateway.config import NodeSettings, PeerSettings, Settings
from gateway.scp.bridge import LoopBridge
from gateway.scp.node import DicomNode
from gateway.store.store import Store
from tests.conftest import HOST


def _nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.asyncio
async def test_accepted_and_opened_sockets_have_nodelay(tmp_path: Path) -> None:
    settings = Settings(node=NodeSettings(host=HOST, port=0, data_dir=tmp_path / "data"))
    store = Store(settings.node.data_dir)
    await store.open()
    node = DicomNode(settings, store, LoopBridge(asyncio.get_running_loop()))
    node.start()
    try:

        def associate_and_inspect() -> tuple[int, int]:
            ae = AE(ae_title="PROBE")
            ae.add_requested_context(Verification)
            assoc = ae.associate(HOST, node.port, ae_title="GATEWAY")
            assert assoc.is_established
            try:
                (acceptor,) = [a for a in node._ae.active_associations if a.is_acceptor]
                return _nodelay(acceptor.dul.socket.socket), _nodelay(assoc.dul.socket.socket)
            finally:
                assoc.release()

        accepted, requestor = await asyncio.to_thread(associate_and_inspect)
        assert accepted != 0
        assert requestor == 0  # pynetdicom's own requestor leaves Nagle on: the test sees a change

        # Sockets the node opens (C-MOVE destinations, echo) get it from the EVT_CONN_OPEN
        # handler bound on their associations.
        class Event:
            def __init__(self, sock: socket.socket) -> None:
                self.assoc: Any = type("A", (), {})()
                self.assoc.dul = type("D", (), {})()
                self.assoc.dul.socket = type("S", (), {"socket": sock})()

        with socket.create_server((HOST, 0)) as server:
            client = socket.create_connection(server.getsockname())
            peer, _ = server.accept()
            with client, peer:
                assert _nodelay(client) == 0
                node.services.on_conn_open(Event(client))  # type: ignore[arg-type]
                assert _nodelay(client) != 0
        destination = PeerSettings(name="dest", ae_title="DEST", host=HOST, port=104)
        kwargs = node.services._move_kwargs([], destination)
        assert (
            next(h for e, h in kwargs["evt_handlers"] if e.name == "EVT_CONN_OPEN")
            == node.services.on_conn_open
        )
    finally:
        await asyncio.to_thread(node.stop, 1.0)
        await store.close()
