"""Persistent per-candidate KV cache of the ``hf`` engine: a radix tree of token segments per prompt.

A candidate's KV is keyed by its exact token ids: the prompt's last token followed by ``Candidate.ids``
(the prompt's other tokens live in the engine's prompt store). Each node of a prompt's tree holds one
segment of tokens and that segment's per-layer keys and values (``[1, heads, len, head_dim]``); the KV of
a sequence is the concatenation of the segments on its root-to-node path, ending anywhere inside the last
node (attention is causal, so the KV of a prefix is the prefix of the KV). This is the radix tree of
SGLang's RadixAttention (Zheng et al. 2024, "SGLang: Efficient Execution of Structured Language Model
Programs"), at segment granularity rather than vLLM's fixed-size blocks.

Sharing on fork: reference-counted, immutable segments (not copy-on-write). A beam's children, a
resampled particle's duplicates and SSR's paths have the same ids as their parent, so they find the
parent's nodes; what each then generates becomes a child node of its own, and the parent's segment is
stored once however many descendants use it (Python's references count them; a segment lives while its
node is in the tree). Why not copy-on-write: every candidate is an immutable value to the strategies
(``Engine.extend`` returns new objects, strategies copy and fork freely and keep old ones as histories),
so there is no owner whose in-place append could trigger the copy; a node is never written after it is
made, except split in two (views of its tensors) when a sequence leaves it in the middle.

Bound: ``capacity`` tokens over all trees (``engine.kv_cache_tokens``). After each call the least recently
used leaves are dropped until the store fits (a path's nodes are touched together, deepest last, so a
leaf goes before its parent). A dropped leaf stays as a ghost (its ids, no KV, not counted against the
bound), so that when a candidate comes back the store knows how many of the tokens it must prefill again it
had held before: the engine counts those as ``Counts.reprefill`` (they are in ``prefill`` too).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each [1, heads, tokens, head_dim]


class Node:
    """One segment: ``ids`` and their ``kv`` (None at a root and at a ghost: an evicted segment), under
    ``parent``; children by first token (a ghost's children are ghosts)."""

    __slots__ = ("ids", "kv", "parent", "children", "used")

    def __init__(self, ids: list[int], kv: Optional[KV], parent: Optional["Node"], used: int = 0):
        self.ids, self.kv, self.parent, self.used = ids, kv, parent, used
        self.children: dict[int, Node] = {}


class KVTree:
    """Stored KV of token sequences, one radix tree per prompt, at most ``capacity`` tokens in all."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.roots: dict[str, Node] = {}
        self.tokens = 0  # tokens stored (every node's segment)
        self.evicted = 0  # tokens dropped to stay within capacity
        self._tick = 0

    def clear(self) -> None:
        self.roots.clear()
        self.tokens = 0

    def match(self, prompt: str, seq: Sequence[int], limit: int) -> tuple[int, Optional[KV], int]:
        """The longest stored prefix of ``seq`` (at most ``limit`` tokens), its KV (None when empty) and
        how many tokens after it (up to ``limit``) were stored once and evicted (ghosts); the nodes it runs
        through count as used now."""
        self._tick += 1
        node, at, parts = self.roots.get(prompt), 0, []
        while node is not None and at < limit:
            child = node.children.get(seq[at])
            if child is None:
                break
            n = _common(child.ids, seq, at, limit)
            if child.kv is None:  # evicted: measure how far the evicted part reaches
                lost = 0
                while child is not None and child.kv is None:
                    n = _common(child.ids, seq, at + lost, limit)
                    lost += n
                    if n < len(child.ids) or at + lost >= limit:
                        break
                    child = child.children.get(seq[at + lost])
                return at, _concat(parts), lost
            child.used = self._tick
            parts.append([(k[:, :, :n], v[:, :, :n]) for k, v in child.kv] if n < len(child.ids) else child.kv)
            at += n
            if n < len(child.ids):
                break
            node = child
        return at, _concat(parts), 0

    def insert(self, prompt: str, seq: Sequence[int], start: int, kv: KV) -> None:
        """Store ``kv``, the KV of ``seq[start:]`` (``seq[:start]`` must be stored already); the part of
        it that is stored already (a fork's twin inserted it first) is skipped."""
        self._tick += 1
        node = self.roots.setdefault(prompt, Node([], None, None))
        at = 0
        while at < len(seq):
            child = node.children.get(seq[at])
            if child is not None and child.kv is None:  # a ghost: replaced by the new KV
                del node.children[seq[at]]
                child = None
            if child is None:
                break
            n = _common(child.ids, seq, at, len(seq))
            child.used = self._tick
            if n < len(child.ids):
                if at + n == len(seq):
                    return  # all of seq is stored (inside this node)
                child = self._split(child, n)
            at += n
            node = child
        if at >= len(seq):
            return
        if at < start:
            raise ValueError(f"KVTree.insert: {start} tokens should be stored before the new KV, found {at}")
        skip = at - start
        seg = [(k[:, :, skip:], v[:, :, skip:]) for k, v in kv]
        node.children[seq[at]] = Node(list(seq[at:]), seg, node, self._tick)
        self.tokens += len(seq) - at

    def evict(self) -> int:
        """Drop the KV of least recently used leaves (nodes without live children; they stay as ghosts)
        until at most ``capacity`` tokens are stored; returns the tokens dropped."""
        if self.tokens <= self.capacity:
            return 0
        nodes, depth = [], {}
        for root in self.roots.values():
            stack = [(root, 0)]
            while stack:
                node, d = stack.pop()
                for child in node.children.values():
                    if child.kv is None:
                        continue
                    nodes.append(child)
                    depth[id(child)] = d + 1
                    stack.append((child, d + 1))
        dropped = 0
        for node in sorted(nodes, key=lambda x: (x.used, -depth[id(x)])):
            if self.tokens <= self.capacity:
                break
            if any(c.kv is not None for c in node.children.values()):
                continue
            node.kv = None
            self.tokens -= len(node.ids)
            dropped += len(node.ids)
        self.evicted += dropped
        return dropped

    def _split(self, node: Node, n: int) -> Node:
        """Cut ``node`` after its first ``n`` tokens; returns the new upper part (the node keeps the rest)."""
        upper = Node(node.ids[:n], [(k[:, :, :n], v[:, :, :n]) for k, v in node.kv], node.parent, node.used)
        node.parent.children[node.ids[0]] = upper
        node.ids, node.kv, node.parent = node.ids[n:], [(k[:, :, n:], v[:, :, n:]) for k, v in node.kv], upper
        upper.children[node.ids[0]] = node
        return upper


def _concat(parts: list[KV]) -> Optional[KV]:
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return [(torch.cat([p[i][0] for p in parts], dim=2), torch.cat([p[i][1] for p in parts], dim=2))
            for i in range(len(parts[0]))]


def _common(ids: list[int], seq: Sequence[int], at: int, limit: int) -> int:
    n = 0
    while n < len(ids) and at + n < limit and ids[n] == seq[at + n]:
        n += 1
    return n
