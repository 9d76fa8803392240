"""Compute-accounted evaluation: one generation engine, PRM-guided search strategies, a harness.

See :mod:`evaluator.engine` (generation + token accounting), :mod:`evaluator.flops`,
:mod:`evaluator.strategies` and :mod:`evaluator.harness` (``frugal eval``).
"""
