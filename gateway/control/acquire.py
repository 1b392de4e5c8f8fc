"""Operator control methods for acquisition: devices.*, sequences.*, tasks.*.

devices.register / list / get / update / rotate_token / revoke; sequences.create / list;
tasks.create / list / get / cancel. docs/acquisition.md documents each with examples.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gateway.acquire.registry import AcquisitionError
from gateway.control.methods import NOT_FOUND, _no_unknown
from gateway.control.server import INVALID_PARAMS, ControlServer, current_session
from gateway.errors import ControlError

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["CONFLICT", "register_acquisition_methods"]

CONFLICT = -32013
_CODES = {"invalid": INVALID_PARAMS, "not_found": NOT_FOUND, "conflict": CONFLICT}
_DEVICE_FIELDS = {"name", "modality", "manufacturer", "serial_number", "site", "station_ae"}

Method = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _wrapped(method: Method) -> Method:
    async def call(params: dict[str, Any]) -> dict[str, Any]:
        try:
            return await method(params)
        except AcquisitionError as exc:
            raise ControlError(_CODES[exc.kind], str(exc)) from None

    return call


def _id(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(INVALID_PARAMS, f"parameter {key!r} is required")
    return value


def register_acquisition_methods(server: ControlServer, gateway: Gateway) -> None:
    registry = gateway.registry

    async def register(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, _DEVICE_FIELDS)
        return await registry.register_device(params)

    async def list_devices(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, set())
        devices = await registry.devices()
        return {"devices": devices, "count": len(devices)}

    async def get_device(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"device_id"})
        return await registry.device(_id(params, "device_id"))

    async def update(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"device_id", *_DEVICE_FIELDS})
        fields = {k: v for k, v in params.items() if k != "device_id"}
        return await registry.update_device(_id(params, "device_id"), fields)

    async def rotate(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"device_id"})
        device_id = _id(params, "device_id")
        return {"id": device_id, "token": await registry.rotate_token(device_id)}

    async def revoke(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"device_id"})
        device_id = _id(params, "device_id")
        await registry.revoke_token(device_id)
        return {"id": device_id, "revoked": True}

    async def create_sequence(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"name", "description", "parameters"})
        return await registry.create_sequence(params)

    async def list_sequences(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, set())
        sequences = await registry.sequences()
        return {"sequences": sequences, "count": len(sequences)}

    async def create_task(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(
            params,
            {"device_id", "sequence_id", "parameters", "patient", "scheduled_at", "description"},
        )
        return await registry.create_task(params)

    async def list_tasks(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"device_id", "status"})
        tasks = await registry.tasks(device_id=params.get("device_id"), status=params.get("status"))
        return {"tasks": tasks, "count": len(tasks)}

    async def get_task(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"task_id"})
        return await registry.task(_id(params, "task_id"))

    async def cancel_task(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"task_id", "reason"})
        reason = params.get("reason") or "cancelled by an operator"
        return await registry.set_task_status(
            _id(params, "task_id"), "ERROR", reason=str(reason)[:256],
            allowed_from=("NEW", "STARTED", "INPROGRESS"),
        )  # fmt: skip

    async def heartbeat(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, set())
        session = current_session()
        assert session is not None and session.device_id is not None
        state = await registry.seen(session.device_id)
        return {"device_id": session.device_id, "state": state}

    server.register("devices.heartbeat", _wrapped(heartbeat), access="device")
    for name, method in (
        ("devices.register", register),
        ("devices.list", list_devices),
        ("devices.get", get_device),
        ("devices.update", update),
        ("devices.rotate_token", rotate),
        ("devices.revoke", revoke),
        ("sequences.create", create_sequence),
        ("sequences.list", list_sequences),
        ("tasks.create", create_task),
        ("tasks.list", list_tasks),
        ("tasks.get", get_task),
        ("tasks.cancel", cancel_task),
    ):
        server.register(name, _wrapped(method))
