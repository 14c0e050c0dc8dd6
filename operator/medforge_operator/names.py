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
    # A valid name may hold '.' and '-' anywhere inside: cut there, "x.-" would be invalid.
    return f"{parent[:keep].rstrip('-.')}-{digest}-{suffix}"


def label_value(value: str) -> str:
    """A name as a label value (at most 63 characters, alphanumeric at both ends): object names
    may have up to 253. Longer ones keep a readable head and a hash of the whole."""
    if len(value) <= MAX:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{value[: MAX - len(digest) - 1].rstrip('-_.')}-{digest}"


def training_job_name(contribution: str, generation: int) -> str:
    return child_name(contribution, f"train-g{generation}")


def merge_job_name(composite: str, revision: int) -> str:
    return child_name(composite, f"merge-r{revision}")
