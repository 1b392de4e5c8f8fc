"""A second `gateway serve` next to a running one refuses to start and leaves it alone.

Started by mistake on the same config, it used to remove the files the running gateway was
receiving (start-up reconciliation of `tmp/`), take over its control socket and remove it on
its way out, and die with a traceback. Now each resource a gateway needs is checked before
it is touched: the data_dir's lock, the control socket, the DICOM port.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import StoreError
from gateway.store.store import Store
from tests.conftest import GatewayProcess, free_port, write_config


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def second_config(gw: GatewayProcess, tmp_path: Path, **node: Any) -> Path:
    """*gw*'s config with *node* keys changed (and a control socket of its own unless
    `socket` is given)."""
    import tomllib

    sections = tomllib.loads(gw.config.read_text())
    socket = node.pop("socket", str(tmp_path / "second.sock"))
    sections["node"].update(node)
    sections["control"]["socket"] = socket
    return write_config(tmp_path / "second.toml", sections)


def still_serving(gw: GatewayProcess) -> None:
    assert gw.proc is not None and gw.proc.poll() is None
    assert gw.socket.exists()
    assert gw.call("status")["instances"] == 0


def test_a_second_gateway_on_the_same_data_dir_is_refused(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw: GatewayProcess = gateway_factory()
    receiving = gw.data_dir / "tmp" / "in-flight.part"  # a file being received
    receiving.write_bytes(b"\0" * 1024)
    # The same config file: same data_dir, control socket and port.
    result = serve(gw.config)
    assert result.returncode == 1, result
    assert f"{gw.data_dir} is in use by process {gw.pid}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert receiving.exists()
    still_serving(gw)
    # Another port and socket, the same data_dir: refused all the same.
    result = serve(second_config(gw, tmp_path, port=free_port()))
    assert result.returncode == 1 and f"in use by process {gw.pid}" in result.stderr
    still_serving(gw)
    pid = gw.pid
    assert gw.stop() == 0
    assert (gw.data_dir / "gateway.lock").read_text().strip() == str(pid)
    # Stopped, it leaves the lock free: the next one starts.
    gw.start()
    still_serving(gw)


def test_a_port_or_control_socket_in_use_is_named(gateway_factory: Any, tmp_path: Path) -> None:
    gw: GatewayProcess = gateway_factory()
    other = str(tmp_path / "other-data")
    result = serve(second_config(gw, tmp_path, data_dir=other))  # the same DICOM port
    assert result.returncode == 1, result
    assert (
        f"cannot listen on 127.0.0.1:{gw.port} ([node] port): Address already in use"
        in result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr
    still_serving(gw)
    result = serve(second_config(gw, tmp_path, data_dir=other, port=free_port(),
                                 socket=str(gw.socket)))  # fmt: skip
    assert result.returncode == 1, result
    assert f"the control socket {gw.socket} is in use by a running gateway" in result.stderr
    still_serving(gw)


@pytest.mark.asyncio
async def test_the_store_holds_its_data_dir(tmp_path: Path) -> None:
    first = Store(tmp_path / "data")
    await first.open()
    try:
        with pytest.raises(StoreError, match=f"in use by process {os.getpid()}"):
            await Store(tmp_path / "data").open()
    finally:
        await first.close()
    again = Store(tmp_path / "data")
    await again.open()
    await again.close()
