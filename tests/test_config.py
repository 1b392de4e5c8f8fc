"""config.toml loading: defaults, environment overrides, and one clear message per bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_is_valid() -> None:
    settings = load_settings(REPO / "config.toml")
    assert settings.node.ae_title == "GATEWAY"
    assert settings.node.port == 11112
    assert settings.node.data_dir == REPO / "data"
    assert settings.control_socket == REPO / "data" / "control.sock"


def test_environment_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[node]\nae_title = "FROMFILE"\nport = 4242\n')
    monkeypatch.setenv("GATEWAY_NODE__PORT", "5555")
    monkeypatch.setenv("GATEWAY_NODE__SHUTDOWN_GRACE", "1.5")
    settings = load_settings(config)
    assert settings.node.ae_title == "FROMFILE"
    assert settings.node.port == 5555
    assert settings.node.shutdown_grace == 1.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nprot = 104\n", "node.prot: unknown key"),
        ("[node]\nport = 70000\n", "node.port: Input should be less than or equal to 65535"),
        ('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "node.ae_title: an AE title is 1 to 16"),
        ('[node]\nduplicate_policy = "newest"\n', "node.duplicate_policy: Input should be"),
        ("[node]\nacse_timeout = -1\n", "node.acse_timeout: Input should be greater than 0"),
        (
            '[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\n',
            "peers.0.port: Field required",
        ),
        ("[node\n", "not valid TOML"),
        (
            '[[peers]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n'
            '[[peers]]\nname = "a"\nae_title = "B"\nhost = "h"\nport = 2\n',
            "peer name 'a' is used twice",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert message in str(caught.value)
    assert str(config) in str(caught.value)


def test_bad_env_override_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[node]\n")
    monkeypatch.setenv("GATEWAY_NODE__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"node\.port: Input should be a valid integer"):
        load_settings(config)


def test_config_check_cli_exit_status(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[node]\nae_title = "X"\n')
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "config", "check", "--config", str(good)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = -3\n")
    for argv in (["config", "check"], ["serve"]):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *argv, "--config", str(bad)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2
        assert "node.port: Input should be greater than or equal to 0" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
