"""Classification metrics shared by the trainer and the merger: accuracy, macro-F1 and ROC-AUC
(one-vs-rest, macro-averaged, beyond two classes). Written against torch so that neither image
needs scikit-learn; tests compare them with hand-computed values."""

from __future__ import annotations

import torch


def accuracy(labels: torch.Tensor, preds: torch.Tensor) -> float:
    return float((labels == preds).double().mean()) if labels.numel() else 0.0


def macro_f1(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> float:
    """F1 per class, averaged over the classes present in the labels or the predictions (a class
    with no support and no prediction says nothing about the model)."""
    scores = []
    for c in range(num_classes):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def binary_auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Mann-Whitney form of the ROC-AUC with average ranks for ties; None without both
    positives and negatives."""
    n_pos = int(positive.sum())
    n_neg = int(positive.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    s = scores.double()
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    # Average rank over each run of tied scores.
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    rank_sum = float(ranks[positive.bool()].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_auc(labels: torch.Tensor, probs: torch.Tensor) -> float | None:
    """Binary: AUC of class 1's probability. More classes: mean one-vs-rest AUC over the classes
    that have both positives and negatives."""
    if probs.shape[1] == 2:
        return binary_auc(probs[:, 1], labels == 1)
    aucs = [binary_auc(probs[:, c], labels == c) for c in range(probs.shape[1])]
    valid = [a for a in aucs if a is not None]
    return sum(valid) / len(valid) if valid else None


def classification_metrics(labels: torch.Tensor, probs: torch.Tensor) -> dict[str, float | int]:
    """accuracy, f1 (macro), auc and samples for class probabilities `probs` (n x classes)."""
    preds = probs.argmax(dim=1)
    out: dict[str, float | int] = {
        "accuracy": round(accuracy(labels, preds), 6),
        "f1": round(macro_f1(labels, preds, probs.shape[1]), 6),
        "samples": int(labels.numel()),
    }
    auc = roc_auc(labels, probs)
    if auc is not None:
        out["auc"] = round(auc, 6)
    return out


def per_class_recall(
    labels: torch.Tensor, preds: torch.Tensor, classes: list[str]
) -> dict[str, float]:
    """Recall (sensitivity) of each class present in the labels, by class name."""
    out: dict[str, float] = {}
    for c, name in enumerate(classes):
        support = int((labels == c).sum())
        if support:
            out[name] = round(int(((preds == c) & (labels == c)).sum()) / support, 6)
    return out
