"""The control socket: JSON-RPC 2.0, one JSON object per line, on a Unix socket (mode 0600).

Methods are registered by name with an async function taking the params object; later features
add theirs. Errors follow JSON-RPC: -32700 bad JSON, -32600 invalid request, -32601 unknown
method, -32602 a bad parameter (the message names it), -32603 internal error, and -32000 and
below for the gateway's own failures. A request without an "id" is a notification: it gets no
answer, not even an error. Batches (JSON arrays) are refused. A line longer than
`max_line_bytes` is refused as soon as the limit is passed (at most the limit is ever buffered)
and the connection is closed. Each connection is served by its own task, so a slow or silent
client stalls no one else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from gateway.config import ControlSettings
from gateway.errors import ControlError, GatewayError

__all__ = [
    "GATEWAY_ERROR",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "ControlServer",
    "Method",
]

log = structlog.get_logger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
GATEWAY_ERROR = -32000

Method = Callable[[dict[str, Any]], Awaitable[Any]]


class _LineTooLong(Exception):
    pass


class ControlServer:
    """A JSON-RPC 2.0 server on a Unix socket."""

    def __init__(self, path: Path, settings: ControlSettings) -> None:
        self.path = path
        self._settings = settings
        self._methods: dict[str, Method] = {}
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    def register(self, name: str, method: Method) -> None:
        """Expose *method* as *name*; it receives the params object (a dict)."""
        if name in self._methods:
            raise ValueError(f"control method {name!r} registered twice")
        self._methods[name] = method

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=64 * 1024
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.info("control_socket_listening", path=str(self.path))

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- connections -------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= self._settings.max_clients:
            await self._reply(writer, _error(None, GATEWAY_ERROR, "too many control clients"))
            writer.close()
            return
        self._clients.add(task)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(
                        self._read_line(reader), self._settings.idle_timeout
                    )
                except TimeoutError:
                    return  # an idle connection is closed; the client may reconnect
                except _LineTooLong:
                    limit = self._settings.max_line_bytes
                    await self._reply(
                        writer,
                        _error(None, INVALID_REQUEST, f"request line longer than {limit} bytes"),
                    )
                    return
                if line is None:
                    return
                if not line.strip():
                    continue
                response = await self.handle_line(line)
                if response is not None:
                    await self._reply(writer, response)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | None:
        """One line, at most `max_line_bytes`; a longer one is drained and refused."""
        limit = self._settings.max_line_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await reader.readuntil(b"\n")
                chunks.append(chunk)
                size += len(chunk)
                break
            except asyncio.LimitOverrunError as exc:
                chunk = await reader.readexactly(exc.consumed)
                chunks.append(chunk)
                size += len(chunk)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial and not chunks:
                    return None
                chunks.append(exc.partial)
                size += len(exc.partial)
                break
            if size > limit:
                raise _LineTooLong
        if size > limit:
            raise _LineTooLong
        return b"".join(chunks)

    async def _reply(self, writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        writer.write(json.dumps(response, default=str).encode() + b"\n")
        await writer.drain()

    # -- requests ----------------------------------------------------------------------------

    async def handle_line(self, line: bytes) -> dict[str, Any] | None:
        """Answer one request line (None for a notification, which gets no answer)."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(None, PARSE_ERROR, f"not valid JSON: {exc}")
        except RecursionError:
            return _error(None, PARSE_ERROR, "not valid JSON: nested too deeply")
        if isinstance(request, list):
            return _error(
                None, INVALID_REQUEST, "batch requests are not supported: send one object a line"
            )
        if not isinstance(request, dict):
            return _error(None, INVALID_REQUEST, "a request is a JSON object")
        request_id = request.get("id")
        # bool is an int to Python, not to JSON-RPC; an invalid id is never echoed back.
        if request_id is not None and (
            isinstance(request_id, bool) or not isinstance(request_id, (str, int))
        ):
            return _error(None, INVALID_REQUEST, '"id" must be a string or an integer')
        if request.get("jsonrpc") != "2.0":
            return _error(request_id, INVALID_REQUEST, '"jsonrpc" must be "2.0"')
        method_name = request.get("method")
        if not isinstance(method_name, str):
            return _error(request_id, INVALID_REQUEST, '"method" must be a string')
        response = await self._call(request_id, method_name, request.get("params"))
        if "id" not in request:  # a notification is never answered, not even with an error
            if "error" in response:
                log.info("control_notification_failed", method=method_name, **response["error"])
            return None
        return response

    async def _call(self, request_id: object, method_name: str, params: Any) -> dict[str, Any]:
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return _error(request_id, INVALID_PARAMS, '"params" must be an object')
        method = self._methods.get(method_name)
        if method is None:
            return _error(request_id, METHOD_NOT_FOUND, f"unknown method {method_name!r}")
        try:
            result = await method(params)
        except ControlError as exc:
            return _error(request_id, exc.code, exc.message, exc.data)
        except GatewayError as exc:
            return _error(request_id, GATEWAY_ERROR, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("control_method_failed", method=method_name)
            return _error(request_id, INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
        return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _error(request_id: object, code: int, message: str, data: object = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}
