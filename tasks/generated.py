"""Generated tasks: integer arithmetic (the CPU demo task) and multi-digit multiplication (T-SPMO's second
benchmark). Both come with step-by-step reference solutions, which the PRM work uses for exact labels."""

from __future__ import annotations

import itertools
import random

from frugal.tasks.config import TaskConfig
from frugal.tasks.rows import TaskData, in_test_split, make_row

MAX_ENUMERATED = 50_000  # problem spaces up to this size are enumerated, larger ones sampled


def _operand_range(digits: int) -> range:
    return range(0, 10) if digits == 1 else range(10 ** (digits - 1), 10**digits)


def arith_steps(operands: list[int], ops: list[str]) -> tuple[list[str], int]:
    """Reference steps: multiplications first, then left to right, one binary operation per step."""
    values, pending, steps = list(operands), list(ops), []
    while "*" in pending:
        i = pending.index("*")
        result = values[i] * values[i + 1]
        steps.append(f"{values[i]} * {values[i + 1]} = {result}")
        values[i:i + 2], pending[i:i + 1] = [result], []
    total = values[0]
    for op, value in zip(pending, values[1:]):
        new = total + value if op == "+" else total - value
        steps.append(f"{total} {op} {value} = {new}")
        total = new
    return steps, total


def multiplication_steps(a: int, b: int) -> tuple[list[str], int]:
    """Long multiplication: one partial product per non-zero digit of ``b``, then their sum."""
    partials, steps = [], []
    for place, digit in enumerate(reversed(str(b))):
        if digit == "0":
            continue
        factor = int(digit) * 10**place
        partials.append(a * factor)
        steps.append(f"{a} * {factor} = {a * factor}")
    if len(partials) > 1:
        steps.append(" + ".join(map(str, partials)) + f" = {sum(partials)}")
    if not partials:
        steps.append(f"{a} * {b} = 0")
    return steps, a * b


def _split_problems(problems, cfg: TaskConfig, total_space: int, sample) -> TaskData:
    """Split by a hash of the question text (fixed across seeds) and cap at n_train / n_test."""
    train, test, seen = [], [], set()

    def add(problem) -> None:
        question = problem[0]
        if question in seen:
            return
        seen.add(question)
        bucket = test if in_test_split(question, cfg.test_fraction) else train
        cap = cfg.n_test if bucket is test else cfg.n_train
        if len(bucket) < cap:
            bucket.append(problem)

    if total_space <= MAX_ENUMERATED:
        everything = list(problems())
        random.Random(cfg.seed).shuffle(everything)
        for problem in everything:
            add(problem)
    else:
        rng = random.Random(cfg.seed)
        for _ in range(20 * (cfg.n_train + cfg.n_test) + 1000):
            if len(train) >= cfg.n_train and len(test) >= cfg.n_test:
                break
            add(sample(rng))
    rows = lambda items: [make_row(f"{cfg.name}:{q}", q, ans, cfg.prompt, steps) for q, ans, steps in items]  # noqa: E731
    return TaskData(rows(train), rows(test), info={"problem_space": total_space})


def arith(cfg: TaskConfig) -> TaskData:
    values = _operand_range(cfg.digits)
    k = cfg.num_operands

    def problem(operands, ops):
        question = "What is " + " ".join(
            itertools.chain([str(operands[0])], *[(op, str(v)) for op, v in zip(ops, operands[1:])])) + "?"
        steps, answer = arith_steps(list(operands), list(ops))
        return question, answer, steps

    def problems():
        for operands in itertools.product(values, repeat=k):
            for ops in itertools.product(cfg.ops, repeat=k - 1):
                yield problem(operands, ops)

    def sample(rng):
        return problem([rng.choice(values) for _ in range(k)], [rng.choice(cfg.ops) for _ in range(k - 1)])

    return _split_problems(problems, cfg, len(values) ** k * len(cfg.ops) ** (k - 1), sample)


def multiply(cfg: TaskConfig) -> TaskData:
    range_a, range_b = _operand_range(cfg.digits), _operand_range(cfg.digits_b)

    def problem(a, b):
        steps, answer = multiplication_steps(a, b)
        return f"What is {a} * {b}?", answer, steps

    def problems():
        for a in range_a:
            for b in range_b:
                yield problem(a, b)

    def sample(rng):
        return problem(rng.choice(range_a), rng.choice(range_b))

    return _split_problems(problems, cfg, len(range_a) * len(range_b), sample)
