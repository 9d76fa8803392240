"""PRMs from the Hugging Face Hub behind the evaluator's PRM interface (``score`` / ``score_partial``,
the compute counters ``last_tokens`` / ``last_attention``): ``prm_path=<Hub id or folder>``.

Families (``prm_family=``, or detected from the checkpoint by :func:`detect_family`), each a
:class:`PRMFamily` registered with ``@register("prm_family")`` (:mod:`frugal.runtime.registry`; a new
family is one more registered class: its ``architectures`` and its ``load``):

* ``frugal`` — a folder written by ``frugal train-prm`` (has ``prm.json``): :func:`frugal.train.prm.load_prm`.
* ``qwen2_math_prm`` — ``Qwen/Qwen2.5-Math-PRM-7B`` / ``-72B`` (``config.json`` architectures
  ``Qwen2ForProcessRewardModel``). The model card's recipe: the chat [system "Please reason step by step,
  and put your final answer within \\boxed{}.", user = the question, assistant = the steps each followed
  by ``<extra_0>``], templated without a generation prompt; the head ``score`` = Linear(h, h) → ReLU →
  Linear(h, 2) on the final hidden states; step i's score is softmax(logits)[1] at the i-th ``<extra_0>``.
  The checkpoint ships remote code (``modeling_qwen2_rm.py``); it is NOT run (no ``trust_remote_code``):
  the decoder is transformers' own ``Qwen2Model`` loaded from the ``model.*`` weights, and the head is
  built here from the ``score.0.*`` / ``score.2.*`` weights of the same safetensors files.
* ``math_shepherd`` — ``peiyi9979/math-shepherd-mistral-7b-prm`` (``MistralForCausalLM``): the text
  ``f"{question} {step_1} ки{sep}{step_2} ки"`` (the model card; search-and-learn's layout), and step i's
  score is the softmax over the logits of the two tokens of ``tokenizer.encode("+ -")`` (the model card's
  candidate tokens, 648 / 387 in Mistral's vocabulary), taking "+", at the i-th step tag ``ки``
  (``tokenizer.encode("ки")[-1]``, 12902).
* ``rlhflow`` — ``RLHFlow/Llama3.1-8B-PRM-Deepseek-Data`` / ``-Mistral-Data`` (``LlamaForCausalLM``):
  each step is a user turn (the first one ``question + " " + step_1``), each followed by the assistant
  turn ``+``; the whole conversation is templated once (the checkpoint's Llama-3.1 chat template) and
  step i's score is the softmax over the ``+`` / ``-`` logits (``tokenizer.encode("+")[-1]``,
  ``encode("-")[-1]``) at the position that predicts the i-th assistant ``+`` (RLHFlow's
  ``prm_evaluate.py``; search-and-learn's batched form).

Every family scores a batch in one forward pass over right-padded rows (``score_batch_tokens`` padded
tokens at most per pass). With ``share_prompt`` (the default), the rows of one prompt first run their
longest common token prefix once (left-padded, one pass for all prompts of the batch) and then only
their own tokens over that KV (:class:`frugal.inference.decoding.PromptKV`): exact, since the prefix is the
same tokens and attention is causal. Compute: ``last_tokens`` = tokens run (each shared prefix once),
``last_attention`` = Σ over them of the keys attended to, so :class:`frugal.evaluator.prm_counts.CountingPRM`
charges what ran. The two-token softmax of the causal-LM families reads two rows of the LM head at the
scored positions only (exactly the full-vocabulary logits of those two tokens), so no LM head is charged.

The prompt a PRM sees is the question: the last user message of the task row's chat prompt
(:func:`frugal.train.prm_steps.prompt_text`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch

from frugal.inference.decoding import PromptKV, cache_kw
from frugal.train.prm_steps import Encoded, aggregate, prompt_text, token_budget_batches
from frugal.rewards.steps import split_steps
from frugal.runtime import registry
from frugal.runtime.registry import register

FAMILIES = registry.view("prm_family")  # name -> PRMFamily, live over the registry (registration order)
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_STEP_TAG = "<extra_0>"
SHEPHERD_TAG = "ки"


@dataclass
class HubPRMConfig:
    """What the evaluator's PRM plumbing reads from a PRM (``cfg.separator``, ``cfg.aggregation``)."""

    separator: str = "\n\n"  # how a solution's text is split into steps (the engine's step delimiter)
    aggregation: str = "min"
    score_batch_tokens: int = 8192  # padded tokens per forward pass (bounds memory)


