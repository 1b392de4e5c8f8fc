"""A blocking JSON-RPC client for the control socket (the CLI's side)."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
from pathlib import Path
from typing import Any

from gateway.errors import ControlError, GatewayError

__all__ = ["ControlClient"]


class ControlClient:
    """One connection to the control socket; `call` sends a request and waits for its answer."""

    def __init__(self, path: Path, timeout: float = 120.0) -> None:
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise GatewayError(
                f"cannot reach the gateway's control socket {path}: {exc.strerror or exc}"
                " (is `gateway serve` running with this config?)"
            ) from exc
        self._file = self._sock.makefile("rb")

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call *method*; return its result or raise `ControlError` with the server's error."""
        request_id = next(self._ids)
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        # If sending fails the gateway may have answered (too many clients) and closed: read it.
        with contextlib.suppress(OSError):
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        try:
            line = self._file.readline()
        except OSError as exc:
            raise GatewayError(f"the control connection failed: {exc}") from exc
        if not line:
            raise GatewayError("the gateway closed the control connection")
        response = json.loads(line)
        if "error" in response:
            error = response["error"]
            raise ControlError(error["code"], error["message"], error.get("data"))
        return response["result"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
