"""Structured configs of ``frugal eval`` (registered in Hydra's ConfigStore like ``train/config.py``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from hydra.core.config_store import ConfigStore

from frugal.inference.engine import EngineConfig
from frugal.tasks.config import TaskConfig
from frugal.runtime.config import (LoggerConfig, SeededRunConfig, Variant, make_variant, fill_variants, register_variants, variant_field)
from frugal.inference.models import ModelConfig
from frugal.train.prm import PRM_CONFIG_FILE, PRMConfig
from frugal.train.prm_steps import AGGREGATIONS


DEFAULT_HINTS = (
    "",  # the plain problem is always a candidate strategy
    "Compute it step by step.",
    "Write the calculation as an equation first.",
    "Work it out with the numbers one at a time.",
    "Give the result directly.",
    "Check the result before answering.",
)


# SSR's own knobs (evaluator/strategies/ssr.py explains each), under `search.ssr.*` of search=ssr.
@dataclass
class SSRConfig:
    draft_model: str = "builtin:smollm2-135m-instruct"  # the draft (`run` loads it; the target is the policy)
    draft_adapter: Optional[str] = None
    # > 0: self-speculative draft, the target cut to its first k decoder layers (LayerSkip; ssr.self_draft),
    # sharing its weights and tokenizer; draft_model / draft_adapter are then not loaded.
    draft_layers: int = 0
    # Tokens the draft proposes per round (null: up to the end of the step, SSR's step-level blocks). A
    # weak draft (few tokens accepted) wastes less target verification with short blocks (γ of token-level
    # speculative decoding).
    draft_tokens: Optional[int] = None
    hints: list[str] = field(default_factory=lambda: list(DEFAULT_HINTS))  # the strategy pool
    # How the target verifies a drafted step (ssr.py `Scored.judge`): mean (step mean log-prob >= threshold) |
    # min (every token's log-prob >= threshold) | margin (every token within `threshold` nats of the target's
    # greedy token; 0 = exactly the greedy token, lossless for a greedy target) | prm (the PRM of `prm_path`
    # judges each step, the target only rewrites rejected ones: reward-guided speculative decoding).
    score: str = "margin"
    threshold: float = 0.0  # log-prob units (<= 0); with score=prm a PRM probability in [0, 1]
    keep_prefix: bool = True  # token-level criteria: keep the accepted prefix of a rejected step
    regen_tokens: Optional[int] = 1  # after a rejection the target writes this many tokens (None: rest of the step)
    fast: int = 1  # 0: majority over all paths | 1: first answer | 2: two agreeing answers
    speculative: bool = True  # false: the target writes every step (the target-only baseline)
    greedy: bool = True  # greedy steps (false: sample at the engines' temperature)
    score_batch_size: int = 32  # rows per target scoring forward pass

    def __post_init__(self):
        if not self.hints:
            raise ValueError("search.ssr.hints must hold at least one strategy hint")
        if self.fast not in (0, 1, 2):
            raise ValueError(f"search.ssr.fast must be 0, 1 or 2, got {self.fast}")
        if self.score not in ("mean", "min", "margin", "prm"):
            raise ValueError(f"search.ssr.score must be mean|min|margin|prm, got {self.score!r}")
        if self.score == "prm" and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"search.ssr.threshold with score=prm is a PRM probability in [0, 1], got {self.threshold}")
        if self.regen_tokens is not None and self.regen_tokens < 1:
            raise ValueError(f"search.ssr.regen_tokens must be >= 1 or null, got {self.regen_tokens}")
        if self.score_batch_size < 1:
            raise ValueError(f"search.ssr.score_batch_size must be >= 1, got {self.score_batch_size}")
        if self.draft_tokens is not None and self.draft_tokens < 1:
            raise ValueError(f"search.ssr.draft_tokens must be >= 1 or null, got {self.draft_tokens}")
        if self.draft_layers < 0:
            raise ValueError(f"search.ssr.draft_layers must be >= 0 (0 = load draft_model), got {self.draft_layers}")


# ---------------------------------------------------------------------- search=<strategy>
# One dataclass per strategy, holding only the knobs that strategy reads (the module docstring of
# train/config.py says how `to_config` refuses another strategy's knob, naming the strategy it belongs to).

@dataclass
class SearchConfig(Variant):
    """Base of the strategies' configs (``search.name`` picks one: :data:`SEARCH_VARIANTS`)."""

    GROUP: ClassVar[str] = "search"


