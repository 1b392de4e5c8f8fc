"""`gateway health`: the container's health check, against a running gateway process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import GatewayProcess


def test_healthy(gateway: GatewayProcess) -> None:
    result = gateway.cli("health")
    assert result.returncode == 0
    assert result.stdout.strip() == "healthy"
    assert json.loads(gateway.cli("health", "--json").stdout) == {"healthy": True}


def test_low_disk_is_unhealthy(gateway_factory: Any) -> None:
    """Refusing instances (free disk below min_free_mb) is unhealthy, with the reason."""
    gw = gateway_factory(node={"min_free_mb": 1 << 40})  # more than any disk has free
    result = gw.cli("health", check=False)
    assert result.returncode == 1
    assert "refusing instances" in result.stderr and "min_free_mb" in result.stderr


def test_not_running_is_unhealthy(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "gw")  # configured, never started
    result = gw.cli("health", check=False)
    assert result.returncode == 1
    assert "cannot reach the gateway's control socket" in result.stderr
