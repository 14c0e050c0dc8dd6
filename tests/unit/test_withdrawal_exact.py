"""Withdrawal is exact, for every strategy: the replacement revision after the second of three
hospitals leaves (a full merge of the first and third, nothing new, measured against the revision
that held all three) equals a composite built from scratch from the first and third with the same
seeds, to 1e-6 in every tensor it publishes: each layer's update, the heads and the distilled
sets. The operator's side (which config a replacement gets) is tested in test_withdrawal."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medforge_common.artifacts import TASKS_FILE
from medforge_common.strategy import STRATEGIES
from medforge_merger.__main__ import main as merge_main
from tests.merge_experiment import Setup, job_args, merge_config

JSON = dict[str, Any]
SEED = 5


def strategy(name: str) -> JSON:
    s: JSON = {"type": name, "search": {"seed": SEED, "budget": 6}, "seed": SEED}
    if name == "svd":
        s["rank"] = 4
    return s


def run(setup: Setup, root: Path, name: str, strat: JSON, **extra: Any) -> Path:
    config = merge_config(setup, root, strat, name, **extra)
    cfg = json.loads(config.read_text())
    if extra.get("previous"):  # a replacement: nothing in it is new
        for i in cfg["inputs"]:
            i["new"] = False
        config.write_text(json.dumps(cfg))
    assert merge_main(job_args(root, name, config)) == 0, (root / f"{name}.term").read_text()
    return root / name


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= {f"{f.name}:{k}": v for k, v in load_file(str(f)).items()}
    return out


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_the_replacement_equals_a_composite_that_never_saw_the_input(
    three_institutions: Setup, tmp_path: Path, name: str
) -> None:
    setup = three_institutions
    rest = replace(
        setup,
        adapters=[setup.adapters[0], setup.adapters[2]],
        names=[setup.names[0], setup.names[2]],
    )
    # The revision served before the withdrawal scored every task well: the replacement is
    # measured against it on the tasks left, which changes nothing in what it merges.
    previous = {"revision": 3, "metrics": {n: {"accuracy": 1.0} for n in setup.names}}
    replacement = run(rest, tmp_path, "replacement", strategy(name), previous=previous)
    reference = run(rest, tmp_path, "reference", strategy(name))
    got, want = tensors(replacement), tensors(reference)
    assert sorted(got) == sorted(want) and got
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    bundle = replacement / TASKS_FILE
    if bundle.exists():  # no head or distilled set of the hospital that left
        with safe_open(str(bundle), framework="pt") as f:
            tasks = json.loads((f.metadata() or {})["tasks"])
        assert [t["name"] for t in tasks] == rest.names
