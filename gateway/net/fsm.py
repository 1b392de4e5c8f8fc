"""The DICOM Upper Layer protocol machine of PS3.8 section 9.2: states, events, actions.

Pure data and one small class, no I/O: `ProtocolMachine.handle(event)` looks up the action
that PS3.8 Table 9-10 gives for the event in the current state, moves to the action's next
state and returns the action; the association that owns the machine performs what the action
says (send a PDU, start the ARTIM timer, close the connection, tell its user). A PDU that the
table has no entry for in the current state is an invalid PDU there (Evt19's row). A local
request (Evt1, Evt7-9, Evt11, Evt14, Evt15) the table has no entry for is a programming error
and raises `ProtocolError`.

States (Table 9-1):

- Sta1 idle; Sta2 transport connection open, awaiting A-ASSOCIATE-RQ; Sta3 awaiting the local
  A-ASSOCIATE response; Sta4 awaiting the transport connection to open; Sta5 awaiting
  A-ASSOCIATE-AC or -RJ; Sta6 association established, ready for data transfer;
- Sta7 awaiting A-RELEASE-RP; Sta8 awaiting the local A-RELEASE response; Sta9 release
  collision, requestor, awaiting the local A-RELEASE response; Sta10 release collision,
  acceptor, awaiting A-RELEASE-RP; Sta11 release collision, requestor, awaiting A-RELEASE-RP;
  Sta12 release collision, acceptor, awaiting the local A-RELEASE response;
- Sta13 awaiting the transport connection to close (after an A-ABORT or a reject or release
  response sent: the ARTIM timer bounds the wait).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal

from gateway.errors import GatewayError

__all__ = ["ACTIONS", "TABLE", "Action", "Event", "ProtocolError", "ProtocolMachine", "State"]


class ProtocolError(GatewayError):
    """A local request the Upper Layer cannot take in its current state."""


class State(enum.IntEnum):
    """Upper Layer states (PS3.8 Table 9-1): `STA1` ... `STA13`."""

    STA1 = 1
    STA2 = 2
    STA3 = 3
    STA4 = 4
    STA5 = 5
    STA6 = 6
    STA7 = 7
    STA8 = 8
    STA9 = 9
    STA10 = 10
    STA11 = 11
    STA12 = 12
    STA13 = 13


class Event(enum.IntEnum):
    """Upper Layer events (PS3.8 Table 9-2): `EVT1` ... `EVT19`."""

    A_ASSOCIATE_REQUEST = 1  # local user
    TRANSPORT_CONNECTED = 2  # transport connect confirmation
    A_ASSOCIATE_AC_PDU = 3
    A_ASSOCIATE_RJ_PDU = 4
    TRANSPORT_INDICATION = 5  # a connection accepted
    A_ASSOCIATE_RQ_PDU = 6
    A_ASSOCIATE_ACCEPT = 7  # local response
    A_ASSOCIATE_REJECT = 8  # local response
    P_DATA_REQUEST = 9
    P_DATA_TF_PDU = 10
    A_RELEASE_REQUEST = 11
    A_RELEASE_RQ_PDU = 12
    A_RELEASE_RP_PDU = 13
    A_RELEASE_RESPONSE = 14
    A_ABORT_REQUEST = 15
    A_ABORT_PDU = 16
    TRANSPORT_CLOSED = 17
    ARTIM_EXPIRED = 18
    INVALID_PDU = 19


# The events that a peer's PDU raises (the rest are local or the transport's).
PDU_EVENTS: Final = frozenset(
    {
        Event.A_ASSOCIATE_AC_PDU,
        Event.A_ASSOCIATE_RJ_PDU,
        Event.A_ASSOCIATE_RQ_PDU,
        Event.P_DATA_TF_PDU,
        Event.A_RELEASE_RQ_PDU,
        Event.A_RELEASE_RP_PDU,
        Event.A_ABORT_PDU,
        Event.INVALID_PDU,
    }
)


@dataclass(frozen=True, slots=True)
class Action:
    """One action of PS3.8 section 9.2.2 (Tables 9-6 to 9-9): what to do, and the next state
    (None where it depends: AE-6 on whether the request is acceptable, AR-8 on the role)."""

    name: str
    does: str
    next: State | None


_ACTIONS: Final = (
    Action("AE-1", "issue a transport connect request", State.STA4),
    Action("AE-2", "send A-ASSOCIATE-RQ", State.STA5),
    Action("AE-3", "issue A-ASSOCIATE confirmation (accept)", State.STA6),
    Action("AE-4", "issue A-ASSOCIATE confirmation (reject), close the connection", State.STA1),
    Action("AE-5", "issue the transport connection response, start ARTIM", State.STA2),
    Action("AE-6", "stop ARTIM; issue A-ASSOCIATE indication (Sta3) if acceptable, else send "
           "A-ASSOCIATE-RJ and start ARTIM (Sta13)", None),
    Action("AE-7", "send A-ASSOCIATE-AC", State.STA6),
    Action("AE-8", "send A-ASSOCIATE-RJ, start ARTIM", State.STA13),
    Action("DT-1", "send P-DATA-TF", State.STA6),
    Action("DT-2", "issue P-DATA indication", State.STA6),
    Action("AR-1", "send A-RELEASE-RQ", State.STA7),
    Action("AR-2", "issue A-RELEASE indication", State.STA8),
    Action("AR-3", "issue A-RELEASE confirmation, close the connection", State.STA1),
    Action("AR-4", "send A-RELEASE-RP, start ARTIM", State.STA13),
    Action("AR-5", "stop ARTIM", State.STA1),
    Action("AR-6", "issue P-DATA indication", State.STA7),
    Action("AR-7", "send P-DATA-TF", State.STA8),
    Action("AR-8", "issue A-RELEASE indication (release collision): Sta9 as requestor, "
           "Sta10 as acceptor", None),
    Action("AR-9", "send A-RELEASE-RP", State.STA11),
    Action("AR-10", "issue A-RELEASE confirmation", State.STA12),
    Action("AA-1", "send A-ABORT (service-user), start or restart ARTIM", State.STA13),
    Action("AA-2", "stop ARTIM if running, close the connection", State.STA1),
    Action("AA-3", "issue A-ABORT (service-user source) or A-P-ABORT (service-provider) "
           "indication, close the connection", State.STA1),
    Action("AA-4", "issue A-P-ABORT indication", State.STA1),
    Action("AA-5", "stop ARTIM", State.STA1),
    Action("AA-6", "ignore the PDU", State.STA13),
    Action("AA-7", "send A-ABORT", State.STA13),
    Action("AA-8", "send A-ABORT (service-provider), issue A-P-ABORT indication, start ARTIM",
           State.STA13),
)  # fmt: skip
ACTIONS: Final[dict[str, Action]] = {action.name: action for action in _ACTIONS}


def _rows() -> dict[tuple[Event, State], str]:
    """PS3.8 Table 9-10, row by row: the action for an event in each state it may occur."""
    e, table = Event, {}
    rows: dict[Event, str] = {
        e.A_ASSOCIATE_REQUEST: "1:AE-1",
        e.TRANSPORT_CONNECTED: "4:AE-2",
        e.A_ASSOCIATE_AC_PDU: "2:AA-1 3:AA-8 5:AE-3 6-12:AA-8 13:AA-6",
        e.A_ASSOCIATE_RJ_PDU: "2:AA-1 3:AA-8 5:AE-4 6-12:AA-8 13:AA-6",
        e.TRANSPORT_INDICATION: "1:AE-5",
        e.A_ASSOCIATE_RQ_PDU: "2:AE-6 3:AA-8 5-12:AA-8 13:AA-7",
        e.A_ASSOCIATE_ACCEPT: "3:AE-7",
        e.A_ASSOCIATE_REJECT: "3:AE-8",
        e.P_DATA_REQUEST: "6:DT-1 8:AR-7",
        e.P_DATA_TF_PDU: "2:AA-1 3:AA-8 5:AA-8 6:DT-2 7:AR-6 8-12:AA-8 13:AA-6",
        e.A_RELEASE_REQUEST: "6:AR-1",
        e.A_RELEASE_RQ_PDU: "2:AA-1 3:AA-8 5:AA-8 6:AR-2 7:AR-8 8-12:AA-8 13:AA-6",
        e.A_RELEASE_RP_PDU: "2:AA-1 3:AA-8 5:AA-8 6:AA-8 7:AR-3 8:AA-8 9:AA-8 10:AR-10 "
        "11:AR-3 12:AA-8 13:AA-6",
        e.A_RELEASE_RESPONSE: "8:AR-4 9:AR-9 12:AR-4",
        e.A_ABORT_REQUEST: "3:AA-1 4:AA-2 5-12:AA-1",
        e.A_ABORT_PDU: "2:AA-2 3:AA-3 5-12:AA-3 13:AA-2",
        e.TRANSPORT_CLOSED: "2:AA-5 3-12:AA-4 13:AR-5",
        e.ARTIM_EXPIRED: "2:AA-2 13:AA-2",
        e.INVALID_PDU: "2:AA-1 3:AA-8 5-12:AA-8 13:AA-7",
    }
    for event, row in rows.items():
        for cell in row.split():
            states, action = cell.split(":")
            first, _, last = states.partition("-")
            for number in range(int(first), int(last or first) + 1):
                table[(event, State(number))] = action
    return table


TABLE: Final[dict[tuple[Event, State], str]] = _rows()


class ProtocolMachine:
    """The state of one association's Upper Layer, as requestor or acceptor."""

    def __init__(self, role: Literal["requestor", "acceptor"]) -> None:
        self.role = role
        self.state = State.STA1

    def handle(self, event: Event, *, acceptable: bool = True) -> Action:
        """Take *event*: return the action to perform, the machine already in its next state.

        *acceptable* is AE-6's test (an A-ASSOCIATE-RQ the provider can take: its protocol
        version and PDU well-formed). A peer's PDU with no entry in the current state is taken
        as Evt19 (an invalid PDU there); a transport event with none leaves the state as it is
        (action None is not returned: `ProtocolError`).
        """
        name = TABLE.get((event, self.state))
        if name is None and event in PDU_EVENTS:
            name = TABLE.get((Event.INVALID_PDU, self.state))
        if name is None:
            raise ProtocolError(f"{event.name} (Evt{event.value}) is not valid in Sta{self.state}")
        action = ACTIONS[name]
        if action.next is not None:
            self.state = action.next
        elif name == "AE-6":
            self.state = State.STA3 if acceptable else State.STA13
        else:  # AR-8
            self.state = State.STA9 if self.role == "requestor" else State.STA10
        return action
