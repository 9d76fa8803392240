"""Splitting a solution into its reasoning steps (what PRMs score and engines stop at)."""

from __future__ import annotations


def split_steps(text: str, separator: str) -> list[str]:
    """Split a (possibly unfinished) solution into steps. A trailing piece without a separator after it
    is an unfinished step and is kept; empty pieces (text ending in the separator, blank steps) are not."""
    return [s.strip() for s in text.split(separator) if s.strip()]
