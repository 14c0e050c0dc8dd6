"""The custom resources tests build, in one place: a LoRAContribution as the unit tests read it
(a dict, with the metadata the API server adds) and as the cluster tests apply it (JSON text),
and a CompositeModel over labelled contributions."""

from __future__ import annotations

import json
from typing import Any

JSON = dict[str, Any]
API_VERSION = "medforge.io/v1alpha1"


def lorac(
    name: str = "breakhis",
    ns: str = "hospital-a",
    uid: str = "u1",
    gen: int = 1,
    task: str | JSON = "breakhis",
    dataset: str | JSON = "s3://data/breakhis/",
    **spec: Any,
) -> JSON:
    """A LoRAContribution as the operator reads it from the API server; `task` and `dataset`
    are a name and a URI, or the whole spec field."""
    return {
        "apiVersion": API_VERSION,
        "kind": "LoRAContribution",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "generation": gen},
        "spec": {
            "baseModel": {"name": "clip"},
            "task": {"name": task, "classes": ["a", "b"]} if isinstance(task, str) else task,
            "dataset": {"uri": dataset} if isinstance(dataset, str) else dataset,
            **spec,
        },
    }


def contribution(name: str, base: tuple[str, str], task: str = "breakhis", **spec: Any) -> str:
    """A LoRAContribution to apply, labelled for the tests' composites, on base model `base`."""
    doc = {
        "apiVersion": API_VERSION,
        "kind": "LoRAContribution",
        "metadata": {"name": name, "labels": {"medforge.io/test": "yes"}},
        "spec": {
            "baseModel": {"name": base[0]},
            "task": {"name": task, "classes": ["benign", "malignant"]},
            "dataset": {"uri": "s3://hospital-data/breakhis/"},
            **spec,
        },
    }
    return json.dumps(doc)


def composite_manifest(
    name: str,
    base: tuple[str, str],
    selector: dict[str, str],
    namespaces: dict[str, str],
    **spec: Any,
) -> str:
    """A CompositeModel over the contributions labelled `selector` in the namespaces labelled
    `namespaces`."""
    return json.dumps(
        {
            "apiVersion": API_VERSION,
            "kind": "CompositeModel",
            "metadata": {"name": name},
            "spec": {
                "baseModel": {"name": base[0]},
                "contributions": {
                    "selector": {"matchLabels": selector},
                    "namespaceSelector": {"matchLabels": namespaces},
                },
                **spec,
            },
        }
    )
