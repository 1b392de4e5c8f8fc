"""Association policy and lifecycle: called AE, allowlist, host binding, limit, SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import HOST, TEST_FILES, GatewayProcess, dcmtk_env, require


def echoscu(gw: GatewayProcess, calling: str = "ECHOSCU", called: str | None = None) -> bool:
    result = subprocess.run(
        [require("echoscu"), "-aet", calling, "-aec", called or gw.ae_title, HOST, str(gw.port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=60,
    )
    return result.returncode == 0


def rejections(gw: GatewayProcess) -> list[str]:
    import json

    return [
        json.loads(line)["reason"]
        for line in gw.log_text().splitlines()
        if '"association_rejected"' in line
    ]


def test_called_ae_title_checked(gateway: GatewayProcess) -> None:
    assert not echoscu(gateway, called="SOMEONE_ELSE")
    assert rejections(gateway) == ["called_ae_title_not_recognised"]
    assert echoscu(gateway)


def test_called_ae_check_can_be_off(gateway_factory: Any) -> None:
    gw = gateway_factory(node={"check_called_ae": False})
    assert echoscu(gw, called="ANY-SCP")


def test_calling_ae_allowlist(gateway_factory: Any) -> None:
    gw = gateway_factory(security={"allowed_callers": [{"ae_title": "CT1"}, {"ae_title": "MR1"}]})
    assert echoscu(gw, calling="CT1")
    assert echoscu(gw, calling="MR1")
    assert not echoscu(gw, calling="INTRUDER")
    assert rejections(gw) == ["calling_ae_title_not_allowed"]


def test_allowlist_entry_bound_to_a_host(gateway_factory: Any) -> None:
    gw = gateway_factory(
        security={
            "allowed_callers": [
                {"ae_title": "CT1", "host": "127.0.0.1"},
                {"ae_title": "CT2", "host": "192.0.2.10"},  # documentation range: never us
            ]
        }
    )
    assert echoscu(gw, calling="CT1")
    assert not echoscu(gw, calling="CT2")
    assert rejections(gw) == ["calling_host_not_allowed"]


def test_association_limit_is_a_transient_rejection(gateway_factory: Any) -> None:
    gw = gateway_factory(node={"max_associations": 1})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate(HOST, gw.port, ae_title=gw.ae_title)
    assert held.is_established
    try:
        second = ae.associate(HOST, gw.port, ae_title=gw.ae_title)
        assert second.is_rejected
        primitive = second.acceptor.primitive
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 2)
        assert rejections(gw) == ["association_limit_reached"]
    finally:
        held.release()
    assert echoscu(gw)


def test_sigterm_lets_open_associations_finish(gateway_factory: Any) -> None:
    gw = gateway_factory(node={"shutdown_grace": 20})
    ae = AE(ae_title="SLOW")
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate(HOST, gw.port, ae_title=gw.ae_title)
    assert assoc.is_established
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    # The listener closes: a new connection is refused ...
    deadline_ok = False
    for _ in range(100):
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex((HOST, gw.port)) != 0:
                deadline_ok = True
                break
        import time

        time.sleep(0.05)
    assert deadline_ok, "the listener still accepts connections after SIGTERM"
    # ... while the open association still stores, durably.
    import pydicom

    status = assoc.send_c_store(pydicom.dcmread(TEST_FILES / "CT_small.dcm"))
    assert status.Status == 0x0000
    assoc.release()
    assert gw.proc.wait(30) == 0
    gw.proc = None
    assert "gateway_stopped" in gw.log_text()
    gw.start()  # the same config and data: the instance stored during the grace is there
    assert gw.call("status")["instances"] == 1


def test_sigterm_aborts_what_outlives_the_grace(gateway_factory: Any) -> None:
    gw = gateway_factory(node={"shutdown_grace": 0.5})
    ae = AE(ae_title="STUCK")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, gw.port, ae_title=gw.ae_title)
    assert assoc.is_established
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(30) == 0
    gw.proc = None
    assert '"aborted": 1' in gw.log_text()
    assoc.abort()


@pytest.mark.parametrize("missing", [Path("/nonexistent/dir/config.toml")])
def test_serve_with_missing_config_exits_2(missing: Path) -> None:
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no such file" in result.stderr
