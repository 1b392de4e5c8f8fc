"""C-ECHO of a configured peer (PS3.7 9.1.5), on the asyncio network layer."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from gateway.config import NodeSettings, PeerSettings
from gateway.net.association import Aborted
from gateway.scu.requestor import end_association, no_answer, open_association, request_command

__all__ = ["EchoResult", "echo_peer"]


@dataclass(frozen=True, slots=True)
class EchoResult:
    """A C-ECHO answered: the status the peer answered and the round trip (seconds, the
    association included)."""

    status: int
    seconds: float


async def echo_peer(node: NodeSettings, peer: PeerSettings) -> EchoResult:
    """Associate with *peer*, send C-ECHO, release.

    Raises
    ------
    PeerError
        The peer could not be reached, refused the association or did not answer within the
        DIMSE timeout.
    """
    started = time.monotonic()
    assoc = await open_association(node, peer, [build_context(Verification)])
    try:
        (context_id,) = assoc.contexts
        command = request_command(0x0030, assoc.next_message_id(), Verification)
        with assoc.awaiting(command.MessageID) as responses:
            await assoc.send(context_id, command)
            answer = await responses.next(node.dimse_timeout)
    except Aborted as exc:
        raise no_answer(peer.name, "C-ECHO", exc) from None
    finally:
        await end_association(assoc)
    return EchoResult(int(answer.command.Status), time.monotonic() - started)
