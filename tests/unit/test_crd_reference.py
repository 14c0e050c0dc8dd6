"""docs/crd-reference.md is generated from crds/ and current; it names every field."""

from __future__ import annotations

import yaml

from tools import crd_reference


def test_reference_is_current() -> None:
    assert crd_reference.TARGET.read_text() == crd_reference.render(), (
        "docs/crd-reference.md is stale: run make generate"
    )


def test_every_spec_field_and_rule_is_in_it() -> None:
    text = crd_reference.render()
    for path in sorted(crd_reference.CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert f"## {crd['spec']['names']['kind']}" in text
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for name in spec["properties"]:
            assert f"`spec.{name}`" in text, name
        for rule in spec.get("x-kubernetes-validations") or []:
            assert rule["message"].split()[0] in text
