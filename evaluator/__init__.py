"""Compute-accounted evaluation: one generation engine, PRM-guided search strategies, a harness.

See :mod:`frugal.inference.engine` (generation + token accounting), :mod:`frugal.evaluator.flops`,
:mod:`frugal.evaluator.strategies` and :mod:`frugal.evaluator.harness` (``frugal eval``).
"""
