"""Scoring a composite on each task's distilled set: the base model with the composite's weight
updates added in place (and restored exactly afterwards), each task's own head on top."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medforge_merger.strategies import MergeError
from medforge_merger.tasks import Task
from medforge_ml import classifier
from medforge_ml.errors import ModelError
from medforge_ml.metrics import classification_metrics

Deltas = dict[str, torch.Tensor]  # module name (as in the base model) -> dense update (d x k)


class EvaluationError(MergeError):
    """The base model and a composite or task that do not fit together."""


class Evaluator:
    def __init__(self, base_dir: Path) -> None:
        self.base, self.tokenizer, config = classifier.load_base(base_dir)
        self.image_size = classifier.image_settings(base_dir, config)[0]
        self._classifiers: dict[str, classifier.Classifier] = {}

    def check_update(self, name: str, shape: tuple[int, int]) -> None:
        """EvaluationError unless `name` is a linear layer of the base model whose weight has
        `shape` (d_out x d_in): an update that would not fit is refused before any merge."""
        mod = self._module(name)
        out_dim, in_dim = mod.weight.shape
        if (out_dim, in_dim) != shape:
            raise EvaluationError(
                f"{name}: an update of {shape[0]} x {shape[1]} does not fit the base model's "
                f"weight {out_dim} x {in_dim}"
            )

    def classifier(self, task: Task) -> classifier.Classifier:
        clf = self._classifiers.get(task.name)
        if clf is None:
            try:
                clf = classifier.Classifier(
                    self.base, task.head, tuple(task.classes), self.tokenizer
                )
            except ModelError as exc:
                raise EvaluationError(f"task {task.name}: {exc}") from exc
            if task.head == "linear":
                if not task.head_weights:
                    raise EvaluationError(
                        f"task {task.name}: a linear head but no head.safetensors"
                    )
                try:
                    clf.head.load_state_dict(task.head_weights)
                except RuntimeError as exc:
                    raise EvaluationError(
                        f"task {task.name}: head.safetensors does not fit "
                        f"{len(task.classes)} classes ({exc})".splitlines()[0]
                    ) from exc
            clf.eval()
            self._classifiers[task.name] = clf
        return clf

    def _module(self, name: str) -> nn.Linear:
        try:
            mod = self.base.get_submodule(name)
        except AttributeError as exc:
            raise EvaluationError(f"the base model has no module {name}") from exc
        if not isinstance(mod, nn.Linear):
            raise EvaluationError(f"{name} is not a linear layer of the base model")
        return mod

    @contextlib.contextmanager
    def applied(self, deltas: Deltas) -> Iterator[None]:
        saved: list[tuple[nn.Linear, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name, delta in deltas.items():
                    mod = self._module(name)
                    if tuple(delta.shape) != tuple(mod.weight.shape):
                        raise EvaluationError(
                            f"{name}: update {tuple(delta.shape)} does not fit the base "
                            f"weight {tuple(mod.weight.shape)}"
                        )
                    saved.append((mod, mod.weight.detach().clone()))
                    mod.weight += delta.to(mod.weight.dtype)
            yield
        finally:
            with torch.no_grad():
                for mod, original in saved:
                    mod.weight.copy_(original)

    @torch.no_grad()
    def logits(self, task: Task, deltas: Deltas, batch: int = 128) -> torch.Tensor:
        clf = self.classifier(task)
        with self.applied(deltas):
            out = [clf(task.images[i : i + batch]) for i in range(0, len(task.images), batch)]
        return torch.cat(out).float()

    def metrics(self, task: Task, deltas: Deltas) -> dict[str, Any]:
        probs = torch.softmax(self.logits(task, deltas), dim=-1)
        return classification_metrics(task.labels, probs)
