"""Structured configs of ``frugal eval`` (registered in Hydra's ConfigStore like ``train/config.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from frugal.evaluator.engine import EngineConfig
from frugal.tasks.config import TaskConfig
from frugal.train.config import LoggerConfig
from frugal.train.models import ModelConfig
from frugal.train.prm_steps import AGGREGATIONS

STRATEGIES = ("greedy", "majority", "best_of_n", "beam", "early_rejection", "particle_filter", "particle_gibbs", "ssr")
NEEDS_PRM = ("best_of_n", "beam", "early_rejection", "particle_filter", "particle_gibbs")


DEFAULT_HINTS = (
    "",  # the plain problem is always a candidate strategy
    "Compute it step by step.",
    "Write the calculation as an equation first.",
    "Work it out with the numbers one at a time.",
    "Give the result directly.",
    "Check the result before answering.",
)


# SSR's own knobs (evaluator/strategies/ssr.py explains each); here so `search.ssr.*` is validated.
@dataclass
class SSRConfig:
    draft_model: str = "builtin:smollm2-135m-instruct"  # the draft (`run` loads it; the target is the policy)
    draft_adapter: Optional[str] = None
    hints: list[str] = field(default_factory=lambda: list(DEFAULT_HINTS))  # the strategy pool
    # How the target verifies a drafted step (ssr.py `Scored.judge`): mean (step mean log-prob >= threshold) |
    # min (every token's log-prob >= threshold) | margin (every token within `threshold` nats of the target's
    # greedy token; 0 = exactly the greedy token, lossless for a greedy target).
    score: str = "margin"
    threshold: float = 0.0  # log-prob units (<= 0)
    keep_prefix: bool = True  # token-level criteria: keep the accepted prefix of a rejected step
    regen_tokens: Optional[int] = 1  # after a rejection the target writes this many tokens (None: rest of the step)
    fast: int = 1  # 0: majority over all paths | 1: first answer | 2: two agreeing answers
    speculative: bool = True  # false: the target writes every step (the target-only baseline)
    greedy: bool = True  # greedy steps (false: sample at the engines' temperature)
    score_batch_size: int = 32  # rows per target scoring forward pass

    def __post_init__(self):
        if not self.hints:
            raise ValueError("ssr.hints must hold at least one strategy hint")
        if self.fast not in (0, 1, 2):
            raise ValueError(f"ssr.fast must be 0, 1 or 2, got {self.fast}")
        if self.score not in ("mean", "min", "margin"):
            raise ValueError(f"ssr.score must be mean|min|margin, got {self.score!r}")
        if self.regen_tokens is not None and self.regen_tokens < 1:
            raise ValueError(f"ssr.regen_tokens must be >= 1 or null, got {self.regen_tokens}")
        if self.score_batch_size < 1:
            raise ValueError(f"ssr.score_batch_size must be >= 1, got {self.score_batch_size}")


@dataclass
class SearchConfig:
    name: str = "best_of_n"  # one of STRATEGIES
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # N: samples / beams / particles
    aggregation: str = "last"  # PRM step scores -> solution score: last | min | prod | mean
    weighted: bool = False  # best_of_n: weighted majority (sum of solution scores per answer)
    beam_width: int = 4  # beam / early rejection: keep N / beam_width, each expands beam_width children
    tau: int = 64  # early rejection: tokens generated before the partial PRM score decides
    threshold: Optional[float] = None  # early rejection: keep partials scoring >= threshold (>= 1 kept)
    # Early rejection (best_of_n): share of the N candidates dropped at τ; keeps max(1, round(N·(1 − rate))).
    # null: keep N // beam_width (rate 1 − 1/beam_width).
    rejection_rate: Optional[float] = None
    er_search: str = "best_of_n"  # early rejection on top of: best_of_n | beam
    temperature: float = 1.0  # particle filtering: weights ∝ exp(logit(r) / temperature)
    resampling: str = "systematic"  # multinomial | systematic
    # Resample when ESS < ess_threshold·N (>= 1: every step, as Puri et al.). 0.5 is the usual adaptive
    # rule (Doucet & Johansen 2009, §3.5): resample once the weights have degenerated, not while they are
    # near-uniform, where resampling only throws away distinct particles (diversity) for nothing.
    ess_threshold: float = 0.5
    # Particle filtering's answer: weighted_majority (sum of final PRM scores per answer, over the final
    # particles) | best (the highest final score). Weighted majority is the default because a small PRM
    # ranks complete solutions poorly: on the search benchmark's development set (held-out problems 48–95)
    # it beat best by 2–13 points at N = 4, 8 and 16 under all three particle-filter settings tried.
    final: str = "weighted_majority"
    sweeps: int = 2  # particle Gibbs: sweeps; each uses budget // sweeps particles
    # TTSPM (evaluator/ttspm.py): budget=auto lets best_of_n stop sampling a problem once the predicted
    # gain of one more sample is below auto_eps (N in `budgets` is then the cap).
    budget: str = "fixed"  # fixed | auto
    # 0.005: on the one-digit × two-digit multiplication development split (482 problems, cap 32), 0.01
    # wrote off failing problems after 25 samples and lost 1.7 points against the fixed budget; 0.005
    # lost none at 0.68x its samples (scripts/bench_ttspm.py prints the trade-off over eps).
    auto_eps: float = 0.005
    auto_threshold: float = 0.5  # a solution whose PRM score reaches this ends a problem's sampling
    auto_pilots: int = 4  # first-round samples per problem that fit the prior
    auto_chunk: int = 2  # samples added per problem per round
    ssr: SSRConfig = field(default_factory=SSRConfig)

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ValueError(f"search.name must be one of {'|'.join(STRATEGIES)}, got {self.name!r}")
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise ValueError(f"search.budgets must be a non-empty list of integers >= 1, got {list(self.budgets)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"search.aggregation must be one of {'|'.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.beam_width < 1 or self.tau < 1 or self.sweeps < 1:
            raise ValueError("search.beam_width, search.tau and search.sweeps must be >= 1")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"search.threshold must be in [0, 1] or null, got {self.threshold}")
        if self.rejection_rate is not None and not 0.0 <= self.rejection_rate < 1.0:
            raise ValueError(f"search.rejection_rate must be in [0, 1) or null, got {self.rejection_rate}")
        if self.er_search not in ("best_of_n", "beam"):
            raise ValueError(f"search.er_search must be best_of_n|beam, got {self.er_search!r}")
        if self.temperature <= 0:
            raise ValueError(f"search.temperature must be > 0, got {self.temperature}")
        if self.resampling not in ("multinomial", "systematic"):
            raise ValueError(f"search.resampling must be multinomial|systematic, got {self.resampling!r}")
        if self.ess_threshold < 0:
            raise ValueError(f"search.ess_threshold must be >= 0, got {self.ess_threshold}")
        if self.budget not in ("fixed", "auto"):
            raise ValueError(f"search.budget must be fixed|auto, got {self.budget!r}")
        if self.budget == "auto" and self.name != "best_of_n":
            raise ValueError(f"search.budget=auto is implemented for best_of_n, not {self.name}")
        if not 0 < self.auto_eps < 1 or self.auto_pilots < 1 or self.auto_chunk < 1:
            raise ValueError("search.auto_eps must be in (0, 1); search.auto_pilots and search.auto_chunk >= 1")
        if self.final not in ("best", "weighted_majority"):
            raise ValueError(f"search.final must be best|weighted_majority, got {self.final!r}")


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    # A PRM folder (from `frugal train-prm`); PRM-guided strategies need one. Not called `prm`: that name is
    # the PRM recipe's config group, and Hydra would read `prm=<path>` as a choice in that group.
    prm_path: Optional[str] = None
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    split: str = "test"  # test | train
    limit: Optional[int] = None  # first `limit` problems of the split (None = all)
    seed: int = 0
    problems_per_call: int = 32  # problems whose candidates share engine calls (progress granularity)
    output_dir: Optional[str] = None  # default: Hydra's run dir outputs/eval/<date>/<time>
    device: str = "auto"  # auto | cpu | cuda
    num_threads: Optional[int] = None
    plots: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.split not in ("test", "train"):
            raise ValueError(f"split must be test|train, got {self.split!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        if self.problems_per_call < 1:
            raise ValueError(f"problems_per_call must be >= 1, got {self.problems_per_call}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto|cpu|cuda, got {self.device!r}")
        if self.search.name in NEEDS_PRM and not self.prm_path:
            raise ValueError(f"search={self.search.name} is PRM-guided: set prm_path=<PRM folder> "
                             "(a folder written by `frugal train-prm`)")


def register_configs() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
