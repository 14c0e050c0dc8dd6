"""The chart's Argo CD health checks on status objects captured from the cluster tests
(tests/fixtures/status/, refreshed by tests/cluster/test_gitops.py), and on edge cases."""

from __future__ import annotations

import copy
import json

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
