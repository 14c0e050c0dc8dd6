"""Everything in a merge that needs torch and the base model: the searched strategies (fusion,
fusion-exact, mixture), the composite's scores on each task's distilled set (and any evaluation
set given), and the task bundle a composite carries. `medforge-merge` imports this module only
when the job gives a base model or asks for a searched strategy, so an exact merge never loads
torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medforge_common.artifacts import ADAPTER_FILE, MIXTURE_FILE, TASKS_FILE
from medforge_common.manifest import sha256_file
from medforge_merger.adapters import SUFFIX_A, SUFFIX_B, Adapter, InputRejected
from medforge_merger.evaluate import Deltas, EvaluationError, Evaluator
from medforge_merger.mixture import OBJECTIVE, Mixture
from medforge_merger.search import (
    FactorMap,
    FusionStep,
    SearchSettings,
    adapter_probs,
    dense,
    fusion,
    mixture,
    search_scale,
)
from medforge_merger.strategies import Factors, MergeError
from medforge_merger.tasks import Task, from_contribution, load_bundle, save_bundle
from medforge_ml.basemodel import fetch_model_dir
from medforge_ml.composite import file_deltas
from medforge_ml.errors import ModelError
from medforge_ml.metrics import classification_metrics
from medforge_ml.transfers import StoreError

JSON = dict[str, Any]
# The trainer distils at most 1,000 images per class (the CRD's bound); a set beyond that is not
# one it made.
MAX_DISTILLED_PER_CLASS = 1000


class ScoringFailed(MergeError):
    """A revision that cannot be scored or searched; the message says why."""


def factor_map(ad: Adapter) -> FactorMap:
    """An adapter's factors as torch tensors (the exact path reads them as numpy)."""
    out = {}
    for m in sorted(ad.shapes):
        f = ad.factors(m)
        out[m] = Factors(torch.from_numpy(f.B), torch.from_numpy(f.A))
    return out


def composite_deltas(path: Path) -> Deltas:
    """Dense updates of a composite written by the exact strategies (factors or deltas): the
    same reading `medforge predict` does."""
    return file_deltas(path)


def _round(m: JSON) -> JSON:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}


def _steps(steps: list[FusionStep]) -> list[JSON]:
    return [{"a": round(x.a, 6), "b": round(x.b, 6), "loss": round(x.loss, 6)} for x in steps]


@dataclass
class Scored:
    """What the torch side adds to a revision."""

    files: list[Path] = field(default_factory=list)
    coefficients: list[float] | None = None  # per new input, for the searched strategies
    rank: int = 0
    meta: JSON = field(default_factory=dict)
    metrics: JSON = field(default_factory=dict)


