"""Reward functions for tests on the random tiny model, whose answers are never right: these vary across
samples, so advantages and losses are non-trivial. Plain TRL signature, loaded by import path."""


def share_of_letter_e(prompts, completions, **columns):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [t.lower().count("e") / max(len(t), 1) for t in texts]
