"""What the commands share: the config file's path, its settings, and a call on the running
gateway's control socket."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeAlias

from gateway.config import Settings, load_settings

__all__ = ["DEFAULT_CONFIG", "Command", "call", "config_path", "settings"]

DEFAULT_CONFIG: Final = "./config.toml"

Command: TypeAlias = Callable[[argparse.Namespace], int]
"""A command's function: the parsed arguments in, the exit status out."""


def config_path(args: argparse.Namespace) -> Path:
    """--config, else $GATEWAY_CONFIG, else ./config.toml."""
    return Path(args.config or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG)


def settings(args: argparse.Namespace) -> Settings:
    """The validated config (raises `ConfigError`: exit status 2)."""
    return load_settings(config_path(args))


def call(
    args: argparse.Namespace,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    timeout: float = 120.0,
) -> Any:
    """The result of one control method on the running gateway, waited for at most *timeout*
    s (raises `ControlError`, or `GatewayError` when the socket cannot be reached or does not
    answer in time: exit status 1)."""
    from gateway.control.client import ControlClient

    with ControlClient(settings(args).control_socket, timeout=timeout) as client:
        return client.call(method, params)
