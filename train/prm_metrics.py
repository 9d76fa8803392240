"""PRM metrics: step AUROC and ProcessBench's first-error F1 (the training recipe's held-out evaluation
and ``scripts/bench_prm.py``)."""

from __future__ import annotations

from typing import Sequence


def auroc(scores: Sequence[float], labels: Sequence[float]) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties
    counting ½ (the Mann–Whitney U statistic over n₊·n₋). Labels are binarised at 0.5; NaN when one class
    is absent."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64) >= 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def first_error_index(values: Sequence[float], threshold: float = 0.5) -> int:
    """Index of the earliest step below ``threshold`` (a label or a PRM score); -1 when there is none."""
    for i, v in enumerate(values):
        if v < threshold:
            return i
    return -1


def step_metrics(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[float]], threshold: float = 0.5) -> dict:
    """Step accuracy, step AUROC and ProcessBench's first-error F1 (Zheng et al. 2024, "ProcessBench"):
    per solution the prediction is the earliest step scored below ``threshold`` or "none"; ``acc_error``
    is exact-match accuracy on solutions that contain an error, ``acc_correct`` on those that do not,
    and F1 is their harmonic mean."""
    flat_s = [x for row in scores for x in row]
    flat_y = [y for row in labels for y in row]
    if len(flat_s) != len(flat_y):
        raise ValueError(f"step_metrics: {len(flat_s)} scores for {len(flat_y)} labels")
    acc = sum((s >= threshold) == (y >= 0.5) for s, y in zip(flat_s, flat_y)) / max(len(flat_s), 1)
    err_hits, err_n, ok_hits, ok_n = 0, 0, 0, 0
    for s_row, y_row in zip(scores, labels):
        gold, pred = first_error_index(y_row), first_error_index(s_row, threshold)
        if gold >= 0:
            err_n += 1
            err_hits += pred == gold
        else:
            ok_n += 1
            ok_hits += pred == -1
    acc_err = err_hits / err_n if err_n else float("nan")
    acc_ok = ok_hits / ok_n if ok_n else float("nan")
    f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok > 0 else 0.0
    return {"step_accuracy": acc, "step_auroc": auroc(flat_s, flat_y), "first_error_acc_error": acc_err,
            "first_error_acc_correct": acc_ok, "first_error_f1": f1, "steps": len(flat_s)}
