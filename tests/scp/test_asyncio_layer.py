"""The node on the asyncio network layer (`GATEWAY_NETWORK=asyncio`, docs/network.md).

The tests of what that layer serves so far (association policy, DICOM TLS with client
certificates and its refusals, SIGTERM grace, C-ECHO,
C-STORE with its refusals, streaming of a 500 MB instance, kill -9 during a four-association
ingest, C-FIND at every level and model with its cap, character sets and C-CANCEL, the
Modality Worklist, MPPS, C-MOVE and C-GET with their sub-operations, failures and C-CANCEL,
re-encoding for implicit-only destinations), unchanged, run again with every gateway they
start on the new layer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scp.test_durability import (  # noqa: F401
    raw_files,
    test_500_mb_instance_stays_within_100_mb_of_idle,
    test_kill_9_during_four_association_ingest,
)
from tests.scp.test_policy import (  # noqa: F401
    test_allowlist_entry_bound_to_a_host,
    test_association_limit_is_a_transient_rejection,
    test_called_ae_check_can_be_off,
    test_called_ae_title_checked,
    test_calling_ae_allowlist,
    test_sigterm_aborts_what_outlives_the_grace,
    test_sigterm_lets_open_associations_finish,
)
from tests.scp.test_query_retrieve import (  # noqa: F401
    archive,
    dest,
    test_find_answers_capped_with_findscu,
    test_find_bad_identifier_fails,
    test_find_image_level,
    test_find_japanese_name_with_pynetdicom,
    test_find_patient_root_patient_level,
    test_find_romanised_name_returns_the_name_in_utf8,
    test_find_series_level,
    test_find_study_level_matching,
    test_find_study_root_universal_match_and_computed_keys,
    test_get_cancel_is_honoured,
    test_get_study_level_without_study_uid_fails,
    test_get_with_getscu,
    test_get_with_pynetdicom,
    test_move_to_a_destination_that_refuses_a_sop_class,
    test_move_to_unknown_destination,
    test_move_with_movescu_into_storescp,
    test_move_without_unique_key_fails,
    test_pathological_wildcard_answers_at_once,
)
from tests.scp.test_receive import (  # noqa: F401
    raw_sender,
    test_a_dataset_past_max_instance_bytes_is_dropped_and_the_association_goes_on,
    test_a_sender_that_states_its_roles_can_store,
    test_an_instance_on_an_inappropriate_context_is_refused_and_the_association_goes_on,
    test_bad_identifiers_refused,
    test_bytes_are_stored_as_received,
    test_dataset_uid_differs_from_request,
    test_disk_failure_is_out_of_resources,
    test_echo,
    test_extended_negotiation_items_are_not_claimed_and_never_refuse,
    test_one_uid_in_another_series_is_refused_and_the_association_goes_on,
    test_private_sop_class_only_when_configured,
    test_real_file_whose_meta_and_dataset_disagree,
    test_truncated_dataset_refused,
    test_verification_from_pynetdicom_sets_nodelay_on_both_ends,
)
from tests.scp.test_tls import (  # noqa: F401
    pki,
    test_tls_listener_with_client_certificates,
)
from tests.test_acquisition import (  # noqa: F401
    test_findscu_sees_the_worklist_and_each_key_narrows_it,
    test_mpps_moves_tasks_through_their_states,
    test_mpps_n_create_without_an_instance_uid_gets_one,
)
from tests.test_outbound_syntaxes import (  # noqa: F401
    legacy,
    test_rule_move_and_get_to_implicit_only_destinations,
)
from tests.test_real_world_files import (  # noqa: F401
    test_real_world_files_as_storescp_takes_them_and_back_by_c_move,
)


@pytest.fixture(scope="module", autouse=True)
def asyncio_layer() -> Iterator[None]:
    """Every gateway process these tests start takes the asyncio layer (module-wide: the
    module-scoped gateways of the imported tests too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GATEWAY_NETWORK", "asyncio")
        yield


@pytest.fixture(autouse=True)
def nothing_left_in_tmp(tmp_path: Path) -> Iterator[None]:
    """No gateway a test starts leaves a received file behind in its tmp/ (refused,
    duplicate or stored: each is removed or moved in), a kill -9 excepted (start-up clears
    those)."""
    yield
    left = [p for p in tmp_path.rglob("tmp/*.part") if p.is_file()]
    assert left == [] or "kill_9" in os.environ.get("PYTEST_CURRENT_TEST", ""), left
