"""Lightweight process reward models (PRMs): a causal-LM backbone + LoRA + a linear scoring head.

A PRM reads ``prompt, step_1, sep, step_2, sep, …`` and outputs, at the last token of the separator that
follows each step, P(step i is correct | prompt, steps ≤ i) = σ(w·h_i + b), where h_i is the backbone's
final hidden state there, layer-normalised without parameters (without ``logprob_features`` the LM head
is never applied, so scoring costs one forward pass of the decoder body). This is the discriminative PRM of Lightman et al. (2023, "Let's Verify Step by Step") and
Math-Shepherd (Wang et al., 2024), in the token layout of TRL's ``PRMTrainer`` (a label on the last token
of the separator after each step).

With ``logprob_features`` the head also sees how likely the backbone itself finds each step, read through
its own LM head (a discriminative head plus generative evidence, in the spirit of Zhang et al. 2024,
"Generative Verifiers: Reward Modeling as Next-Token Prediction"):

    P(step i correct) = σ(w·h_i + b + a₁·m_i + a₂·min_{j≤i} m_j),   m_i = min_{t ∈ step i} log p(x_t | x_<t)

(step i's tokens without its separator). Trained with the auxiliary next-token loss on correct steps
(``lm_loss_weight`` in the recipe), the backbone learns to *compute* a step, so that a wrong result is a
token it finds unlikely; the running minimum carries a slip to every later step, as the labels do.
This costs the LM head on step tokens (counted in the evaluator's FLOPs).

The softmax need not span the whole vocabulary. With ``logprob_vocab: train`` (the default) the training
recipe sets a candidate vocabulary V' — every token id of the training data — and

    log p̃(x_t) = z_{x_t} − log Σ_{v ∈ V' ∪ {x_t}} exp z_v

(the fixed target-vocabulary subset of Jean et al. 2015, "On Using Very Large Target Vocabulary for
Neural Machine Translation"; the scored token always joins the sum, so unseen text is still defined).
For generated arithmetic V' has 27 tokens instead of SmolLM2's 49,152: the LM head's cost, forward and
backward, all but vanishes, and the competitors that matter (the other digits) are all in V'.

One API is used everywhere (training recipe, evaluator, export)::

    prm = load_prm("outputs/train_prm/.../final")
    prm.score(["What is 3 + 4 * 5?"], [["4 * 5 = 20", "3 + 20 = 23"]])      # [[0.97, 0.95]]
    prm.score_partial(["What is 3 + 4 * 5?"], ["4 * 5 = 20\\n\\n3 + 20 = 2"])  # trailing partial step scored
    aggregate([0.97, 0.95], "min")                                          # 0.95
    prm.tokens_scored, prm.last_tokens, prm.num_parameters                  # compute accounting

The token layout it reads (steps, separators, the scored positions) and ``aggregate`` are
:mod:`frugal.train.prm_steps`; the training loss is :func:`prm_losses` below (the recipe
``frugal.recipes.train_prm`` runs the loop); step AUROC and first-error F1 are :mod:`frugal.train.prm_metrics`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from frugal.inference.decoding import PromptKV, cache_kw, left_pad
from frugal.train.prm_steps import (AGGREGATIONS, PROMPT_SUFFIX, Encoded, aggregate, collate, encode, prompt_text, separator_ids, step_starts, token_budget_batches)
from frugal.rewards.steps import split_steps

PRM_CONFIG_FILE = "prm.json"
HEAD_FILE = "head.safetensors"
ADAPTER_DIR = "adapter"
FORMAT_VERSION = 1


@dataclass
class PRMConfig:
    """The ``prm`` config group (``conf/prm/*.yaml``)."""

    separator: str = "\n\n"  # "\n\n" | "\n" | a token in the vocabulary, e.g. "<|im_end|>"
    aggregation: str = "min"  # how step scores become a solution score: last | min | prod | mean
    max_length: int = 512  # tokens per sequence at training time (steps that do not fit are dropped)
    score_batch_tokens: int = 8192  # padded tokens per scoring forward pass (bounds memory)
    num_layers: int = 0  # keep only the first N decoder layers of the backbone (0 = all): N/L of the cost
    lora_last_layers: int = 0  # LoRA only on the top N (kept) decoder layers (0 = all): backward stops there
    # Also feed the head the backbone's own log-probability of each step's tokens (through its LM head):
    # the step's least likely token, and the least likely token of any step so far (see PRM).
    logprob_features: bool = False
    # Their softmax: "train" = over the training data's token ids (set by the recipe, saved with the head;
    # see above), "full" = over the whole vocabulary.
    logprob_vocab: str = "train"

    def __post_init__(self):
        if not self.separator:
            raise ValueError("prm.separator must be a non-empty string")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"prm.aggregation must be one of {'|'.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.max_length < 8:
            raise ValueError(f"prm.max_length must be >= 8, got {self.max_length}")
        if self.num_layers < 0:
            raise ValueError(f"prm.num_layers must be >= 0, got {self.num_layers}")
        if self.lora_last_layers < 0:
            raise ValueError(f"prm.lora_last_layers must be >= 0, got {self.lora_last_layers}")
        if self.logprob_vocab not in ("train", "full"):
            raise ValueError(f"prm.logprob_vocab must be train|full, got {self.logprob_vocab!r}")
        if self.score_batch_tokens < 64:
            raise ValueError(f"prm.score_batch_tokens must be >= 64, got {self.score_batch_tokens}")


# ---------------------------------------------------------------------- the model

class PRM(torch.nn.Module):
    """Backbone (a causal LM, usually wrapped by peft with a LoRA adapter) + ``head`` (Linear(hidden, 1)).

    Attributes for compute accounting (read by the evaluator):

    * ``tokens_scored`` — total non-padding tokens this PRM has run through its backbone (all calls);
    * ``last_tokens`` — tokens the most recent ``score``/``score_partial`` call ran (padding excluded; with
      prompt sharing each distinct prompt once); ``last_attention`` — Σ over them of the keys each one
      attended to (the attention FLOPs term);
    * ``num_parameters`` — parameters of the backbone (embeddings included, LoRA and head excluded);
      ``num_nonembedding_parameters`` without the input embedding. A forward pass costs ≈ 2·N FLOPs per
      token with N the non-embedding count; with ``logprob_features`` the LM head also runs on the
      ``last_lm_tokens`` step tokens of the last call.
    """

    def __init__(self, model, tokenizer, cfg: PRMConfig, backbone: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.backbone = backbone  # the ModelConfig.name_or_path it was built from (saved in prm.json)
        hidden = _hf_model(model).config.hidden_size
        device = next(model.parameters()).device
        # A zero head starts every step at P = 0.5 (no prior before training); load_head fills a saved one.
        self.head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.head.to(device=device, dtype=torch.float32)
        # Weights of the two log-probability features (zero: no effect until trained).
        self.evidence = torch.nn.Linear(2, 1, bias=False) if cfg.logprob_features else None
        if self.evidence is not None:
            torch.nn.init.zeros_(self.evidence.weight)
            self.evidence.to(device=device, dtype=torch.float32)
        self.separator_length = len(separator_ids(tokenizer, cfg.separator))
        self.candidate_ids: Optional[torch.Tensor] = None  # V' of the features' softmax (None: the whole vocabulary)
        self.last_lm_tokens = 0  # tokens whose LM-head logits the last call computed (logprob_features)
        self.tokens_scored = 0
        self.last_tokens = 0
        self.last_attention = 0  # Σ keys attended per token run in the last call (see ``score``)
        base = [p for n, p in model.named_parameters() if "lora_" not in n]
        self.num_parameters = sum(p.numel() for p in base)
        self.num_nonembedding_parameters = self.num_parameters - _hf_model(model).get_input_embeddings().weight.numel()

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # ------------------------------------------------------------------ core forward
    def step_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                    positions: torch.Tensor, starts: Optional[torch.Tensor] = None,
                    first_state: Optional[torch.Tensor] = None, return_token_logprobs: bool = False,
                    **body_kwargs):
        """Logits of P(step correct) at ``(rows[k], positions[k])``: the decoder body runs once, the head
        reads only the selected hidden states (shared by training and scoring). ``body_kwargs`` go to the
        decoder (scoring passes a prompt KV ``cache`` and ``position_ids``: see :meth:`score`).

        With ``logprob_features`` (or ``return_token_logprobs``, training's auxiliary LM loss) the LM head
        also runs on every step token: ``starts[k]`` is step k's first token, and ``first_state`` (one
        hidden state per row) predicts a row's token 0 when the rows start mid-sequence (over a cached
        prompt). ``return_token_logprobs`` also returns them, as a (rows, width) tensor that is 0 elsewhere."""
        dev = self.device
        body = _hf_model(self.model).base_model  # the decoder without its LM head (LoRA layers stay active)
        hidden = body(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), **body_kwargs).last_hidden_state
        rows, positions = rows.to(dev), positions.to(dev)
        picked = hidden[rows, positions].float()
        # A parameter-free layer norm first: hidden-state scales differ a lot between backbones and
        # between layers (a truncated backbone), and unnormalised features made the head's updates blow
        # up the loss at useful learning rates.
        picked = torch.nn.functional.layer_norm(picked, picked.shape[-1:])
        logits = self.head(picked).squeeze(-1)
        if self.evidence is None and not return_token_logprobs:
            return logits
        if starts is None:
            raise ValueError("step_logits: log-probability features need the steps' first tokens (starts)")
        token_logprobs = self._token_logprobs(hidden, input_ids.to(dev), rows, starts.to(dev), positions, first_state)
        if self.evidence is not None:
            logits = logits + self.evidence(self._logprob_features(token_logprobs, rows, starts.to(dev), positions)).squeeze(-1)
        return (logits, token_logprobs) if return_token_logprobs else logits

    def _token_logprobs(self, hidden, input_ids, rows, starts, positions, first_state) -> torch.Tensor:
        """log p(token t | tokens < t) under the backbone's LM head, for every token of every step (its
        separator included), as a (rows, width) tensor that is 0 at the other positions."""
        spans = [(r, a, b) for r, a, b in zip(rows.tolist(), starts.tolist(), positions.tolist())]
        r_idx = torch.tensor([r for r, a, b in spans for _ in range(a, b + 1)], dtype=torch.long, device=hidden.device)
        t_idx = torch.tensor([t for r, a, b in spans for t in range(a, b + 1)], dtype=torch.long, device=hidden.device)
        # The state that predicts token t is the one at t - 1; token 0 of a row over a cached prompt is
        # predicted by the prompt's last state (first_state).
        first = first_state if first_state is not None else torch.zeros_like(hidden[:, 0])
        predictors = torch.cat([first[:, None].to(hidden.dtype), hidden[:, :-1]], dim=1)[r_idx, t_idx]
        tokens = input_ids[r_idx, t_idx]
        lm_head = self.model.get_output_embeddings()
        values = []
        for chunk in range(0, len(t_idx), 1024):  # bounds the (tokens × vocabulary) logits held at once
            h, x = predictors[chunk:chunk + 1024], tokens[chunk:chunk + 1024]
            if self.candidate_ids is None:
                values.append(torch.log_softmax(lm_head(h).float(), dim=-1).gather(-1, x[:, None])[:, 0])
                continue
            # Softmax over V' ∪ {x_t} (module docstring): the scored token's own logit joins the sum
            # once, as an extra column when it is not already in V'.
            weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
            candidates = h @ weight[self.candidate_ids].T + (0 if bias is None else bias[self.candidate_ids])
            own = (h * weight[x]).sum(-1) + (0 if bias is None else bias[x])
            extra = own.masked_fill(torch.isin(x, self.candidate_ids), float("-inf"))
            normaliser = torch.logsumexp(torch.cat([candidates, extra[:, None]], dim=-1).float(), dim=-1)
            values.append(own.float() - normaliser)
        self.last_lm_tokens += len(t_idx)
        out = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
        return out.index_put((r_idx, t_idx), torch.cat(values) if values else out.new_zeros(0))

    def set_candidate_vocab(self, token_ids) -> None:
        """Restrict the log-probability features' softmax to ``token_ids`` (plus each scored token); the
        training recipe passes every token id of its training data (``prm.logprob_vocab: train``)."""
        self.candidate_ids = torch.tensor(sorted(set(int(i) for i in token_ids)), dtype=torch.long, device=self.device)

    @property
    def lm_head_rows(self) -> int:
        """Rows of the LM head one step token costs: |V'| + 1 with a candidate vocabulary, else all."""
        if self.candidate_ids is not None:
            return len(self.candidate_ids) + 1
        return self.model.get_output_embeddings().weight.shape[0]

    def _logprob_features(self, token_logprobs, rows, starts, positions) -> torch.Tensor:
        """Per step: (the least log-probability among its tokens, separator excluded, so that an unfinished
        step is judged on what is written; the same minimum over this and every earlier step of its
        row). The second carries a slip forward: the label of every step from the first wrong one on is 0."""
        if not len(rows):
            return token_logprobs.new_zeros((0, 2))
        ends = positions - self.separator_length  # last token of each step
        lowest = torch.stack([token_logprobs[r, a:b + 1].min()
                              for r, a, b in zip(rows.tolist(), starts.tolist(), ends.tolist())])
        # A row's steps are contiguous and in order (collate), so each row's running minimum is a cummin.
        so_far = torch.cat([lowest[rows == r].cummin(0).values for r in rows.unique_consecutive()])
        return torch.stack([lowest, so_far], dim=-1)

    def encode(self, prompt: Any, steps: Sequence[str], max_length: Optional[int] = None) -> Encoded:
        return encode(self.tokenizer, prompt, steps, self.cfg.separator, max_length)

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def score(self, prompts: Sequence[Any], steps_batch: Sequence[Sequence[str]],
              share_prompt: bool = True) -> list[list[float]]:
        """P(step correct) for every step of every solution, batched.

        ``prompts[i]`` (a string or chat messages) and ``steps_batch[i]`` (a list of step strings, without
        separators) describe solution i; returns one list of floats per solution, one per step (an empty
        list for a solution with no steps).

        Prompt sharing (``share_prompt``, the default): every sequence starts with its prompt's tokens
        (the layout tokenizes the prompt on its own), so each distinct prompt runs through the backbone
        once per call, its KV cache is kept, and each solution runs only its own step tokens on top of it
        (the prefix cache of :class:`frugal.inference.engine.Engine`, on the PRM side). Exact up to float
        round-off: attention is causal, so a prompt token's state never depends on what follows it.
        ``share_prompt=False`` runs every full sequence (the reference). Compute accounting: tokens run
        (each distinct prompt once, plus every solution's step tokens) in ``last_tokens`` /
        ``tokens_scored``, and Σ over them of the keys each one attends to (itself included) in
        ``last_attention`` (the attention FLOPs term, :mod:`frugal.evaluator.flops`).
        """
        if len(prompts) != len(steps_batch):
            raise ValueError(f"score: {len(prompts)} prompts but {len(steps_batch)} step lists")
        encoded = [self.encode(p, [str(s) for s in steps]) for p, steps in zip(prompts, steps_batch)]
        out: list[list[float]] = [[] for _ in encoded]
        todo = [i for i, e in enumerate(encoded) if e.positions]
        keys = [prompt_text(p) for p in prompts]
        head_len: dict[str, int] = {}  # prompt text -> its token count (the prefix all its rows share)
        for i in todo:
            if keys[i] not in head_len:
                head_len[keys[i]] = len(self.tokenizer(keys[i] + PROMPT_SUFFIX, add_special_tokens=False)["input_ids"])
        prompt_kv: dict[str, tuple] = {}  # prompt text -> (per-layer (K, V), last state), filled once per call
        tokens = attention = 0
        self.last_lm_tokens = 0
        was_training = self.training
        self.eval()
        try:
            for group in token_budget_batches([len(encoded[i].ids) for i in todo], self.cfg.score_batch_tokens):
                idx = [todo[g] for g in group]
                if share_prompt:
                    logits, n, a = self._shared_prompt_logits(encoded, idx, [keys[i] for i in idx], head_len, prompt_kv)
                else:
                    batch = collate([encoded[i] for i in idx], self.tokenizer.pad_token_id)
                    logits = self.step_logits(**batch)
                    lengths = [len(encoded[i].ids) for i in idx]
                    n, a = sum(lengths), sum(m * (m + 1) // 2 for m in lengths)
                probs = torch.sigmoid(logits).tolist()
                tokens, attention = tokens + n, attention + a
                k = 0
                for i in idx:
                    m = len(encoded[i].positions)
                    out[i] = probs[k:k + m]
                    k += m
        finally:
            self.train(was_training)
        self.last_tokens = tokens
        self.last_attention = attention
        self.tokens_scored += tokens
        return out

    def _shared_prompt_logits(self, encoded: Sequence[Encoded], idx: Sequence[int], keys: Sequence[str],
                              head_len: dict, prompt_kv: dict) -> tuple[torch.Tensor, int, int]:
        """Step logits of rows ``idx`` over their prompts' cached KV (``frugal.inference.decoding.PromptKV``).
        Prompts not in ``prompt_kv`` are run first (one left-padded forward; positions from the mask) and
        stored. The rows' step tokens then run in one forward: [left-padded prompt KV | right-padded
        steps], positions continuing each row's prompt. Returns (logits, tokens run, attention sum)."""
        dev, pad = self.device, self.tokenizer.pad_token_id
        body = _hf_model(self.model).base_model
        tokens = attention = 0
        heads = {k: encoded[i].ids[:head_len[k]] for i, k in zip(idx, keys)}
        new = [k for k in dict.fromkeys(keys) if k not in prompt_kv]
        if new:
            ids, mask = left_pad([heads[k] for k in new], pad, dev)
            shared, out = PromptKV.prefill(body, ids, mask)
            # The prompt's last state too: it predicts the first step token (logprob_features).
            for k, kv, last in zip(new, shared.split(), out.last_hidden_state[:, -1]):
                prompt_kv[k] = (kv, last)
                n = len(heads[k])
                tokens, attention = tokens + n, attention + n * (n + 1) // 2
        distinct = list(dict.fromkeys(keys))
        which = torch.tensor([distinct.index(k) for k in keys], device=dev)
        cache = PromptKV.stack([prompt_kv[k][0] for k in distinct], body.config).rows(which)
        width = max(head_len[k] for k in keys)
        tails = [encoded[i].ids[head_len[k]:] for i, k in zip(idx, keys)]
        tail_width = max(len(t) for t in tails)
        ids = torch.tensor([t + [pad] * (tail_width - len(t)) for t in tails], device=dev)
        mask = torch.tensor([[0] * (width - head_len[k]) + [1] * (head_len[k] + len(t)) + [0] * (tail_width - len(t))
                             for k, t in zip(keys, tails)], device=dev)
        positions = torch.tensor([[head_len[k] + j for j in range(tail_width)] for k in keys], device=dev)
        rows = torch.tensor([r for r, i in enumerate(idx) for _ in encoded[i].positions], dtype=torch.long)
        where = torch.tensor([pos - head_len[k] for i, k in zip(idx, keys) for pos in encoded[i].positions],
                             dtype=torch.long)
        starts = torch.tensor([s - head_len[k] for i, k in zip(idx, keys) for s in step_starts(encoded[i])],
                              dtype=torch.long)
        first_state = torch.stack([prompt_kv[k][1] for k in keys])
        logits = self.step_logits(ids, mask, rows, where, starts, first_state, **{cache_kw(): cache},
                                  position_ids=positions, use_cache=True)
        for k, t in zip(keys, tails):
            p, n = head_len[k], len(t)
            tokens, attention = tokens + n, attention + n * p + n * (n + 1) // 2
        return logits, tokens, attention

    def score_partial(self, prompts: Sequence[Any], texts: Sequence[str]) -> list[list[float]]:
        """Step scores of possibly unfinished solutions given as text: the text is split on the separator
        and a trailing step without a separator after it counts as a step (it is scored as if it ended
        there), so the last score judges the solution so far. Used for early rejection."""
        return self.score(prompts, [split_steps(t, self.cfg.separator) for t in texts])

    def score_solutions(self, prompts: Sequence[Any], texts: Sequence[str], how: Optional[str] = None) -> list[float]:
        """One aggregated score per (partial) solution text (``how`` defaults to the config's)."""
        how = how or self.cfg.aggregation
        return [aggregate(s, how) for s in self.score_partial(prompts, texts)]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Adapter + head into one folder (what ``frugal.train.checkpoint.save_checkpoint`` calls, so that a
        checkpoint's ``adapter/`` holds the whole trainable state)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if _is_peft(self.model):
            self.model.save_pretrained(directory)
        state = dict(self.head.state_dict())
        if self.evidence is not None:
            state["evidence.weight"] = self.evidence.weight
        if self.candidate_ids is not None:
            state["candidate_ids"] = self.candidate_ids
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, directory / HEAD_FILE)

    def load_head(self, file: str | Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(file), device=str(self.device))
        evidence = state.pop("evidence.weight", None)
        vocab = state.pop("candidate_ids", None)
        if (evidence is None) != (self.evidence is None):
            raise ValueError(f"{file}: the head {'lacks' if evidence is None else 'has'} log-probability feature "
                             f"weights but prm.logprob_features is {self.evidence is not None}")
        self.head.load_state_dict(state)
        if evidence is not None:
            self.evidence.load_state_dict({"weight": evidence})
        self.candidate_ids = vocab

    def save(self, out_dir: str | Path) -> Path:
        """Write a PRM folder: ``adapter/`` (peft adapter + ``head.safetensors``) and ``prm.json`` (backbone,
        separator, aggregation, …). Written to a temporary folder renamed into place (atomic)."""
        from frugal.runtime.io import atomic_dir

        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            self.save_pretrained(tmp / ADAPTER_DIR)
            meta = {"format_version": FORMAT_VERSION, "backbone": self.backbone,
                    "hidden_size": self.head.in_features, "has_adapter": _is_peft(self.model), **asdict(self.cfg)}
            (tmp / PRM_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return out_dir


# ---------------------------------------------------------------------- the training loss

def lm_targets(tokenizer, prompt, enc, labels) -> list[int]:
    """Token indices ``t`` (predicted from position ``t - 1``) of every step labelled correct (≥ 0.5),
    its separator included: the targets of the auxiliary next-token loss."""
    start = len(tokenizer(prompt_text(prompt) + PROMPT_SUFFIX, add_special_tokens=False)["input_ids"])
    out = []
    for position, label in zip(enc.positions, labels):
        if label >= 0.5:
            out += range(start, position + 1)
        start = position + 1
    return out


def prm_losses(prm: PRM, batch: list[tuple], normalizer: int, lm_normalizer: int = 0):
    """(BCE, LM) for a micro-batch of rows ``(encoded, labels[, lm_targets])``.

    BCE: the sum over the batch's steps of BCE(logit at the step's separator, label), divided by
    ``normalizer`` (the step count of the whole optimizer step, so micro-batching does not change it).
    LM (only with ``lm_normalizer`` > 0): next-token cross-entropy at the rows' ``lm_targets`` (the
    tokens of correct steps), summed and divided by ``lm_normalizer``; its softmax is the features' (over
    the candidate vocabulary V' when the PRM has one: ``PRM._token_logprobs``). Cobbe et al. (2021, "Training
    Verifiers to Solve Math Word Problems") found that training a verifier jointly with the language
    modelling objective helps it: here it teaches the backbone to compute the step (a step's result),
    which the head at the separator then only has to compare with what is written.
    """
    enc = collate([row[0] for row in batch], prm.tokenizer.pad_token_id)
    targets = torch.tensor([y for row in batch for y in row[1]], dtype=torch.float32, device=prm.device)
    if not lm_normalizer:
        logits = prm.step_logits(**enc)
    else:
        logits, token_logprobs = prm.step_logits(**enc, return_token_logprobs=True)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / normalizer
    if not lm_normalizer:
        return bce, None
    rows = torch.tensor([r for r, row in enumerate(batch) for _ in row[2]], dtype=torch.long, device=prm.device)
    where = torch.tensor([t for row in batch for t in row[2]], dtype=torch.long, device=prm.device)
    return bce, -token_logprobs[rows, where].sum() / lm_normalizer


def bce_loss(prm: PRM, batch: list[tuple], normalizer: int) -> torch.Tensor:
    """The BCE term of :func:`prm_losses`."""
    return prm_losses(prm, batch, normalizer)[0]


# ---------------------------------------------------------------------- building and loading

def build_prm(model_cfg, lora_cfg, prm_cfg: PRMConfig, device: Optional[torch.device] = None) -> PRM:
    """A fresh PRM: backbone from ``model_cfg`` (``frugal.inference.models.load_model``), a new LoRA adapter
    (unless ``lora.enabled=false``: then the backbone is frozen and only the head trains)."""
    from frugal.train.lora import apply_lora
    from frugal.inference.models import load_model

    model, tok = load_model(model_cfg, device)
    tok.padding_side = "right"  # scoring gathers by position; right padding keeps positions natural
    truncate_layers(model, prm_cfg.num_layers)
    if lora_cfg.enabled:
        if prm_cfg.lora_last_layers:
            lora_cfg = _top_layer_targets(model, lora_cfg, prm_cfg.lora_last_layers)
        model = apply_lora(model, lora_cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return PRM(model, tok, prm_cfg, model_cfg.name_or_path)


def load_prm(path: str | Path, device: Optional[torch.device] = None, dtype: str = "float32") -> PRM:
    """Load a PRM folder written by :meth:`PRM.save` (the backbone is loaded from its name in
    ``prm.json``; scores are identical to the saved PRM's at the same dtype)."""
    from peft import PeftModel

    from frugal.inference.models import ModelConfig, load_model

    path = Path(path)
    meta_path = path / PRM_CONFIG_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a PRM folder (no {PRM_CONFIG_FILE}); train one with `frugal train-prm`")
    meta = json.loads(meta_path.read_text())
    cfg = PRMConfig(**{k: meta[k] for k in PRMConfig.__dataclass_fields__ if k in meta})
    model, tok = load_model(ModelConfig(name_or_path=meta["backbone"], dtype=dtype), device)
    tok.padding_side = "right"
    truncate_layers(model, cfg.num_layers)
    if meta.get("has_adapter", True):
        model = PeftModel.from_pretrained(model, str(path / ADAPTER_DIR), is_trainable=False)
    model.eval()
    prm = PRM(model, tok, cfg, meta["backbone"])
    prm.load_head(path / ADAPTER_DIR / HEAD_FILE)
    return prm


def truncate_layers(model, keep: int) -> None:
    """Keep the first ``keep`` decoder layers (0 = all). A PRM reads a hidden state, not next-token
    logits, and the middle layers of a small LM already carry what a step classifier needs; cutting
    the top layers is the cheapest way to a *lightweight* PRM (cost scales with the layers kept)."""
    if not keep:
        return
    body = _hf_model(model).base_model
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError("prm.num_layers: this backbone has no `.layers` ModuleList; set prm.num_layers=0")
    if keep > len(layers):
        raise ValueError(f"prm.num_layers={keep} but the backbone has only {len(layers)} layers")
    body.layers = layers[:keep]
    config = _hf_model(model).config
    config.num_hidden_layers = keep
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:keep]


def _top_layer_targets(model, lora_cfg, last: int):
    """``lora_cfg`` with ``target_modules`` = the linear layers of the top ``last`` decoder layers (by
    full module name; peft matches names by suffix). Lower layers stay frozen, so the backward pass ends
    at the first adapted layer: most of the training compute saved on a small CPU."""
    import dataclasses

    layer = re.compile(r"(^|\.)layers\.(\d+)\.")
    linear = [(n, int(m.group(2))) for n, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) and (m := layer.search(n))]
    if not linear:
        raise ValueError("prm.lora_last_layers: no '<...>.layers.<i>.' linear modules in this backbone; set it to 0")
    top = max(i for _, i in linear)
    wanted = set(lora_cfg.target_modules) - {"all-linear"}
    names = [n for n, i in linear if i > top - last and (not wanted or n.rsplit(".", 1)[-1] in wanted)]
    return dataclasses.replace(lora_cfg, target_modules=names)


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _hf_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if _is_peft(model) else model