def resolve(path: str) -> Path:
    """A local folder as is; otherwise a Hub id, downloaded (or read from the local Hub cache, honouring
    ``HF_HUB_OFFLINE``) with ``huggingface_hub.snapshot_download``."""
    local = Path(path)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.jinja"]))
    except Exception as err:  # noqa: BLE001 -- name the path whatever went wrong (offline, no such repo)
        raise FileNotFoundError(f"prm_path={path}: not a local folder, and the Hub snapshot could not be had "
                                f"({type(err).__name__}: {err})") from None


def architectures() -> dict[str, str]:
    """``config.json`` architectures -> family, over the registered families."""
    return {a: name for name, fam in registry.variants("prm_family").items() for a in fam.architectures}


def detect_family(folder: Path) -> str:
    """The first family that recognises the folder itself (``frugal``: it has ``prm.json``), else the one
    of ``config.json``'s ``architectures``."""
    from frugal.train.prm import PRM_CONFIG_FILE

    folder = Path(folder)
    for name, fam in registry.variants("prm_family").items():
        if fam.recognises(folder):
            return name
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: neither {PRM_CONFIG_FILE} (a `frugal train-prm` folder) nor "
                                "config.json (a Hub checkpoint); set prm_path to a PRM")
    arch = json.loads(config.read_text()).get("architectures") or []
    known = architectures()
    for a in arch:
        if a in known:
            return known[a]
    raise ValueError(f"{config}: architectures {arch} is no PRM family this evaluator knows "
                     f"({', '.join(f'{a} -> {f}' for a, f in known.items())}); set "
                     f"prm_family={'|'.join(FAMILIES)}")


def load_any_prm(path: str, family: Optional[str] = None, device: Optional[torch.device] = None,
                 dtype: Optional[str] = None, separator: str = "\n\n"):
    """The PRM at ``path`` (a folder or a Hub id) of ``family`` (None: :func:`detect_family`).
    ``separator`` splits solutions into steps for the Hub families (Frugal folders keep their own).
    ``dtype``: None = float32 for a Frugal folder (its scores as saved), ``auto`` for a Hub checkpoint
    (bfloat16 on a CUDA device that has it, else float32: a 7B PRM on a GPU)."""
    if family is not None:
        registry.get("prm_family", family)  # refuses an unknown family, listing the registered ones
    folder = resolve(path)
    family = family or detect_family(folder)
    device = device or torch.device("cpu")
    return registry.get("prm_family", family).load(folder, str(path), device, dtype, separator)


# ---------------------------------------------------------------------- the families

class PRMFamily:
    """A PRM family, ``prm_family=<name>``: how to recognise its checkpoints and load one. Registered with
    ``@register("prm_family")``; :func:`detect_family` asks the families in registration order."""

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()  # config.json architectures that mean this family

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        """Whether ``folder`` is of this family whatever its ``config.json`` says (asked before the
        architectures)."""
        return False

    @classmethod
    def load(cls, folder: Path, source: str, device: torch.device, dtype: Optional[str], separator: str):
        """The PRM in ``folder`` (``source``: the path or Hub id it came from) on ``device``."""
        raise NotImplementedError(f"prm_family={cls.name} does not say how to load it")


@register("prm_family")
class FrugalFamily(PRMFamily):
    """A folder written by ``frugal train-prm`` (``prm.json``): :func:`frugal.train.prm.load_prm`, float32
    unless ``dtype`` says otherwise (its scores as saved). Its steps split on its own saved separator."""

    name = "frugal"

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        from frugal.train.prm import PRM_CONFIG_FILE

        return (folder / PRM_CONFIG_FILE).is_file()

    @classmethod
    def load(cls, folder, source, device, dtype, separator):
        from frugal.train.prm import load_prm

        return load_prm(folder, device, dtype or "float32")


class HubFamily(PRMFamily):
    """A Hub checkpoint: its tokenizer, ``dtype`` ``auto`` unless given, and :meth:`build`."""

    @classmethod
    def load(cls, folder, source, device, dtype, separator):
        from transformers import AutoTokenizer

        from frugal.inference.models import resolve_dtype

        torch_dtype = resolve_dtype(dtype or "auto", device)
        tok = AutoTokenizer.from_pretrained(str(folder))
        return cls.build(folder, tok, torch_dtype, device, HubPRMConfig(separator=separator), source)

    @classmethod
    def build(cls, folder: Path, tok, torch_dtype: torch.dtype, device: torch.device, cfg: HubPRMConfig,
              source: str) -> "HubPRM":
        raise NotImplementedError