@dataclass
class GreedyConfig(SearchConfig):
    """Greedy decoding: one solution per problem (no budget, no PRM)."""

    name: str = "greedy"


@dataclass
class BudgetedConfig(SearchConfig):
    """A strategy run at several budgets N."""

    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # N: samples / beams / particles / paths

    def __post_init__(self):
        super().__post_init__()
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise ValueError(f"search.budgets must be a non-empty list of integers >= 1, got {list(self.budgets)}")


@dataclass
class MajorityConfig(BudgetedConfig):
    """Self-consistency: majority vote over N samples (no PRM)."""

    name: str = "majority"


@dataclass
class PRMSearchConfig(BudgetedConfig):
    """A PRM-guided strategy (``prm_path`` required)."""

    aggregation: str = "last"  # PRM step scores -> solution score: last | min | prod | mean

    def __post_init__(self):
        super().__post_init__()
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"search.aggregation must be one of {'|'.join(AGGREGATIONS)}, got {self.aggregation!r}")


@dataclass
class BestOfNConfig(PRMSearchConfig):
    name: str = "best_of_n"
    weighted: bool = False  # weighted majority (sum of solution scores per answer)
    # TTSPM (evaluator/ttspm.py): budget=auto stops sampling a problem once the predicted gain of one more
    # sample is below auto_eps (N in `budgets` is then the cap).
    budget: str = "fixed"  # fixed | auto
    # 0.005: on the one-digit × two-digit multiplication development split (482 problems, cap 32), 0.01
    # wrote off failing problems after 25 samples and lost 1.7 points against the fixed budget; 0.005
    # lost none at 0.68x its samples (scripts/bench_ttspm.py prints the trade-off over eps).
    auto_eps: float = 0.005
    auto_threshold: float = 0.5  # a solution whose PRM score reaches this ends a problem's sampling
    auto_pilots: int = 4  # first-round samples per problem that fit the prior
    auto_chunk: int = 2  # samples added per problem per round

    def __post_init__(self):
        super().__post_init__()
        if self.budget not in ("fixed", "auto"):
            raise ValueError(f"search.budget must be fixed|auto, got {self.budget!r}")
        if not 0 < self.auto_eps < 1 or self.auto_pilots < 1 or self.auto_chunk < 1:
            raise ValueError("search.auto_eps must be in (0, 1); search.auto_pilots and search.auto_chunk >= 1")
        if not 0.0 <= self.auto_threshold <= 1.0:
            raise ValueError(f"search.auto_threshold must be in [0, 1], got {self.auto_threshold}")


@dataclass
class BeamConfig(PRMSearchConfig):
    name: str = "beam"
    beam_width: int = 4  # keep N / beam_width beams, each expands beam_width children

    def __post_init__(self):
        super().__post_init__()
        if self.beam_width < 1:
            raise ValueError(f"search.beam_width must be >= 1, got {self.beam_width}")


@dataclass
class DVTSConfig(BeamConfig):
    """Diverse verifier tree search (evaluator/strategies/dvts.py): N / beam_width independent subtrees,
    each keeping its best of beam_width children per step."""

    name: str = "dvts"


