"""Answer extraction, verification (math-verify) and reward functions with TRL's signature."""