@register("prm_family")
class Qwen2MathPRMFamily(HubFamily):
    name = "qwen2_math_prm"
    architectures = ("Qwen2ForProcessRewardModel",)

    @classmethod
    def build(cls, folder, tok, torch_dtype, device, cfg, source):
        body, head = _load_qwen_prm(folder, torch_dtype)
        return HubPRM(QwenMathPRM(tok), body.to(device), head.to(device), tok, cfg, source)


class CausalLMFamily(HubFamily):
    """A causal LM scored by the softmax over two tokens' logits (:class:`_TokenPair`) in a layout."""

    @classmethod
    def layout(cls, tok, separator: str):
        raise NotImplementedError

    @classmethod
    def build(cls, folder, tok, torch_dtype, device, cfg, source):
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype).to(device)
        fmt = cls.layout(tok, cfg.separator)
        head = _TokenPair(lm.get_output_embeddings().weight, fmt.candidates)
        return HubPRM(fmt, lm, head, tok, cfg, source)


@register("prm_family")
class MathShepherdFamily(CausalLMFamily):
    name = "math_shepherd"
    architectures = ("MistralForCausalLM",)

    @classmethod
    def layout(cls, tok, separator):
        return MathShepherd(tok, separator)


@register("prm_family")
class RLHFlowFamily(CausalLMFamily):
    name = "rlhflow"
    architectures = ("LlamaForCausalLM",)

    @classmethod
    def layout(cls, tok, separator):
        return RLHFlow(tok)


# ---------------------------------------------------------------------- checkpoint reading

def _safetensors_keys(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose name starts with ``prefix`` from the checkpoint's safetensors file(s) (a single
    ``model.safetensors`` or the shards of ``model.safetensors.index.json``)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key] = f.get_tensor(key)
    return out


def _load_qwen_prm(folder: Path, dtype: torch.dtype):
    """transformers' ``Qwen2Model`` from the checkpoint's ``model.*`` weights and the ``score`` head from
    its ``score.0.*`` / ``score.2.*`` weights (the architecture of the checkpoint's remote code, which is
    not run)."""
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config.from_pretrained(str(folder))
    body = Qwen2Model.from_pretrained(str(folder), config=config, dtype=dtype)
    state = _safetensors_keys(folder, "score.")
    expected = {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"}
    if set(state) != expected:
        raise ValueError(f"{folder}: a Qwen2ForProcessRewardModel checkpoint holds the head {sorted(expected)}, "
                         f"found {sorted(state)}")
    hidden = config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, state["score.2.weight"].shape[0]))
    head.load_state_dict({k[len("score."):]: v for k, v in state.items()})
    return body.eval(), head.to(dtype).eval()


