"""MedForge-Fusion and MedForge-Mixture: coefficients found by a gradient-free search (nevergrad
NGOpt) that minimises cross-entropy on the distilled sets of the tasks merged so far, plus an L1
penalty on the coefficients.

- fusion (as published): theta <- a*theta + b*phi for every lora_A and lora_B tensor. The update
  is then (aB1 + bB2)(aA1 + bA2), which carries the cross terms a*b*(B1 A2 + B2 A1).
- fusion-exact: the same search over a*dW_theta + b*dW_phi, kept exactly as stacked factors
  ([aB1 | bB2] and [A1; A2]): no cross terms, the rank grows with each step.
- mixture: output level, s <- a*s + b*q_new, where q_j are the class probabilities of the model
  with adapter j alone; only the newest pair is searched, on all tasks so far. As published, the
  weighted sum s is scored as logits (cross-entropy of softmax(s)) and the L1 penalty covers every
  adapter's resulting weight, so that the scale of the weights matters: a normalised mixture
  would be blind to it and the penalty would only shrink all weights towards zero.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medforge_merger.evaluate import Deltas, Evaluator
from medforge_merger.strategies import Factors, MergeError
from medforge_merger.tasks import Task

FactorMap = dict[str, Factors]  # module -> (B with the scale folded in, A)


@dataclass(frozen=True)
class SearchSettings:
    budget: int = 40
    l1: float = 0.05
    seed: int = 0
    init: float = 0.5
    bound: float = 1.5


def _minimize(param: Any, objective: Callable[[Any], float], budget: int) -> Any:
    """NGOpt over `param` (seeded by the caller), its helper threads stopped afterwards."""
    import nevergrad as ng

    # NGOpt's COBYLA stage warns about its own default tolerance on every call.
    warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")
    # At large budgets its CMA stage reports every suggested point it did not use.
    warnings.filterwarnings("ignore", message="orphanated injected solution")
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    before = set(threading.enumerate())
    try:
        return opt.minimize(objective).value
    finally:
        _stop_search_threads(before)


def search_pair(
    loss: Callable[[float, float], float],
    s: SearchSettings,
    step: int,
    penalised: Callable[[float, float], list[float]] | None = None,
) -> tuple[float, float, float]:
    """(a, b, loss) minimising loss(a, b) + l1 * mean(|w|) with NGOpt, seeded per step, where
    w are the weights `penalised(a, b)` (by default a and b themselves)."""
    import nevergrad as ng

    param = ng.p.Array(init=np.array([s.init, s.init])).set_bounds(-s.bound, s.bound)
    param.random_state.seed(s.seed + step)

    def objective(x: np.ndarray) -> float:
        a, b = float(x[0]), float(x[1])
        w = penalised(a, b) if penalised else [a, b]
        value = loss(a, b) + s.l1 * sum(abs(v) for v in w) / len(w)
        return value if math.isfinite(value) else 1e9

    a, b = (float(v) for v in _minimize(param, objective, s.budget))
    return a, b, objective(np.array([a, b]))


def search_scale(loss: Callable[[float], float], s: SearchSettings) -> tuple[float, float]:
    """(alpha, loss) minimising loss(alpha) over [0, 2 * bound] with NGOpt, seeded: the one
    scale of a subspace merge (iso-c, iso-cts, tsv, knots-ties), on the distilled sets."""
    import nevergrad as ng

    param = ng.p.Scalar(init=1.0).set_bounds(0.0, 2 * s.bound)
    param.random_state.seed(s.seed)

    def objective(x: float) -> float:
        value = loss(float(x))
        return value if math.isfinite(value) else 1e9

    alpha = float(_minimize(param, objective, s.budget))
    return alpha, objective(alpha)


def _stop_search_threads(before: set[threading.Thread]) -> None:
    """nevergrad runs some of NGOpt's optimisers (COBYLA, Powell) in a thread that waits for its
    next point. One left waiting by a failed search is not a daemon and would keep the merge
    process from ever exiting (its Job would run until the deadline): tell it to finish."""
    for t in set(threading.enumerate()) - before:
        stop = getattr(t, "stop", None)
        if callable(stop) and hasattr(t, "messages_tell"):
            stop()
            t.join(timeout=5)


def dense(f: FactorMap) -> Deltas:
    return {m: x.B @ x.A for m, x in f.items()}


def combine(theta: FactorMap, phi: FactorMap, a: float, b: float, exact: bool) -> FactorMap:
    out: FactorMap = {}
    for m in sorted(set(theta) | set(phi)):
        t, p = theta.get(m), phi.get(m)
        if t is None or p is None:  # a module only one side adapts: the other adds nothing
            one, w = (t, a) if t is not None else (p, b)
            if one is None:
                continue  # unreachable: m comes from one of the two maps
            out[m] = Factors(one.B * w, one.A) if exact else Factors(one.B * w, one.A * w)
            continue
        if exact:
            out[m] = Factors(torch.cat([a * t.B, b * p.B], dim=1), torch.cat([t.A, p.A], dim=0))
        else:
            if t.A.shape != p.A.shape:
                raise MergeError(
                    f"fusion combines lora_A and lora_B tensors directly, so {m} needs the same "
                    f"rank in every adapter (got {t.A.shape[0]} and {p.A.shape[0]}); "
                    "use fusion-exact for adapters of different ranks"
                )
            out[m] = Factors(a * t.B + b * p.B, a * t.A + b * p.A)
    return out


def task_loss(ev: Evaluator, tasks: Sequence[Task], deltas: Deltas) -> float:
    losses = [float(nn.functional.cross_entropy(ev.logits(t, deltas), t.labels)) for t in tasks]
    return sum(losses) / len(losses)


@dataclass
class FusionStep:
    a: float
    b: float
    loss: float


def fusion(
    ev: Evaluator,
    theta: FactorMap,
    arrivals: Sequence[tuple[FactorMap, Task | None]],
    tasks_so_far: list[Task],
    s: SearchSettings,
    exact: bool,
    log: Callable[[str], None] = print,
) -> tuple[FactorMap, list[FusionStep]]:
    """Fold each arriving adapter into theta; the tasks list grows as tasks arrive."""
    steps = []
    for i, (phi, task) in enumerate(arrivals):
        if task is not None:
            tasks_so_far.append(task)
        if not tasks_so_far:
            raise MergeError("fusion needs at least one distilled set to search on")

        def loss(a: float, b: float, theta: FactorMap = theta, phi: FactorMap = phi) -> float:
            return task_loss(ev, tasks_so_far, dense(combine(theta, phi, a, b, exact)))

        a, b, value = search_pair(loss, s, i)
        log(
            f"fusion step {i + 1}: a={a:.4f} b={b:.4f} loss={value:.4f} on {len(tasks_so_far)} task(s)"
        )
        theta = combine(theta, phi, a, b, exact)
        steps.append(FusionStep(a, b, value))
    return theta, steps


def mixture_logits(
    q: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], task: str
) -> torch.Tensor:
    """sum_j w_j * q_j for `task`'s images: the mixture's scores, one per class."""
    return sum(
        (w * qj[task] for w, qj in zip(weights, q, strict=True)), torch.zeros_like(q[0][task])
    )


def mixture_probs(
    q: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], task: str
) -> torch.Tensor:
    return torch.softmax(mixture_logits(q, weights, task), dim=-1)


def mixture(
    q: list[dict[str, torch.Tensor]],
    weights: list[float],
    tasks: Sequence[Task],
    s: SearchSettings,
    first_step: int,
    log: Callable[[str], None] = print,
) -> tuple[list[float], list[FusionStep]]:
    """Extend `weights` (for q[:len(weights)]) to every adapter in q, one searched pair per new
    adapter. With no weights yet, the first pair (a0, b0) covers the first two adapters."""
    steps = []
    weights = list(weights)
    if not weights:
        if len(q) == 1:
            return [1.0], []
        weights = [1.0]
    for j in range(len(weights), len(q)):

        def resulting(a: float, b: float, prev: list[float] = weights) -> list[float]:
            return [a * x for x in prev] + [b]

        def loss(a: float, b: float, j: int = j) -> float:
            w = resulting(a, b)
            total = 0.0
            for t in tasks:
                logits = mixture_logits(q[: j + 1], w, t.name)
                total += float(nn.functional.cross_entropy(logits, t.labels))
            return total / len(tasks)

        a, b, value = search_pair(loss, s, first_step + j, resulting)
        log(f"mixture step {j}: a={a:.4f} b={b:.4f} loss={value:.4f}")
        weights = resulting(a, b)
        steps.append(FusionStep(a, b, value))
    return weights, steps


@torch.no_grad()
def adapter_probs(ev: Evaluator, deltas: Deltas, tasks: Sequence[Task]) -> dict[str, torch.Tensor]:
    return {t.name: torch.softmax(ev.logits(t, deltas), dim=-1) for t in tasks}
