"""Held-out greedy accuracy, graded by the same verifier as the training reward."""

from __future__ import annotations

from frugal.rewards.functions import correctness
from frugal.train.rollout import GenerationConfig, generate


def greedy_accuracy(model, tokenizer, rows: list[dict], gen_cfg: GenerationConfig, answer_format: str,
                    limit: int | None = None) -> tuple[float, list[dict]]:
    """Greedy-decode every held-out prompt once; return accuracy and per-problem records."""
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ValueError("the held-out split is empty: nothing to evaluate (check task.n_test / task.max_test)")
    rollout = generate(model, tokenizer, [r["prompt"] for r in rows], gen_cfg, num_samples=1, greedy=True)
    scores = correctness([r["prompt"] for r in rows], rollout.texts, answer=[r["answer"] for r in rows],
                         answer_format=answer_format)
    records = [
        {"id": r["id"], "question": r["question"], "answer": r["answer"], "completion": text, "correct": bool(s)}
        for r, text, s in zip(rows, rollout.texts, scores)
    ]
    accuracy = sum(1.0 for s in scores if s) / len(rows)
    return accuracy, records