class _TokenPair(torch.nn.Module):
    """softmax over two LM-head rows (good, bad) of a hidden state, taking "good": the two tokens'
    full-vocabulary logits are exactly these rows' products."""

    def __init__(self, lm_head_weight: torch.Tensor, candidates: tuple[int, int]):
        super().__init__()
        self.register_buffer("rows", lm_head_weight[list(candidates)].detach().clone(), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.softmax(hidden.to(self.rows.dtype) @ self.rows.T, dim=-1)[..., 0]


# ---------------------------------------------------------------------- the families' layouts

class QwenMathPRM:
    """Qwen2.5-Math-PRM's layout; scores are softmax(score head)[1] at each ``<extra_0>``."""

    def __init__(self, tok):
        self.tok = tok
        self.tag = tok.convert_tokens_to_ids(QWEN_STEP_TAG)
        if self.tag is None or self.tag == tok.unk_token_id:
            raise ValueError(f"this tokenizer has no {QWEN_STEP_TAG} token: not a Qwen2.5-Math-PRM checkpoint")

    def encode(self, question: str, steps: Sequence[str]) -> Encoded:
        messages = [{"role": "system", "content": QWEN_SYSTEM}, {"role": "user", "content": question},
                    {"role": "assistant", "content": "".join(s + QWEN_STEP_TAG for s in steps)}]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        ids = self.tok.encode(text)
        return Encoded(ids, [i for i, t in enumerate(ids) if t == self.tag])


class MathShepherd:
    """Math-Shepherd's layout; scores are P(+) over {+, -} at each step tag ``ки``."""

    def __init__(self, tok, separator: str = "\n\n"):
        self.tok, self.separator = tok, separator  # the separator written between "step ки" pieces
        pair = tok.encode("+ -", add_special_tokens=False)
        if len(pair) != 2:
            raise ValueError(f"Math-Shepherd: '+ -' should be two tokens (the good and bad tokens), got {pair}")
        self.candidates = (pair[0], pair[1])
        self.tag = tok.encode(SHEPHERD_TAG, add_special_tokens=False)[-1]

    def encode(self, question: str, steps: Sequence[str]) -> Encoded:
        body = "".join(f"{s} {SHEPHERD_TAG}" + (self.separator if i < len(steps) - 1 else "")
                       for i, s in enumerate(steps))
        ids = self.tok.encode(f"{question} {body}")
        return Encoded(ids, [i for i, t in enumerate(ids) if t == self.tag])


class RLHFlow:
    """RLHFlow's layout: step i a user turn, the assistant replies ``+``; scores are P(+) over {+, -} at
    the position that predicts each reply."""

    def __init__(self, tok):
        self.tok = tok
        self.candidates = (tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1])

    def _ids(self, conversation, generation_prompt: bool) -> list[int]:
        text = self.tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode(self, question: str, steps: Sequence[str]) -> Encoded:
        conversation, positions = [], []
        for k, step in enumerate(steps):
            conversation.append({"role": "user", "content": f"{question} {step}" if k == 0 else step})
            at = len(self._ids(conversation, True))  # where the assistant's "+" goes
            positions.append(at - 1)  # the position whose logits predict it
            conversation.append({"role": "assistant", "content": "+"})
        ids = self._ids(conversation, False) if steps else []
        for p in positions:
            if ids[p + 1] != self.candidates[0]:
                raise ValueError("RLHFlow: the chat template does not put the assistant's '+' where its "
                                 "generation prompt ends; this tokenizer's template is not prefix-consistent")
        return Encoded(ids, positions)


# ---------------------------------------------------------------------- the scorer

