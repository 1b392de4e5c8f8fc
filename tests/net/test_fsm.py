"""The Upper Layer state machine against PS3.8 Table 9-10.

pynetdicom encodes the same table (`pynetdicom.fsm.TRANSITION_TABLE`, `ACTIONS`) from the
standard independently: every (event, state) cell and every action's next state must agree.
"""

from __future__ import annotations

import pytest
from pynetdicom import fsm as pynetdicom_fsm

from gateway.net.fsm import ACTIONS, TABLE, Event, ProtocolError, ProtocolMachine, State


def test_every_cell_of_table_9_10_matches_an_independent_encoding() -> None:
    theirs = {
        (Event(int(event[3:])), State(int(state[3:]))): action
        for (event, state), action in pynetdicom_fsm.TRANSITION_TABLE.items()
    }
    assert theirs == TABLE
    assert len(TABLE) == 123  # the cells of Table 9-10 that are not empty


def test_each_action_moves_to_the_state_the_standard_gives() -> None:
    assert set(ACTIONS) == set(pynetdicom_fsm.ACTIONS)
    depends = {"AE-6": ("Sta3", "Sta13"), "AR-8": ("Sta9", "Sta10")}  # acceptable; role
    for name, action in ACTIONS.items():
        ours = depends[name] if action.next is None else f"Sta{action.next.value}"
        assert ours == pynetdicom_fsm.ACTIONS[name][2], name


def test_acceptor_association_release_and_abort_paths() -> None:
    m = ProtocolMachine("acceptor")
    assert m.handle(Event.TRANSPORT_INDICATION).name == "AE-5" and m.state == State.STA2
    assert m.handle(Event.A_ASSOCIATE_RQ_PDU).name == "AE-6" and m.state == State.STA3
    assert m.handle(Event.A_ASSOCIATE_ACCEPT).name == "AE-7" and m.state == State.STA6
    assert m.handle(Event.P_DATA_TF_PDU).name == "DT-2" and m.state == State.STA6
    assert m.handle(Event.P_DATA_REQUEST).name == "DT-1"
    assert m.handle(Event.A_RELEASE_RQ_PDU).name == "AR-2" and m.state == State.STA8
    assert m.handle(Event.P_DATA_REQUEST).name == "AR-7" and m.state == State.STA8
    assert m.handle(Event.A_RELEASE_RESPONSE).name == "AR-4" and m.state == State.STA13
    assert m.handle(Event.TRANSPORT_CLOSED).name == "AR-5" and m.state == State.STA1
    # An unacceptable request: rejected, then ARTIM bounds the wait for the close.
    m = ProtocolMachine("acceptor")
    m.handle(Event.TRANSPORT_INDICATION)
    assert m.handle(Event.A_ASSOCIATE_RQ_PDU, acceptable=False).name == "AE-6"
    assert m.state == State.STA13
    assert m.handle(Event.ARTIM_EXPIRED).name == "AA-2" and m.state == State.STA1


def test_release_collision_goes_by_role() -> None:
    for role, collided, final in (("requestor", State.STA9, "AR-9"),
                                  ("acceptor", State.STA10, "AR-10")):  # fmt: skip
        m = ProtocolMachine(role)  # type: ignore[arg-type]
        m.state = State.STA6
        assert m.handle(Event.A_RELEASE_REQUEST).name == "AR-1" and m.state == State.STA7
        assert m.handle(Event.A_RELEASE_RQ_PDU).name == "AR-8" and m.state == collided
        if role == "requestor":
            assert m.handle(Event.A_RELEASE_RESPONSE).name == final and m.state == State.STA11
            assert m.handle(Event.A_RELEASE_RP_PDU).name == "AR-3" and m.state == State.STA1
        else:
            assert m.handle(Event.A_RELEASE_RP_PDU).name == final and m.state == State.STA12
            assert m.handle(Event.A_RELEASE_RESPONSE).name == "AR-4" and m.state == State.STA13


def test_a_pdu_out_of_place_is_invalid_and_a_local_request_out_of_place_is_refused() -> None:
    m = ProtocolMachine("acceptor")
    m.handle(Event.TRANSPORT_INDICATION)
    # A P-DATA-TF before the association is negotiated: A-ABORT, ARTIM, Sta13.
    assert m.handle(Event.P_DATA_TF_PDU).name == "AA-1" and m.state == State.STA13
    # Anything but an abort or a close arriving meanwhile is ignored.
    assert m.handle(Event.P_DATA_TF_PDU).name == "AA-6" and m.state == State.STA13
    with pytest.raises(ProtocolError, match="Evt9"):
        m.handle(Event.P_DATA_REQUEST)