class Scorer:
    def __init__(self, base: JSON, base_digest: str, work: Path, fetch: Any) -> None:
        self.ev: Evaluator | None = None
        self.fetch = fetch
        if base.get("files") or base.get("path"):
            try:
                directory = fetch_model_dir(
                    base_digest, list(base.get("files") or []), base.get("path"), work / "base"
                )
                self.ev = Evaluator(directory)
            except StoreError:
                raise  # the store's fault, not the base model's: retried
            except ModelError as exc:  # the shared loader names what is wrong
                raise ScoringFailed(str(exc)) from exc
        self.tasks: list[Task] = []
        self.current_mixture: Mixture | None = None
        self.mix: Mixture | None = None  # the new revision, for mixture
        self.deltas: Deltas = {}  # the new revision's updates, for the other strategies

    def snapshot(self) -> tuple[list[Task], Mixture | None, Deltas]:
        """The state a merge changes (tasks collected, the new revision's updates), so that the
        gate's extra merges each start from the same place."""
        return list(self.tasks), self.mix, self.deltas

    def restore(self, state: tuple[list[Task], Mixture | None, Deltas]) -> None:
        self.tasks, self.mix, self.deltas = list(state[0]), state[1], state[2]

    def load_current(self, directory: Path) -> None:
        if (directory / TASKS_FILE).is_file():
            self.tasks = load_bundle(directory / TASKS_FILE)
        if (directory / MIXTURE_FILE).is_file():
            self.current_mixture = Mixture.load(directory / MIXTURE_FILE)

    def screen(self, ad: Adapter, taken: set[str]) -> None:
        """Everything one input brings that could break the merge, checked alone before any
        merge (InputRejected names what): each update against the base model's layer, and the
        distilled set and head against its task, the base model's image size, and a score of
        the input on its own set. `taken` holds the task names in use: a second hospital with
        the same task gets `<task>@<namespace/name>`, so that sets, heads and scores never mix."""
        if self.ev is not None:
            for m, (d, r, k) in sorted(ad.shapes.items()):
                try:
                    self.ev.check_update(m, (d, k))
                except EvaluationError as exc:
                    raise InputRejected(f"target module {exc}") from exc
                if r > min(d, k):
                    raise InputRejected(f"{m}: rank {r} exceeds the layer's {d} x {k}")
        try:
            t = from_contribution(ad.path.parent, ad.meta)
            if t is not None:
                if t.name in taken:
                    t.name = f"{t.name}@{ad.key}"
                self._check_task(t)
                if self.ev is not None:
                    t.solo = _round(self.ev.metrics(t, dense(factor_map(ad))))
        except Exception as exc:  # whatever the set does, a verdict on its owner
            raise InputRejected(f"its distilled set cannot be used ({exc})") from exc
        if t is not None:
            taken.add(t.name)
        ad.distilled, ad.screened = t, True

    def _check_task(self, t: Task) -> None:
        n = len(t.classes)
        size = self.ev.image_size if self.ev is not None else None
        if t.images.ndim != 4 or t.images.shape[1] != 3 or len(t.images) != len(t.labels):
            raise ScoringFailed("images must be n x 3 x H x W with one label each")
        if size is not None and tuple(t.images.shape[2:]) != (size, size):
            raise ScoringFailed(
                f"images are {t.images.shape[2]} x {t.images.shape[3]}, the base model "
                f"takes {size} x {size}"
            )
        if n < 2 or len(t.labels) == 0 or int(t.labels.min()) < 0 or int(t.labels.max()) >= n:
            raise ScoringFailed(f"labels must index the {n} classes of its manifest")
        if len(t.labels) > MAX_DISTILLED_PER_CLASS * n:
            raise ScoringFailed(
                f"{len(t.labels)} images, more than {MAX_DISTILLED_PER_CLASS} per class"
            )
        if not torch.isfinite(t.images).all():
            raise ScoringFailed("images hold NaN or Inf")
        if self.ev is not None:
            self.ev.classifier(t)  # the head is built (and a linear head loaded) here

    def new_tasks(self, adapters: list[Adapter]) -> list[Task | None]:
        """Each input's task, as screened (inputs are screened once, before any merge)."""
        taken = {t.name for t in self.tasks}
        for ad in adapters:
            if not ad.screened:
                self.screen(ad, taken)
        return [ad.distilled for ad in adapters]

    def searched(
        self,
        kind: str,
        current: Adapter | None,
        adapters: list[tuple[Adapter, str]],
        search: SearchSettings,
        work: Path,
    ) -> Scored:
        ev = self.ev
        if ev is None:
            raise ScoringFailed(
                f"strategy {kind} searches on the base model: baseModel.files is empty"
            )
        new = self.new_tasks([a for a, _ in adapters])
        out = Scored()
        if kind == "mixture":
            self.tasks += [t for t in new if t is not None]
            if not self.tasks:
                raise ScoringFailed("mixture needs at least one distilled set to search on")
            cur = self.current_mixture
            maps = (cur.adapters if cur else []) + [factor_map(a) for a, _ in adapters]
            sources = (cur.sources if cur else []) + [name for _, name in adapters]
            q = [adapter_probs(ev, dense(f), self.tasks) for f in maps]
            start = cur.coefficients if cur and cur.objective == OBJECTIVE else []
            if cur and not start:
                print("the current mixture was searched under an older objective: all weights anew")
            weights, steps = mixture(q, start, self.tasks, search, len(start))
            self.mix = Mixture(maps, weights, sources)
            self.mix.save(work / MIXTURE_FILE)
            out.files.append(work / MIXTURE_FILE)
            out.coefficients = weights[len(start) :]
            out.meta = {"coefficients": [round(w, 6) for w in weights], "sources": sources}
        else:
            arrivals = [(factor_map(a), t) for (a, _), t in zip(adapters, new, strict=True)]
            if current is not None:
                theta = factor_map(current)
            else:
                theta, first_task = arrivals.pop(0)
                if first_task is not None:
                    self.tasks.append(first_task)
            theta, steps = fusion(ev, theta, arrivals, self.tasks, search, kind == "fusion-exact")
            # Each input's effective weight on its own update (exact for fusion-exact).
            weights = [] if current is not None else [1.0]
            for st in steps:
                weights = [st.a * w for w in weights] + [st.b]
            out.coefficients = weights
            tensors = {}
            for m, f in theta.items():
                tensors[m + SUFFIX_A] = f.A.contiguous()
                tensors[m + SUFFIX_B] = f.B.contiguous()
                out.rank = max(out.rank, f.rank)
            save_file(
                tensors,
                str(work / ADAPTER_FILE),
                metadata={"format": "medforge-composite", "strategy": kind},
            )
            out.files.append(work / ADAPTER_FILE)
            self.deltas = dense(theta)
        out.meta["steps"] = _steps(steps)
        return out

    def search_scale(self, search: SearchSettings) -> float:
        """The scale of a subspace merge that minimises the mean cross-entropy over every task's
        distilled set; the composite's updates (at scale 1) are scaled to it."""
        ev = self.ev
        if ev is None or not self.tasks:
            return 1.0
        base = self.deltas

        def loss(alpha: float) -> float:
            scaled = {m: alpha * d for m, d in base.items()}
            return sum(
                float(torch.nn.functional.cross_entropy(ev.logits(t, scaled), t.labels))
                for t in self.tasks
            ) / len(self.tasks)

        alpha, value = search_scale(loss, search)
        print(
            f"scale {alpha:.4f} (mean cross-entropy {value:.4f} on the distilled sets)", flush=True
        )
        self.deltas = {m: alpha * d for m, d in base.items()}
        return alpha

    def exact(self, adapters: list[Adapter], composite: Path) -> None:
        """After an exact merge: collect the tasks, and the composite's updates for scoring."""
        self.tasks += [t for t in self.new_tasks(adapters) if t is not None]
        if self.ev is not None and self.tasks:
            self.deltas = composite_deltas(composite)

    def _score(self, task: Task) -> JSON:
        if self.ev is None:
            raise RuntimeError("scoring without a base model")  # callers check self.ev first
        if self.mix is not None:
            return classification_metrics(task.labels, self.mix.probabilities(self.ev, task))
        return self.ev.metrics(task, self.deltas)

    def metrics(self, evaluation: list[JSON], work: Path) -> JSON:
        """Per task: the composite's scores on its distilled set, its solo score, and the scores
        on any evaluation set given."""
        if self.ev is None:
            return {}
        out: JSON = {}
        for t in self.tasks:
            out[t.name] = (
                _round(self._score(t))
                | {"classes": len(t.classes)}  # the gate's minimum set size is per class
                | ({"solo": t.solo["accuracy"]} if "accuracy" in t.solo else {})
            )
        for i, spec in enumerate(evaluation):
            task = next((t for t in self.tasks if t.name == spec.get("task")), None)
            if task is None:
                raise ScoringFailed(
                    f"evaluation[{i}].task: {spec.get('task')!r} is not among the merged tasks"
                )
            out[task.name]["evaluation"] = _round(
                self._score(self._evaluation_task(spec, task, work / f"evaluation-{i}"))
            )
        return out

    def _evaluation_task(self, spec: JSON, task: Task, d: Path) -> Task:
        """An evaluation set: a safetensors file in the distilled sets' format (`images`
        normalised for the base model, `labels`), scored with `task`'s head."""
        files = spec.get("files") or []
        if len(files) != 1 or not str(files[0].get("name", "")).endswith(".safetensors"):
            raise ScoringFailed(f"evaluation for {task.name}: give exactly one .safetensors file")
        d.mkdir()
        self.fetch(files[0], d)
        path = d / files[0]["name"]
        if "sha256" in files[0] and sha256_file(path)[0] != files[0]["sha256"]:
            raise ScoringFailed(
                f"evaluation for {task.name}: {path.name} does not match its sha256"
            )
        with safe_open(str(path), framework="pt") as f:
            images, labels = f.get_tensor("images").float(), f.get_tensor("labels").long()
        return Task(task.name, task.classes, task.head, images, labels, task.head_weights)

    def save_tasks(self, work: Path) -> Path | None:
        if not self.tasks:
            return None
        save_bundle(self.tasks, work / TASKS_FILE)
        return work / TASKS_FILE
