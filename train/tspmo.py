"""T-SPMO: token-level credit assignment by prefix matching.

Token-Specific Prefix Matching Optimization (Lee & Tong, 2025, "Token-Efficient RL for LLM Reasoning",
arXiv:2504.20834). S-GRPO and GRPO give every token of a completion the same sequence-level advantage;
T-SPMO instead credits the *token transitions where sampled completions diverge*.

For one prompt q with completions o_1..o_G (token ids, EOS included) and rewards R_1..R_G, build a prefix
trie over the token ids. A node is a prefix p (the root is the empty prefix); N(p) is the number of
completions that start with p, and

    V(p)    = (1 / N(p)) · Σ_{i : o_i starts with p} R_i        (Monte-Carlo value of the prefix)
    A(p, v) = V(p·v) − V(p)                                    (advantage of emitting v after p)

Completions are prefix-free (each ends at its first EOS or at the token budget), so a node with a single
child has V(p·v) = V(p): only **branch points** (nodes with ≥ 2 distinct next tokens) carry a non-zero
advantage, and typically a few percent of the completion tokens enter the loss. Identical completions
share one path and add visits, not branches; a single completion (or a group of identical ones) yields
nothing. The loss over the selected set S is

    L = −(1 / |S|) · Σ_{(p, v) ∈ S} A(p, v) · log π_θ(v | q, p)

(with the optional ratio clip and KL term of ``frugal.train.policy_loss``, shared with S-GRPO). S holds either
each **unique** transition once (``weighting=unique``, the paper's choice: a token choice is credited
once however often it was sampled), or one entry per completion that took it (``weighting=visits``: the
transition counts N(p·v) times, a popular path weighs more). Because every completion that took (p, v)
shares the same context, the unique mode evaluates one representative row, so rows without a selected
token skip the forward pass entirely.

Knobs (``conf/algo/tspmo.yaml``): ``min_visits`` drops transitions whose child has fewer completions
(V(p·v) estimated from one sample is noisy); ``adv_norm`` = none (raw reward differences, the paper) |
reward_std (divide by the group's reward std, the scale of GRPO's advantages) | batch_std (divide by the
std of the step's selected advantages); ``max_selected`` caps the selected tokens per step, keeping the
largest |A|; ``replay_samples`` re-samples continuations from each group's most decisive prefix (the
child of its highest-|A| transition) to deepen the trie where the signal is. Replayed completions count
toward V of every prefix they pass through, so they bias the ancestors' values toward the replayed branch;
that is why replay is off by default.

Everything here produces a ``frugal.train.token_selection.Selection``: ``frugal.train.policy_loss.selected_logprobs``
then applies the LM head only at the selected positions, as for S-GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from frugal.inference import decoding
from frugal.train.rollout import GenerationConfig, Rollout
from frugal.train.token_selection import Selection

WEIGHTINGS = ("unique", "visits")
ADV_NORMS = ("none", "reward_std", "batch_std")


@dataclass
class Node:
    visits: int = 0  # N(p)
    reward_sum: float = 0.0
    rows: list[int] = field(default_factory=list)  # completions through this prefix (indices in the group)
    children: dict[int, "Node"] = field(default_factory=dict)

    @property
    def value(self) -> float:  # V(p)
        return self.reward_sum / self.visits


@dataclass(frozen=True)
class Transition:
    position: int  # completion index of the token v (= len(p))
    token: int  # v
    advantage: float  # A(p, v) = V(p·v) − V(p)
    visits: int  # N(p·v)
    rows: tuple[int, ...]  # completions that took it (indices in the group, ascending)
    is_leaf: bool  # p·v is a whole completion: nothing to continue from it


def build_trie(sequences: list[list[int]], rewards: list[float]) -> Node:
    root = Node()
    for i, (seq, reward) in enumerate(zip(sequences, rewards)):
        node = root
        node.visits, node.reward_sum = node.visits + 1, node.reward_sum + reward
        node.rows.append(i)
        for token in seq:
            node = node.children.setdefault(int(token), Node())
            node.visits, node.reward_sum = node.visits + 1, node.reward_sum + reward
            node.rows.append(i)
    return root


def branch_transitions(sequences: list[list[int]], rewards: list[float], min_visits: int = 1) -> list[Transition]:
    """Every transition out of a branch point whose child has ≥ ``min_visits`` completions, ordered by
    position, then by first row (a deterministic order, so capping and replay are reproducible)."""
    if len(sequences) != len(rewards):
        raise ValueError(f"{len(sequences)} completions but {len(rewards)} rewards")
    out, stack = [], [(build_trie(sequences, rewards), 0)] if sequences else []
    while stack:  # iterative: completions are hundreds of tokens deep
        node, depth = stack.pop()
        if len(node.children) >= 2:
            for token, child in node.children.items():
                if child.visits >= min_visits:
                    out.append(Transition(depth, token, child.value - node.value, child.visits,
                                          tuple(child.rows), not child.children))
        stack.extend((child, depth + 1) for child in node.children.values())
    out.sort(key=lambda t: (t.position, t.rows[0]))
    return out


def _group_sequences(completion_ids: torch.Tensor, completion_mask: torch.Tensor, start: int, size: int):
    lengths = completion_mask[start:start + size].sum(dim=1).tolist()
    ids = completion_ids[start:start + size].tolist()
    return [row[:n] for row, n in zip(ids, lengths)]


def select_prefix_matching(completion_ids: torch.Tensor, completion_mask: torch.Tensor, rewards, group_size: int,
                           min_visits: int = 1, weighting: str = "unique", adv_norm: str = "none",
                           max_selected: int = 0, eps: float = 1e-4) -> Selection:
    """T-SPMO's (row, position, advantage) triples for a batch of groups (rows prompt-major, as in
    ``Rollout``). ``max_selected`` > 0 keeps that many triples with the largest |A| (ties: earlier first)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"algo.weighting must be one of {'|'.join(WEIGHTINGS)}, got {weighting!r}")
    if adv_norm not in ADV_NORMS:
        raise ValueError(f"algo.adv_norm must be one of {'|'.join(ADV_NORMS)}, got {adv_norm!r}")
    n = completion_ids.shape[0]
    rewards = [float(r) for r in rewards]
    if n % group_size or len(rewards) != n:
        raise ValueError(f"{n} completions and {len(rewards)} rewards cannot be split into groups of {group_size}")
    rows, positions, advantages = [], [], []
    for start in range(0, n, group_size):
        group_rewards = rewards[start:start + group_size]
        scale = 1.0
        if adv_norm == "reward_std":
            scale = 1.0 / (float(torch.tensor(group_rewards).std(unbiased=False)) + eps)
        sequences = _group_sequences(completion_ids, completion_mask, start, group_size)
        for t in branch_transitions(sequences, group_rewards, min_visits):
            if abs(t.advantage) < 1e-12:  # equal-valued siblings: no gradient, so no LM-head cost either
                continue
            for local in (t.rows[:1] if weighting == "unique" else t.rows):
                rows.append(start + local)
                positions.append(t.position)
                advantages.append(t.advantage * scale)
    adv = torch.tensor(advantages, dtype=torch.float32)
    if adv_norm == "batch_std" and adv.numel() > 1:
        adv = adv / (adv.std(unbiased=False) + eps)
    rows_t, pos_t = torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
    if max_selected and adv.numel() > max_selected:
        keep = torch.sort(torch.argsort(-adv.abs(), stable=True)[:max_selected]).values
        rows_t, pos_t, adv = rows_t[keep], pos_t[keep], adv[keep]
    device = completion_ids.device
    return Selection(rows_t.to(device), pos_t.to(device), adv.to(device))


