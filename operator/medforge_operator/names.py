"""Deterministic child names: the same parent and generation always give the same Job name, so
an operator restart never duplicates work."""

from __future__ import annotations

import hashlib

MAX = 63  # a Job's name becomes a label value on its pods


def child_name(parent: str, suffix: str) -> str:
    name = f"{parent}-{suffix}"
    if len(name) <= MAX:
        return name
    digest = hashlib.sha256(parent.encode()).hexdigest()[:8]
    keep = MAX - len(suffix) - len(digest) - 2
    return f"{parent[:keep].rstrip('-')}-{digest}-{suffix}"


def training_job_name(contribution: str, generation: int) -> str:
    return child_name(contribution, f"train-g{generation}")


def merge_job_name(composite: str, revision: int) -> str:
    return child_name(composite, f"merge-r{revision}")