@dataclass
class EarlyRejectionConfig(BeamConfig):
    name: str = "early_rejection"
    tau: int = 64  # tokens generated before the partial PRM score decides
    threshold: Optional[float] = None  # keep partials scoring >= threshold (>= 1 kept)
    # Share of the N candidates dropped at τ; keeps max(1, round(N·(1 − rate))). null: keep N // beam_width
    # (rate 1 − 1/beam_width).
    rejection_rate: Optional[float] = None
    er_search: str = "best_of_n"  # early rejection on top of: best_of_n | beam

    def __post_init__(self):
        super().__post_init__()
        if self.tau < 1:
            raise ValueError(f"search.tau must be >= 1, got {self.tau}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"search.threshold must be in [0, 1] or null, got {self.threshold}")
        if self.rejection_rate is not None and not 0.0 <= self.rejection_rate < 1.0:
            raise ValueError(f"search.rejection_rate must be in [0, 1) or null, got {self.rejection_rate}")
        if self.er_search not in ("best_of_n", "beam"):
            raise ValueError(f"search.er_search must be best_of_n|beam, got {self.er_search!r}")


@dataclass
class ParticleFilterConfig(PRMSearchConfig):
    name: str = "particle_filter"
    # Particle weights ∝ exp(logit(r) / weight_temperature). Not the sampling temperature (engine.temperature).
    weight_temperature: float = 1.0
    resampling: str = "systematic"  # multinomial | systematic
    # Resample when ESS < ess_threshold·N (>= 1: every step, as Puri et al.). 0.5 is the usual adaptive
    # rule (Doucet & Johansen 2009, §3.5): resample once the weights have degenerated, not while they are
    # near-uniform, where resampling only throws away distinct particles (diversity) for nothing.
    ess_threshold: float = 0.5
    # The answer: weighted_majority (sum of final PRM scores per answer, over the final particles) | best
    # (the highest final score). Weighted majority is the default because a small PRM ranks complete
    # solutions poorly: on the search benchmark's development set (held-out problems 48–95) it beat best
    # by 2–13 points at N = 4, 8 and 16 under all three particle-filter settings tried.
    final: str = "weighted_majority"

    def __post_init__(self):
        super().__post_init__()
        if self.weight_temperature <= 0:
            raise ValueError(f"search.weight_temperature must be > 0, got {self.weight_temperature}")
        if self.resampling not in ("multinomial", "systematic"):
            raise ValueError(f"search.resampling must be multinomial|systematic, got {self.resampling!r}")
        if self.ess_threshold < 0:
            raise ValueError(f"search.ess_threshold must be >= 0, got {self.ess_threshold}")
        if self.final not in ("best", "weighted_majority"):
            raise ValueError(f"search.final must be best|weighted_majority, got {self.final!r}")


@dataclass
class ParticleGibbsConfig(ParticleFilterConfig):
    name: str = "particle_gibbs"
    ess_threshold: float = 1.0  # every step, as Puri et al.'s particle Gibbs
    sweeps: int = 2  # conditional SMC sweeps; each uses budget // sweeps particles

    def __post_init__(self):
        super().__post_init__()
        if self.sweeps < 1:
            raise ValueError(f"search.sweeps must be >= 1, got {self.sweeps}")


@dataclass
class SSRSearchConfig(BudgetedConfig):
    """SSR (evaluator/strategies/ssr.py); budgets = k, the strategy paths kept per problem."""

    name: str = "ssr"
    budgets: list[int] = field(default_factory=lambda: [2])
    ssr: SSRConfig = field(default_factory=SSRConfig)


SEARCH_VARIANTS = {"greedy": GreedyConfig, "majority": MajorityConfig, "best_of_n": BestOfNConfig,
                   "beam": BeamConfig, "dvts": DVTSConfig, "early_rejection": EarlyRejectionConfig,
                   "particle_filter": ParticleFilterConfig, "particle_gibbs": ParticleGibbsConfig,
                   "ssr": SSRSearchConfig}
STRATEGIES = tuple(SEARCH_VARIANTS)
NEEDS_PRM = tuple(n for n, c in SEARCH_VARIANTS.items() if issubclass(c, PRMSearchConfig))
SEARCH_RENAMED = {"temperature": (
    "search.temperature was renamed search.weight_temperature (the particle weights' temperature, "
    "search=particle_filter|particle_gibbs); the sampling temperature is engine.temperature")}


def search_config(name: str, **knobs) -> SearchConfig:
    """The config of strategy ``name`` from Python (scripts, tests), refusing another strategy's knob as
    ``frugal eval`` does: ``search_config("beam", beam_width=2)``."""
    return make_variant("search", SEARCH_VARIANTS, name, SEARCH_RENAMED, **knobs)


@dataclass
class EvalConfig(SeededRunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    search: Any = variant_field(SEARCH_VARIANTS, "best_of_n", SEARCH_RENAMED)  # one of SEARCH_VARIANTS, by search.name
    # A PRM: a folder from `frugal train-prm`, or a Hub checkpoint (an id or its downloaded folder; see
    # evaluator/hub_prm.py); PRM-guided strategies need one. Not called `prm`: that name is the PRM recipe's
    # config group, and Hydra would read `prm=<path>` as a choice in that group.
    prm_path: Optional[str] = None
    # frugal | qwen2_math_prm | math_shepherd | rlhflow; None = detected (prm.json, config.json architectures)
    prm_family: Optional[str] = None
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    split: str = "test"  # test | train
    limit: Optional[int] = None  # first `limit` problems of the split (None = all)
    problems_per_call: int = 32  # problems whose candidates share engine calls (progress granularity)
    plots: bool = True
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        fill_variants(self)
        if self.split not in ("test", "train"):
            raise ValueError(f"split must be test|train, got {self.split!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        if self.problems_per_call < 1:
            raise ValueError(f"problems_per_call must be >= 1, got {self.problems_per_call}")
        gated = isinstance(self.search, SSRSearchConfig) and self.search.ssr.score == "prm"
        if (isinstance(self.search, PRMSearchConfig) or gated) and not self.prm_path:
            what = "search.ssr.score=prm judges drafted steps with a PRM" if gated else \
                f"search={self.search.name} is PRM-guided"
            raise ValueError(f"{what}: set prm_path=<PRM folder or Hub id> "
                             "(a folder written by `frugal train-prm`, or e.g. Qwen/Qwen2.5-Math-PRM-7B)")
        from frugal.evaluator.hub_prm import FAMILIES

        if self.prm_family is not None and self.prm_family not in FAMILIES:
            raise ValueError(f"prm_family must be one of {'|'.join(FAMILIES)} or null, got {self.prm_family!r}")


def check_prm_separator(cfg: EvalConfig) -> None:
    """The step separator is one concept with three keys: ``task.prompt.step_separator`` (how few-shot
    solutions are written), ``engine.step_delimiter`` (where the engine ends a step) and the PRM's
    ``separator`` (how it splits a solution into steps, saved in the PRM folder's prm.json by
    ``frugal train-prm``). With a ``prm_path``, refuse a config whose keys disagree with the PRM, saying
    which key to set to what. Reads prm.json only: nothing is loaded. A Hub PRM (``prm_family`` other than
    frugal, or a path without prm.json that is no Frugal folder) splits steps on ``engine.step_delimiter``:
    nothing to check."""
    if not cfg.prm_path or cfg.prm_family not in (None, "frugal"):
        return
    meta_path = Path(cfg.prm_path) / PRM_CONFIG_FILE
    local = Path(cfg.prm_path)
    if cfg.prm_family is None and not meta_path.is_file() and (not local.is_dir() or (local / "config.json").is_file()):
        return  # a Hub id or checkpoint folder (hub_prm.detect_family decides at load time)
    if not meta_path.is_file():
        raise FileNotFoundError(f"prm_path={cfg.prm_path} is not a PRM folder (no {PRM_CONFIG_FILE}) nor a Hub "
                                "checkpoint (no config.json); train one with `frugal train-prm` or name a Hub PRM")
    saved = json.loads(meta_path.read_text()).get("separator", PRMConfig.separator)
    wrong = [(key, value) for key, value in (("engine.step_delimiter", cfg.engine.step_delimiter),
                                             ("task.prompt.step_separator", cfg.task.prompt.step_separator))
             if value != saved]
    if wrong:
        fixes = "; ".join(f"{key} is {value!r}: set {key}={saved!r}" for key, value in wrong)
        hint = (" (Hydra's command line keeps a backslash as typed: '\\n' there is a backslash and an n; quote a "
                "real newline, e.g. bash $'\\n', or set the key in a YAML file, where \"\\n\" is a newline)"
                if any("\\" in value and "\\" not in saved for _, value in wrong) else "")
        raise ValueError(f"the PRM at prm_path={cfg.prm_path} splits steps on {saved!r} (its {PRM_CONFIG_FILE} "
                         f"separator), but {fixes}: one step separator for the task's prompts, the engine and "
                         f"the PRM{hint}")


def register_configs() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    register_variants("search", SEARCH_VARIANTS)
