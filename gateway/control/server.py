"""The control socket: JSON-RPC 2.0, one JSON object per line, on a Unix socket (mode 0600)
and, when `[control] tcp_port` is set, on a TCP listener (TLS when a certificate is configured).

Who may call what: a Unix-socket client is an operator (the file mode is the access control).
A TCP client must first call `auth.login`, with an operator token or a device id and its token;
until it has, any other request is refused with -32001 and the connection closed, and a failed
login gets -32001 and is closed too. Every method is registered with its access: `operator`
(the default), `device` (devices only; the device is `current_session()`), or `any`. A device
calling an operator method gets -32003.

Methods are registered by name with their parameters' model (`gateway.control.params`) and an
async function taking the validated model; later features add theirs. Errors follow JSON-RPC:
-32700 bad JSON, -32600 invalid request, -32601 unknown method, -32602 a bad parameter (the
message names it), -32603 internal error, and -32000 and below for the gateway's own failures.
A request without an "id" is a notification: it gets no answer, not even an error. Batches
(JSON arrays) are refused. A line longer than `max_line_bytes` is refused as soon as the limit
is passed (at most the limit is ever buffered) and the connection is closed. Each connection is
served by its own task, so a slow or silent client stalls no one else.

Every connection ends in `ControlServer.end_session`, whoever ends it (the client closing, a
timeout, an oversized line, a credential taken away, a second login of the same device, the
gateway stopping): it takes the session out of `sessions` (the live sessions, the only
registry of them), tells a device why (a `session.closed` notification), closes the
connection, and runs `on_session_end` for a device at once, before waiting for the transport to
close (a TLS peer that does not answer the close could hold that for half a minute). A device
has at most one session: its login ends the previous one, and that ending does not make the
device OFFLINE (`Session.replaced`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog
from pydantic import ValidationError

from gateway.audit import AuditLog
from gateway.config import ControlSettings
from gateway.control.params import Params, explain
from gateway.errors import ControlError, GatewayError
from gateway.metrics import INVALID_REQUEST as INVALID_METHOD
from gateway.metrics import UNKNOWN_METHOD, Metrics

__all__ = [
    "AUTH_FAILED",
    "FORBIDDEN",
    "GATEWAY_ERROR",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "SESSION_CLOSED",
    "ControlServer",
    "Method",
    "Session",
    "current_session",
]

log = structlog.get_logger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
GATEWAY_ERROR = -32000
AUTH_FAILED = -32001
FORBIDDEN = -32003
# The notification a device gets when the gateway ends its session: {"code", "reason"}.
SESSION_CLOSED = "session.closed"

P = TypeVar("P", bound=Params)
# A registered method: it receives its parameters validated into its model.
Method = Callable[[P], Awaitable[Any]]
Access = Literal["operator", "device", "any"]
Role = Literal["operator", "device"]


@dataclass(eq=False)
class Session:
    """One control connection: who it is, and a way to push notifications to it."""

    transport: Literal["unix", "tcp"]
    peer: str
    role: Role | None = None
    device_id: str | None = None
    credential: str | None = None  # what it logged in with: an operator token's hash, a device id
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    close_after_reply: bool = False
    task: asyncio.Task[None] | None = None  # the task serving the connection
    ended: bool = False  # end_session has run: no longer in ControlServer.sessions
    replaced: bool = False  # ended by a newer login of the same device
    # Notifications to send once the reply to the current request is written.
    queued: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def notify(self, method: str, params: dict[str, Any]) -> bool:
        """Send a JSON-RPC notification; False when the connection is gone."""
        writer = self.writer
        if writer is None or writer.is_closing():
            return False
        message = {"jsonrpc": "2.0", "method": method, "params": params}
        try:
            async with self.lock:
                writer.write(json.dumps(message, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, RuntimeError):
            return False
        return True

    def notify_after_reply(self, method: str, params: dict[str, Any]) -> None:
        """Send a notification after the answer to the request being handled."""
        self.queued.append((method, params))


class _SessionEnded(Exception):
    """Raised in a session's reader when `end_session` ends it from elsewhere."""


_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("session", default=None)


def current_session() -> Session | None:
    """The session of the request being handled (None outside a request)."""
    return _SESSION.get()


# auth.login's check: params -> (role, device id, credential), or raises ControlError.
Authenticator = Callable[[dict[str, Any]], Awaitable[tuple[Role, str | None, str]]]


class _LineTooLong(Exception):
    pass


