"""The chart's Argo CD health checks on status objects captured from the cluster tests
(tests/fixtures/status/, refreshed by tests/cluster/test_gitops.py), and on edge cases."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.gitops import ARGOCD, EXPECTED, FIXTURES, argocd_health


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_captured_status_has_the_expected_health(case: str) -> None:
    obj = json.loads((FIXTURES / f"{case}.json").read_text())
    health = argocd_health(obj)
    assert health["status"] == EXPECTED[case][0], health
    assert health["message"]


@pytest.mark.parametrize("kind", ["LoRAContribution", "CompositeModel", "BaseModel"])
def test_no_status_or_an_unseen_generation_is_progressing(kind: str) -> None:
    fixture = {"LoRAContribution": "contribution-succeeded", "CompositeModel": "composite-ready"}
    obj = json.loads((FIXTURES / f"{fixture.get(kind, 'basemodel-ready')}.json").read_text())
    bare = {k: v for k, v in obj.items() if k != "status"}
    assert argocd_health(bare)["status"] == "Progressing"
    edited = copy.deepcopy(obj)
    edited["metadata"]["generation"] = obj["status"]["observedGeneration"] + 1
    assert argocd_health(edited)["status"] == "Progressing"


def test_a_paused_composite_is_suspended_whatever_its_status() -> None:
    obj = json.loads((FIXTURES / "composite-ready.json").read_text())
    obj["spec"]["paused"] = True
    assert argocd_health(obj)["status"] == "Suspended"


def test_a_rejected_revision_over_a_served_one_is_degraded_and_says_which() -> None:
    obj = json.loads((FIXTURES / "composite-ready.json").read_text())
    obj["status"]["history"].insert(
        0, {"revision": 2, "state": "Rejected", "reason": "RegressionOverGate", "message": "x"}
    )
    health = argocd_health(obj)
    assert health["status"] == "Degraded"
    assert "Revision 2 rejected (RegressionOverGate)" in health["message"]
    assert "serving revision 1" in health["message"]


def test_the_docs_carry_each_check_verbatim() -> None:
    docs = (ARGOCD.parents[3] / "docs" / "gitops.md").read_text()
    for script in sorted(ARGOCD.glob("*.lua")):
        body = script.read_text().strip()
        indented = "\n".join(("      " + line) if line else "" for line in body.splitlines())
        assert indented in docs, f"docs/gitops.md lacks the current {script.name}"


def test_an_institution_is_healthy_with_valid_keys_and_degraded_without() -> None:
    from medforge_common.attestation import new_key_pair
    from medforge_operator import institution

    _, public = new_key_pair()
    obj: dict[str, Any] = {
        "kind": "Institution",
        "metadata": {"name": "h", "generation": 1},
        "spec": {"namespace": "h", "keys": [{"name": "k", "publicKey": public.decode()}]},
    }
    assert argocd_health(obj)["status"] == "Progressing"
    obj["status"] = institution.status(obj, "t")
    assert argocd_health(obj) == {"status": "Healthy", "message": "KeysValid: 1 active key(s)"}
    obj["spec"]["keys"][0]["state"] = "Revoked"
    obj["metadata"]["generation"] = 2
    assert argocd_health(obj)["status"] == "Progressing"  # not seen yet
    obj["status"] = institution.status(obj, "t")
    health = argocd_health(obj)
    assert health["status"] == "Degraded" and health["message"].startswith("NoActiveKey")
    stalled = next(c for c in obj["status"]["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True"
