"""The LoRA adapter a training run adds to its policy or PRM backbone (peft)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"lora.bias must be none|all|lora_only, got {self.bias!r}")


def apply_lora(model, cfg: LoraConfig):
    """Wrap ``model`` with a fresh LoRA adapter (peft). A model that already has one is returned as is."""
    from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        return model
    targets = cfg.target_modules
    target = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
        bias=cfg.bias, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)
