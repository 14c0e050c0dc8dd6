"""Classification metrics against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from medforge_ml.metrics import binary_auc, classification_metrics, macro_f1, roc_auc


def test_binary_auc_textbook_example_and_ties() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    # Pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4): 3 of 4.
    assert binary_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), labels == 1) == pytest.approx(0.75)
    # Every pair tied counts one half.
    assert binary_auc(torch.full((4,), 0.5), labels == 1) == pytest.approx(0.5)
    # One tied pair among four: (0.4 vs 0.4) counts 0.5 -> 3.5 / 4.
    assert binary_auc(torch.tensor([0.1, 0.4, 0.4, 0.8]), labels == 1) == pytest.approx(0.875)
    assert binary_auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])) is None


def test_macro_f1_and_one_vs_rest_auc() -> None:
    labels = torch.tensor([0, 0, 1, 2])
    preds = torch.tensor([0, 1, 1, 2])
    # class 0: 2/3, class 1: 2/3, class 2: 1.
    assert macro_f1(labels, preds, 3) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # A class absent from labels and predictions does not count.
    assert macro_f1(labels, preds, 4) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7]])
    # class 0 scores rank both positives above both negatives: 1; class 1: positive 0.6 beats
    # 0.2, 0.2 and ties none (0.5 is below): 1; class 2: 0.7 above 0.1, 0.1, 0.2: 1.
    assert roc_auc(labels, probs) == pytest.approx(1.0)
    m = classification_metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(0.75) and m["samples"] == 4
    assert m["f1"] == pytest.approx(0.777778, abs=1e-6) and m["auc"] == pytest.approx(1.0)
