"""Fixtures shared by the unit tests' modules."""

from __future__ import annotations

import pytest

from tests.merge_experiment import Setup, build


@pytest.fixture(scope="session")
def three_institutions(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """The synthetic three-institution setup (tiny CLIP, adapters and distilled sets trained by
    medforge-train), built once for every merge test that reads it."""
    return build(tmp_path_factory.mktemp("three"), seed=0)
