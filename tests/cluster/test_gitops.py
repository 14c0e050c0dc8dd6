"""GitOps on real status: every phase of every kind, as the operator writes it, judged by the
chart's Argo CD health checks (Lua 5.1) and by kstatus (Flux's `wait`, kpt). A composite that
waits for contributions is Current, not Reconciling for ever.

Set MEDFORGE_CAPTURE_STATUS=1 to refresh tests/fixtures/status/ (the unit test reads them)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from medforge_localcluster import binaries
from tests.builders import composite_manifest, contribution
from tests.cluster.conftest import (
    Forge,
    OperatorProcess,
    base_model,
    register_base_model,
)
from tests.cluster.test_operator import status
from tests.conftest import ClusterAccess
from tests.gitops import EXPECTED, FIXTURES, argocd_health, captured, kstatus
from tests.helpers import get_json, wait_until

pytestmark = pytest.mark.usefixtures("operator")


def shared(name: str, base: tuple[str, str], task: str, case: str, forge: str) -> str:
    doc = json.loads(contribution(name, base, task=task))
    doc["metadata"]["labels"]["medforge.io/case"] = case
    doc["spec"]["sharing"] = {"forges": [f"{forge}/{case}"]}
    return json.dumps(doc)


def composite(name: str, base: tuple[str, str], hospital: str, **spec: Any) -> str:
    return composite_manifest(
        name,
        base,
        {"medforge.io/case": name},
        {"kubernetes.io/metadata.name": hospital},
        **spec,
    )


def test_argocd_health_and_kstatus_in_every_phase(
    cluster: ClusterAccess,
    namespace: str,
    forge_namespace: str,
    forge: Forge,
    operator: OperatorProcess,
) -> None:
    base = base_model(cluster, forge, "clip-gitops")
    # A BaseModel pinned to a digest its files do not have: refused.
    bad_base, _ = forge.upload_base_model("clip-gitops-bad")
    register_base_model(cluster, bad_base, "sha256:" + "0" * 64, wait=False)

    hospital, fg = namespace, forge_namespace
    cluster.apply(hospital, shared("ok", base, "derm", "ready", fg))
    cluster.apply(hospital, shared("poisoned", base, "reject-me", "rejected", fg))
    cluster.apply(hospital, contribution("broken", base, task="fail-now"))
    cluster.apply(hospital, contribution("busy", base, task="slow-120"))
    cluster.apply(hospital, contribution("orphan", ("no-such-model", "")))
    cluster.apply(fg, composite("ready", base, hospital))
    cluster.apply(fg, composite("rejected", base, hospital))
    cluster.apply(fg, composite("waiting", base, hospital, minContributions=5))
    cluster.apply(fg, composite("paused", base, hospital, paused=True))
    cluster.apply(hospital, composite("elsewhere", base, hospital))

    def phase_is(kind: str, ns: str, name: str, test: Any) -> Any:
        return wait_until(
            lambda: (st := status(cluster, kind, ns, name)) and test(st) and st,
            120,
            what=f"{kind} {ns}/{name}",
        )

    def history_state(state: str) -> Any:
        return lambda st: (st.get("history") or [{}])[0].get("state") == state

    phase_is("lorac", hospital, "ok", lambda st: st.get("phase") == "Succeeded")
    phase_is("lorac", hospital, "broken", lambda st: st.get("phase") == "Failed")
    phase_is("lorac", hospital, "busy", lambda st: st.get("phase") == "Training")
    phase_is("lorac", hospital, "orphan", lambda st: st.get("phase") == "Pending")
    phase_is("cmodel", fg, "ready", lambda st: (st.get("current") or {}).get("revision"))
    phase_is("cmodel", fg, "rejected", history_state("Rejected"))
    phase_is("cmodel", fg, "waiting", lambda st: st.get("phase") == "Waiting")
    phase_is("cmodel", fg, "paused", lambda st: st.get("phase") == "Paused")
    phase_is("cmodel", hospital, "elsewhere", lambda st: st.get("phase") == "Failed")
    phase_is("basemodel", "", bad_base, lambda st: st.get("phase") == "Failed")

    def fetch(kind: str, ns: str, name: str) -> dict[str, Any]:
        args = [kind, name] + (["-n", ns] if ns else [])
        obj: dict[str, Any] = get_json(cluster, *args)
        return obj

    cases = {
        "contribution-succeeded": fetch("lorac", hospital, "ok"),
        "contribution-training": fetch("lorac", hospital, "busy"),
        "contribution-failed": fetch("lorac", hospital, "broken"),
        "contribution-stalled": fetch("lorac", hospital, "orphan"),
        "composite-ready": fetch("cmodel", fg, "ready"),
        "composite-waiting": fetch("cmodel", fg, "waiting"),
        "composite-paused": fetch("cmodel", fg, "paused"),
        "composite-rejected": fetch("cmodel", fg, "rejected"),
        "composite-not-a-forge": fetch("cmodel", hospital, "elsewhere"),
        "basemodel-ready": fetch("basemodel", "", base[0]),
        "basemodel-failed": fetch("basemodel", "", bad_base),
    }
    assert set(cases) == set(EXPECTED)
    ks = kstatus(
        list(cases.values()), binaries.ensure(["kstatus-check"], log=False)["kstatus-check"]
    )
    wrong = []
    for (case, obj), k in zip(cases.items(), ks, strict=True):
        health = argocd_health(obj)
        want_health, want_kstatus = EXPECTED[case]
        if (health["status"], k["status"]) != (want_health, want_kstatus):
            wrong.append(
                f"{case}: Argo CD {health} (want {want_health}), "
                f"kstatus {k['status']} {k['message']!r} (want {want_kstatus})"
            )
        assert health["message"], case  # every verdict says why
    assert not wrong, "\n".join(wrong)

    if os.environ.get("MEDFORGE_CAPTURE_STATUS"):
        FIXTURES.mkdir(parents=True, exist_ok=True)
        for case, obj in cases.items():
            (FIXTURES / f"{case}.json").write_text(json.dumps(captured(obj), indent=1) + "\n")