# ---------------------------------------------------------------------- replay

def replay_prefixes(completion_ids: torch.Tensor, completion_mask: torch.Tensor, rewards, group_size: int,
                    min_visits: int = 1) -> list[list[int]]:
    """Per group, the prefix p·v of its highest-|A| transition that can still be continued (not a whole
    completion); the empty prefix (plain fresh samples) when the group has no such transition."""
    rewards = [float(r) for r in rewards]
    prefixes = []
    for start in range(0, completion_ids.shape[0], group_size):
        sequences = _group_sequences(completion_ids, completion_mask, start, group_size)
        candidates = [t for t in branch_transitions(sequences, rewards[start:start + group_size], min_visits)
                      if not t.is_leaf and abs(t.advantage) >= 1e-12]
        best = max(candidates, key=lambda t: abs(t.advantage), default=None)  # first of equals wins
        prefixes.append([] if best is None else sequences[best.rows[0]][:best.position + 1])
    return prefixes


@torch.inference_mode()
def replay_rollout(model, tokenizer, rollout: Rollout, rewards, gen_cfg: GenerationConfig, num_samples: int,
                   min_visits: int = 1) -> Rollout:
    """``rollout`` with ``num_samples`` more completions per group, each continuing the group's replay
    prefix (see :func:`replay_prefixes`); groups grow from G to G + num_samples rows, prompt-major."""
    G = rollout.group_size
    prefixes = replay_prefixes(rollout.completion_ids, rollout.completion_mask, rewards, G, min_visits)
    device = rollout.prompt_ids.device
    pad = tokenizer.pad_token_id
    # Prompt (without its left padding) + prefix, left-padded again so all continuations start together.
    contexts = [rollout.prompt_ids[g * G][rollout.prompt_mask[g * G].bool()].tolist() + p
                for g, p in enumerate(prefixes)]
    ids, mask = decoding.left_pad(contexts, pad, device)
    budget = gen_cfg.max_new_tokens - min(len(p) for p in prefixes)
    continuations, lengths = decoding.sample(model, tokenizer, ids, mask, num_samples, gen_cfg, max(budget, 1))
    # Each new completion = prefix + continuation, cut to the same token budget as the original samples.
    new = [(prefixes[i // num_samples] + cont[:n])[:gen_cfg.max_new_tokens]
           for i, (cont, n) in enumerate(zip(continuations.tolist(), lengths.tolist()))]
    new_ids = torch.full((len(new), max(len(s) for s in new)), pad, dtype=torch.long, device=device)
    new_mask = torch.zeros_like(new_ids)
    for i, s in enumerate(new):
        new_ids[i, :len(s)], new_mask[i, :len(s)] = torch.tensor(s, dtype=torch.long, device=device), 1

    # Interleave: group g = its G original rows, then its num_samples replayed rows.
    C = max(rollout.completion_ids.shape[1], new_ids.shape[1])
    old_ids = torch.nn.functional.pad(rollout.completion_ids, (0, C - rollout.completion_ids.shape[1]), value=pad)
    old_mask = torch.nn.functional.pad(rollout.completion_mask, (0, C - rollout.completion_mask.shape[1]), value=0)
    new_ids = torch.nn.functional.pad(new_ids, (0, C - new_ids.shape[1]), value=pad)
    new_mask = torch.nn.functional.pad(new_mask, (0, C - new_mask.shape[1]), value=0)
    order, R = [], num_samples
    for g in range(len(prefixes)):
        order += [("old", g * G + j) for j in range(G)] + [("new", g * R + j) for j in range(R)]
    pick = lambda old, new_: torch.stack([old[i] if src == "old" else new_[i] for src, i in order])  # noqa: E731
    prompt_rows = [i if src == "old" else (i // R) * G for src, i in order]
    texts = [rollout.texts[i] if src == "old" else
             tokenizer.decode(new_ids[i][new_mask[i].bool()], skip_special_tokens=True) for src, i in order]
    return Rollout(rollout.prompt_ids[prompt_rows], rollout.prompt_mask[prompt_rows], pick(old_ids, new_ids),
                   pick(old_mask, new_mask), texts, G + R)
