"""examples/ is valid: the API server accepts every manifest (CRD schemas and CEL rules
included), the operator reconciles every object, and the GitOps manifests name this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml

from tests.cluster.conftest import ROOT
from tests.conftest import ClusterAccess
from tests.helpers import get_json, wait_until

pytestmark = pytest.mark.usefixtures("operator")
EXAMPLES = ROOT / "examples"


@pytest.fixture
def applied(cluster: ClusterAccess) -> Iterator[list[dict[str, object]]]:
    docs = [d for f in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    docs = [d for d in docs if d and d.get("kind") != "Kustomization"]
    # Namespaces first (Argo CD and Flux order them first too): a server dry run of objects
    # in a namespace that does not exist yet is refused.
    cluster.kubectl("apply", "-f", str(EXAMPLES / "namespaces.yaml"))
    dry = cluster.kubectl("apply", "-k", str(EXAMPLES), "--dry-run=server", check=False)
    assert dry.returncode == 0, dry.stderr
    cluster.kubectl("apply", "-k", str(EXAMPLES))
    yield docs
    cluster.kubectl("delete", "-k", str(EXAMPLES), "--wait=false", check=False)


def test_every_example_applies_and_is_reconciled(
    cluster: ClusterAccess, applied: list[dict[str, object]]
) -> None:
    kinds = {str(d["kind"]) for d in applied}
    assert {"BaseModel", "LoRAContribution", "CompositeModel", "Secret", "Institution"} <= kinds
    listed = yaml.safe_load((EXAMPLES / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(
        p.name for p in EXAMPLES.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    # The operator has a word on each of MedForge's objects (a phase and conditions).
    for d in applied:
        kind = str(d["kind"])
        if kind not in ("BaseModel", "LoRAContribution", "CompositeModel"):
            continue
        meta = d["metadata"]
        assert isinstance(meta, dict)
        args = [kind.lower(), meta["name"]] + (
            ["-n", meta["namespace"]] if "namespace" in meta else []
        )

        def reconciled(args: list[str] = args) -> dict[str, object] | None:
            st: dict[str, object] = get_json(cluster, *args).get("status") or {}
            return st if st.get("phase") and st.get("conditions") else None

        wait_until(reconciled, 60, what=f"{' '.join(args)} to be reconciled")
    # The example keys are real EC public keys: each Institution is Ready.
    for d in applied:
        if d["kind"] == "Institution":
            name = str(d["metadata"]["name"])  # type: ignore[index]

            def keys_valid(name: str = name) -> dict[str, object] | None:
                st: dict[str, object] = get_json(cluster, "institution", name).get("status") or {}
                return st if st.get("activeKeys") == 1 else None

            wait_until(keys_valid, 60, what=f"Institution {name} to read its key")


def test_gitops_manifests_point_at_the_examples() -> None:
    docs = [
        d
        for f in sorted((EXAMPLES / "gitops").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
    ]
    app = next(d for d in docs if d["kind"] == "Application")
    assert app["spec"]["source"]["path"] == "examples"
    flux = next(d for d in docs if d["kind"] == "Kustomization")
    assert flux["spec"]["path"] == "./examples" and flux["spec"]["wait"] is True
