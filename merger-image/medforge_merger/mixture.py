"""The MedForge-Mixture composite: a bundle of adapters (scale folded into B) and one coefficient
each, with the inference helper that mixes their class probabilities."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medforge_merger.adapters import SUFFIX_A, SUFFIX_B
from medforge_merger.evaluate import Evaluator
from medforge_merger.search import FactorMap, dense, mixture_probs
from medforge_merger.strategies import Factors
from medforge_merger.tasks import Task

# How the coefficients were searched: "logits" scores the weighted sum as logits (as published).
# Bundles without the marker came from a search over normalised probabilities, whose weights
# have no meaningful scale; an incremental revision searches all of their weights again.
OBJECTIVE = "logits"


@dataclass
class Mixture:
    adapters: list[FactorMap]
    coefficients: list[float]
    sources: list[str]  # which contribution each adapter came from
    objective: str = OBJECTIVE

    def save(self, path: Path) -> None:
        tensors = {}
        for j, f in enumerate(self.adapters):
            for m, x in f.items():
                tensors[f"c{j}.{m}{SUFFIX_A}"] = x.A.contiguous()
                tensors[f"c{j}.{m}{SUFFIX_B}"] = x.B.contiguous()
        save_file(
            tensors,
            str(path),
            metadata={
                "format": "medforge-mixture",
                "coefficients": json.dumps(self.coefficients),
                "sources": json.dumps(self.sources),
                "objective": self.objective,
            },
        )

    @classmethod
    def load(cls, path: Path) -> Mixture:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            coefficients = [float(c) for c in json.loads(meta["coefficients"])]
            sources = [str(s) for s in json.loads(meta.get("sources", "[]"))]
            adapters: list[FactorMap] = [{} for _ in coefficients]
            for key in f.keys():  # noqa: SIM118
                if not key.endswith(SUFFIX_A):
                    continue
                head, _, module = key[: -len(SUFFIX_A)].partition(".")
                j = int(head[1:])
                adapters[j][module] = Factors(
                    f.get_tensor(f"{head}.{module}{SUFFIX_B}").float(), f.get_tensor(key).float()
                )
        return cls(adapters, coefficients, sources, meta.get("objective", "normalised"))

    @torch.no_grad()
    def probabilities(self, ev: Evaluator, task: Task) -> torch.Tensor:
        """Class probabilities of the mixture for `task`'s images (the inference helper): the
        softmax of the weighted sum of every adapter's class probabilities, as searched."""
        q = [{task.name: torch.softmax(ev.logits(task, dense(f)), dim=-1)} for f in self.adapters]
        return mixture_probs(q, self.coefficients, task.name)