class ControlServer:
    """A JSON-RPC 2.0 server on a Unix socket."""

    def __init__(
        self, path: Path, settings: ControlSettings, metrics: Metrics | None = None
    ) -> None:
        self.path = path
        self._settings = settings
        self.metrics = metrics or Metrics()
        self._methods: dict[str, tuple[type[Params], Method[Any]]] = {}
        self._access: dict[str, Access] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tcp_server: asyncio.Server | None = None
        self._bound_inode = -1  # the socket file this server bound (stop removes only that)
        self._clients: set[asyncio.Task[None]] = set()
        self.authenticator: Authenticator | None = None
        # A device's session: after its login (before the answer), and after it ends (unless
        # replaced by a newer login of the same device).
        self.on_session_start: Callable[[Session], Awaitable[None]] | None = None
        self.on_session_end: Callable[[Session], Awaitable[None]] | None = None
        self.sessions: set[Session] = set()  # the live sessions
        self._ending: set[asyncio.Task[None]] = set()
        self.audit: AuditLog | None = None  # set by the application

    def register(
        self, name: str, params: type[P], method: Method[P], access: Access = "operator"
    ) -> None:
        """Expose *method* as *name*. A request's params object is validated into *params*
        (unknown keys, missing or bad values: -32602 naming the parameter, `params.explain`)
        and *method* receives the model."""
        if name in self._methods:
            raise ValueError(f"control method {name!r} registered twice")
        self._methods[name] = (params, method)
        self._access[name] = access

    def params_model(self, name: str) -> type[Params]:
        """The parameters' model of the registered method *name* (KeyError if none)."""
        return self._methods[name][0]

    @property
    def tcp_port(self) -> int | None:
        """The TCP listener's port (the bound one when `tcp_port = 0`), or None."""
        if self._tcp_server is None or not self._tcp_server.sockets:
            return None
        return int(self._tcp_server.sockets[0].getsockname()[1])

    def device_session(self, device_id: str) -> Session | None:
        """The live session of a device (it has at most one), or None."""
        return next(
            (s for s in self.sessions if s.role == "device" and s.device_id == device_id), None
        )

    def close_sessions(
        self, credentials: set[str], reason: str, code: str = "credential_removed"
    ) -> list[asyncio.Task[None]]:
        """End the TCP sessions that logged in with one of *credentials* (a revoked or rotated
        device token, a removed operator token hash), each by `end_session`, in tasks started
        now; await them to know the sessions ended (a caller that cannot await, e.g. a reload
        from a signal, may drop them)."""
        ending = [
            asyncio.ensure_future(self.end_session(session, reason, code=code))
            for session in list(self.sessions)
            if session.credential in credentials
        ]
        for task in ending:
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
        return ending

    async def end_session(
        self, session: Session, reason: str, *, code: str = "closed", replaced: bool = False
    ) -> None:
        """End a session, whoever ends it; the one way a session ends (the second call does
        nothing). A device that the gateway disconnects (any *code* but "disconnected": its
        own close) is sent `session.closed` with *code* and *reason* first; its connection is
        then closed, and `on_session_end` runs before this returns, not once the transport has
        closed. *replaced*: ended by a newer login of the same device."""
        if session.ended:
            return
        session.ended = True
        session.replaced = replaced
        self.sessions.discard(session)
        writer = session.writer
        if code not in ("disconnected", "unauthenticated"):  # (a failed login is logged)
            log.warning("control_session_closed", peer=session.peer, role=session.role,
                        device=session.device_id, reason=reason, code=code)  # fmt: skip
        if writer is not None and not writer.is_closing():
            if session.role == "device" and code != "disconnected":
                message = {"jsonrpc": "2.0", "method": SESSION_CLOSED,
                           "params": {"code": code, "reason": reason}}  # fmt: skip
                with contextlib.suppress(Exception):  # best effort, never waits on the peer
                    writer.write(json.dumps(message).encode() + b"\n")
            writer.close()
        if session.reader is not None and asyncio.current_task() is not session.task:
            # wake the session's own task, wherever it waits for the next line
            session.reader.set_exception(_SessionEnded())
        if session.role == "device" and self.on_session_end is not None:
            try:
                await self.on_session_end(session)
            except Exception:
                log.exception("control_session_end_failed", device=session.device_id)

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    async def start(self) -> None:
        """Listen on the control socket (and the TCP listener if configured).

        A socket file left by a process that is gone is replaced; one a running process
        answers on is not (GatewayError): two gateways must not share a control socket.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if _answers(self.path):
            raise GatewayError(
                f"the control socket {self.path} is in use by a running gateway: stop it "
                "first, or give this one its own [control] socket"
            )
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        # Bound in a directory only this user can enter (mkdtemp: 0700), made 0600 there, then
        # renamed into place: never reachable by others, and no process-wide umask changed
        # while other threads run (a file they create meanwhile would take it).
        private = Path(tempfile.mkdtemp(prefix=".control-", dir=self.path.parent))
        try:
            bound = private / "sock"
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(bound), limit=64 * 1024
            )
            os.chmod(bound, 0o600)
            os.rename(bound, self.path)
            self._bound_inode = os.stat(self.path).st_ino
        finally:
            with contextlib.suppress(OSError):
                private.rmdir()
        log.info("control_socket_listening", path=str(self.path))
        settings = self._settings
        if settings.tcp_port is not None:
            context = None
            if settings.tls_cert is not None and settings.tls_key is not None:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                context.load_cert_chain(settings.tls_cert, settings.tls_key)
            tls: dict[str, Any] = {"ssl": context, "ssl_handshake_timeout": 30} if context else {}
            self._tcp_server = await asyncio.start_server(
                self._serve_tcp, settings.tcp_host, settings.tcp_port, limit=64 * 1024, **tls
            )
            log.info("control_tcp_listening", host=settings.tcp_host, port=self.tcp_port,
                     tls=context is not None)  # fmt: skip

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        await asyncio.gather(
            *(self.end_session(s, "the gateway is stopping", code="shutdown")
              for s in list(self.sessions)),
            *self._ending, return_exceptions=True,
        )  # fmt: skip
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()
        if self._tcp_server is not None:
            await self._tcp_server.wait_closed()
            self._tcp_server = None
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._bound_inode:  # ours, not a successor's
                self.path.unlink()

    # -- connections -------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        await self._serve(reader, writer, Session("tcp", address))

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session | None = None,
    ) -> None:
        session = session or Session("unix", "unix", role="operator")
        session.writer = writer
        session.reader = reader
        task = asyncio.current_task()
        assert task is not None
        session.task = task
        if len(self._clients) >= self._settings.max_clients:
            await self._reply(writer, _error(None, GATEWAY_ERROR, "too many control clients"))
            writer.close()
            return
        self._clients.add(task)
        self.sessions.add(session)
        token = _SESSION.set(session)
        try:
            while True:
                # A device must be heard from (any request, devices.heartbeat at least) every
                # device_heartbeat_timeout; a silent one is closed, which makes it OFFLINE.
                timeout = (
                    self._settings.device_heartbeat_timeout
                    if session.role == "device"
                    else self._settings.idle_timeout
                )
                try:
                    line = await asyncio.wait_for(self._read_line(reader), timeout)
                except TimeoutError:
                    if session.role == "device":
                        log.warning("device_silent", device=session.device_id, seconds=timeout)
                    # an idle connection is closed; the client may reconnect
                    await self.end_session(session, f"silent for {timeout:g} s", code="silent")
                    return
                except _LineTooLong:
                    limit = self._settings.max_line_bytes
                    self.metrics.control_requests.labels(method=INVALID_METHOD).inc()
                    self.metrics.control_errors.labels(method=INVALID_METHOD).inc()
                    message = f"request line longer than {limit} bytes"
                    await self._reply(writer, _error(None, INVALID_REQUEST, message))
                    await self.end_session(session, message, code="line_too_long")
                    return
                if line is None or session.ended:
                    return
                if not line.strip():
                    continue
                response = await self.handle_line(line)
                if response is not None:
                    await self._reply(writer, response)
                while session.queued and not session.ended:
                    await session.notify(*session.queued.pop(0))
                if session.close_after_reply or (session.role is None and response is not None
                                                 and "error" in response):  # fmt: skip
                    # an unauthenticated connection gets one error, then is closed
                    await self.end_session(session, "not authenticated", code="unauthenticated")
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, _SessionEnded):
            return
        finally:
            _SESSION.reset(token)
            await self.end_session(session, "the client closed the connection",
                                   code="disconnected")  # fmt: skip
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
        session = _SESSION.get()
        data = json.dumps(response, default=str).encode() + b"\n"
        if session is None:
            writer.write(data)
            await writer.drain()
            return
        async with session.lock:  # notifications to a device share the connection
            writer.write(data)
            await writer.drain()

    # -- requests ----------------------------------------------------------------------------

    async def handle_line(self, line: bytes) -> dict[str, Any] | None:
        """Answer one request line (None for a notification, which gets no answer)."""
        request, response = _parse(line)
        label = INVALID_METHOD
        if request is not None:
            method_name = request["method"]
            response = await self._call(request.get("id"), method_name, request.get("params"))
            known = method_name in self._methods or method_name == "auth.login"
            label = method_name if known else UNKNOWN_METHOD  # no label from arbitrary text
        assert response is not None
        self.metrics.control_requests.labels(method=label).inc()
        if "error" in response:
            self.metrics.control_errors.labels(method=label).inc()
        if request is not None and "id" not in request:
            # a notification is never answered, not even with an error
            if "error" in response:
                log.info(
                    "control_notification_failed", method=request["method"], **response["error"]
                )
            return None
        return response

    async def _call(self, request_id: object, method_name: str, params: Any) -> dict[str, Any]:
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return _error(request_id, INVALID_PARAMS, '"params" must be an object')
        session = _SESSION.get()
        if method_name == "auth.login":
            return await self._login(request_id, params, session)
        if session is not None and session.role is None:
            session.close_after_reply = True
            return _error(request_id, AUTH_FAILED, "authenticate first: call auth.login")
        registered = self._methods.get(method_name)
        if registered is None:
            return _error(request_id, METHOD_NOT_FOUND, f"unknown method {method_name!r}")
        access = self._access[method_name]
        role = session.role if session is not None else "operator"
        if access != "any" and access != role:
            return _error(request_id, FORBIDDEN, f"{method_name} is for {access}s only")
        model, method = registered
        try:
            args = model.model_validate(params)
        except ValidationError as exc:
            return _error(request_id, INVALID_PARAMS, explain(model, exc))
        try:
            result = await method(args)
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

    async def _login(
        self, request_id: object, params: dict[str, Any], session: Session | None
    ) -> dict[str, Any]:
        if session is None or session.transport == "unix":
            return {"jsonrpc": "2.0", "id": request_id, "result": {"role": "operator"}}
        if session.role is not None:
            return _error(request_id, INVALID_REQUEST, "already authenticated")
        failure = None
        if self.authenticator is None:
            failure = "authentication is not available"
        else:
            try:
                session.role, session.device_id, session.credential = await self.authenticator(
                    params
                )
            except ControlError as exc:
                failure = exc.message
        if self.audit is not None:
            self.audit.record("User Authentication",
                              outcome="success" if failure is None else "refused",
                              address=session.peer, role=session.role, device=session.device_id,
                              reason=failure)  # fmt: skip
        if failure is not None:
            session.close_after_reply = True
            log.warning("control_auth_failed", peer=session.peer, reason=failure)
            return _error(request_id, AUTH_FAILED, f"authentication failed: {failure}")
        log.info("control_authenticated", peer=session.peer, role=session.role,
                 device=session.device_id)  # fmt: skip
        if session.role == "device" and session.device_id is not None:
            # One session per device: this login ends the previous one, which does not make
            # the device OFFLINE (it is online through this one).
            for old in [s for s in self.sessions if s is not session
                        and s.role == "device" and s.device_id == session.device_id]:  # fmt: skip
                await self.end_session(old, "the device logged in again on another connection",
                                       code="replaced", replaced=True)  # fmt: skip
            if self.on_session_start is not None:
                try:
                    await self.on_session_start(session)
                except Exception:
                    log.exception("control_session_start_failed", device=session.device_id)
        result = {"role": session.role, "device_id": session.device_id,
                  "max_line_bytes": self._settings.max_line_bytes}  # fmt: skip
        return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _parse(line: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the request, None) for a valid JSON-RPC request line, else (None, its error)."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, _error(None, PARSE_ERROR, f"not valid JSON: {exc}")
    except RecursionError:
        return None, _error(None, PARSE_ERROR, "not valid JSON: nested too deeply")
    if isinstance(request, list):
        return None, _error(
            None, INVALID_REQUEST, "batch requests are not supported: send one object a line"
        )
    if not isinstance(request, dict):
        return None, _error(None, INVALID_REQUEST, "a request is a JSON object")
    request_id = request.get("id")
    # bool is an int to Python, not to JSON-RPC; an invalid id is never echoed back.
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, (str, int))
    ):
        return None, _error(None, INVALID_REQUEST, '"id" must be a string or an integer')
    if request.get("jsonrpc") != "2.0":
        return None, _error(request_id, INVALID_REQUEST, '"jsonrpc" must be "2.0"')
    if not isinstance(request.get("method"), str):
        return None, _error(request_id, INVALID_REQUEST, '"method" must be a string')
    return request, None


def _error(request_id: object, code: int, message: str, data: object = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _answers(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at *path*."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()