class HubPRM(torch.nn.Module):
    """A Hub PRM: ``model`` (the transformers model), ``head`` (hidden state -> P(step correct)) and a
    family layout ``fmt`` (``encode(question, steps) -> Encoded`` with the scored positions)."""

    def __init__(self, fmt, model, head, tokenizer, cfg: HubPRMConfig, source: str):
        super().__init__()
        self.fmt, self.model, self.head, self.tokenizer, self.cfg, self.source = fmt, model, head, tokenizer, cfg, source
        self.family = type(fmt).__name__
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        body = self.body
        self.num_parameters = sum(p.numel() for p in body.parameters())
        self.num_nonembedding_parameters = self.num_parameters - body.get_input_embeddings().weight.numel()
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if lm_head is not None and lm_head.weight is not body.get_input_embeddings().weight:
            # flops.prm_shape subtracts an untied LM head from this count (it never runs here)
            self.num_nonembedding_parameters += lm_head.weight.numel()
        self.lm_head_rows = 0
        self.tokens_scored = self.last_tokens = self.last_attention = 0

    @property
    def body(self):
        """The decoder body that produces the final hidden states (``Qwen2Model`` / ``model.model``)."""
        return self.model.model if hasattr(self.model, "lm_head") else self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: Any, steps: Sequence[str]) -> Encoded:
        enc = self.fmt.encode(prompt_text(prompt), [str(s) for s in steps])
        if len(enc.positions) != len(steps):
            raise ValueError(f"{self.source} ({self.family}): {len(steps)} steps but {len(enc.positions)} scored "
                             f"positions in the encoded solution (does a step contain the family's step tag?)")
        return enc

    @torch.inference_mode()
    def score(self, prompts: Sequence[Any], steps_batch: Sequence[Sequence[str]],
              share_prompt: bool = True) -> list[list[float]]:
        """P(step correct) for every step of every solution (one list per solution, [] for no steps)."""
        if len(prompts) != len(steps_batch):
            raise ValueError(f"score: {len(prompts)} prompts but {len(steps_batch)} step lists")
        encoded = [self.encode(p, s) if s else Encoded([], []) for p, s in zip(prompts, steps_batch)]
        keys = [prompt_text(p) for p in prompts]
        out: list[list[float]] = [[] for _ in encoded]
        todo = [i for i, e in enumerate(encoded) if e.positions]
        tokens = attention = 0
        for group in token_budget_batches([len(encoded[i].ids) for i in todo], self.cfg.score_batch_tokens):
            idx = [todo[g] for g in group]
            heads = _shared_heads([encoded[i] for i in idx], [keys[i] for i in idx]) if share_prompt else [0] * len(idx)
            probs, n, a = self._run([encoded[i] for i in idx], heads)
            tokens, attention = tokens + n, attention + a
            for i, p in zip(idx, probs):
                out[i] = p
        self.last_tokens, self.last_attention = tokens, attention
        self.tokens_scored += tokens
        return out

    def _run(self, rows: Sequence[Encoded], heads: Sequence[int]) -> tuple[list[list[float]], int, int]:
        """Hidden states at the scored positions of ``rows``: each distinct head (``heads[r]`` shared
        tokens, 0 = none) is prefilled once, then every row's rest runs right-padded over it in one pass.
        Returns (scores per row, tokens run, attention sum)."""
        dev, body = self.device, self.body
        tokens = attention = 0
        distinct = list(dict.fromkeys((tuple(r.ids[:h]) for r, h in zip(rows, heads) if h)))
        cache, width = None, max(heads)
        if distinct:
            from frugal.inference.decoding import left_pad

            ids, mask = left_pad([list(d) for d in distinct], self.pad_id, dev)
            prompts, _ = PromptKV.prefill(body, ids, mask)
            for d in distinct:
                tokens, attention = tokens + len(d), attention + len(d) * (len(d) + 1) // 2
            which = [distinct.index(tuple(r.ids[:h])) if h else 0 for r, h in zip(rows, heads)]
            cache = prompts.rows(torch.tensor(which, device=dev))
            width = ids.shape[1]
        tails = [r.ids[h:] for r, h in zip(rows, heads)]
        tail_width = max(len(t) for t in tails)
        ids = torch.tensor([t + [self.pad_id] * (tail_width - len(t)) for t in tails], device=dev)
        head_mask = [[0] * (width - h) + [1] * h for h in heads] if cache is not None else [[] for _ in heads]
        mask = torch.tensor([hm + [1] * len(t) + [0] * (tail_width - len(t)) for hm, t in zip(head_mask, tails)], device=dev)
        positions = torch.tensor([[h + j for j in range(tail_width)] for h in heads], device=dev)
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions, **{cache_kw(): cache},
                      use_cache=cache is not None).last_hidden_state
        for h, t in zip(heads, tails):
            tokens, attention = tokens + len(t), attention + len(t) * h + len(t) * (len(t) + 1) // 2
        r_idx = torch.tensor([r for r, row in enumerate(rows) for _ in row.positions], device=dev)
        p_idx = torch.tensor([p - h for row, h in zip(rows, heads) for p in row.positions], device=dev)
        scores = self._head(hidden[r_idx, p_idx]).float().tolist()
        out, k = [], 0
        for row in rows:
            out.append(scores[k:k + len(row.positions)])
            k += len(row.positions)
        return out, tokens, attention

    def _head(self, states: torch.Tensor) -> torch.Tensor:
        if isinstance(self.fmt, QwenMathPRM):
            return torch.softmax(self.head(states.to(self.head[0].weight.dtype)).float(), dim=-1)[..., 1]
        return self.head(states)

    def score_partial(self, prompts: Sequence[Any], texts: Sequence[str]) -> list[list[float]]:
        """Step scores of possibly unfinished solutions given as text, split on ``cfg.separator``; a
        trailing step without a separator counts as a step (scored as if it ended there)."""
        return self.score(prompts, [split_steps(t, self.cfg.separator) for t in texts])

    def score_solutions(self, prompts: Sequence[Any], texts: Sequence[str], how: Optional[str] = None) -> list[float]:
        how = how or self.cfg.aggregation
        return [aggregate(s, how) for s in self.score_partial(prompts, texts)]


def _shared_heads(rows: Sequence[Encoded], keys: Sequence[str]) -> list[int]:
    """Per row, how many leading tokens it shares with every other row of its prompt (``keys``): the
    longest common token prefix of the group, ending before the group's first scored position (so every
    scored state is computed in the rows' own pass). 0 for a prompt with one row."""
    groups: dict[str, list[int]] = {}
    for r, k in enumerate(keys):
        groups.setdefault(k, []).append(r)
    heads = [0] * len(rows)
    for members in groups.values():
        if len(members) < 2:
            continue
        seqs = [rows[r].ids for r in members]
        n = min(min(len(s) for s in seqs), min(rows[r].positions[0] for r in members))
        m = next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)
        for r in members:
            heads[r] = m
    return heads
