"""The operator's vocabulary (medforge_common.api) against the CRDs: every phase the CRDs
allow is one the operator writes and the other way round, and every condition type a kind
reports is named in its CRD's description of conditions."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
import yaml

from medforge_common import api

CRDS = Path(__file__).resolve().parents[2] / "crds"


def status_schema(kind: str) -> dict[str, Any]:
    doc = yaml.safe_load((CRDS / f"{kind}.medforge.io.yaml").read_text())
    schema: dict[str, Any] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return dict(schema["properties"]["status"]["properties"])


@pytest.mark.parametrize(
    ("kind", "phases", "conditions"),
    [
        (
            "loracontributions",
            api.ContributionPhase,
            ["READY", "RECONCILING", "STALLED", "TRAINED", "ARTIFACT_VERIFIED"],
        ),
        (
            "compositemodels",
            api.CompositePhase,
            ["READY", "RECONCILING", "STALLED", "MERGED", "ACCEPTED"],
        ),
        ("basemodels", api.BaseModelPhase, ["READY", "RECONCILING", "STALLED", "VERIFIED"]),
    ],
)
def test_phases_and_condition_types_match_the_crds(
    kind: str, phases: type[StrEnum], conditions: list[str]
) -> None:
    status = status_schema(kind)
    assert set(status["phase"]["enum"]) == {p.value for p in phases}
    described = status["conditions"]["description"]
    for name in conditions:
        assert api.ConditionType[name].value in described, (kind, name)


def test_reasons_are_unique_camel_case_codes() -> None:
    for enum in (api.Reason, api.InputReason, api.EventReason, api.RevisionState, api.InputState):
        values = [m.value for m in enum]
        assert len(values) == len(set(values)), enum
        assert all(v[:1].isupper() and v.isalnum() for v in values), enum


def test_the_composite_history_states_are_revision_states() -> None:
    """status.history[].state values and the Revision<State> Event reasons come from here."""
    assert {s.value for s in api.RevisionState} == {"Accepted", "Rejected", "Failed", "Withdrawn"}
