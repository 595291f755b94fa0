"""Config of the next-token evaluation (``cfg.eval``): what is measured, on which positions, how.

Defaults follow the RPT paper where it says something (docs/METHOD.md §8): difficulty
buckets at entropy > 0.5 / 1.0 / 1.5 nats (nested), sampling at temperature 0.8, the v0
template, 8 samples per position. The paper leaves the evaluation sample count, temperature and
judging rule unspecified; the prefix-match reward (``reward.name``) is the judge here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_rpt.data.config import TemplateName
from megatron_rpt.errors import ConfigError

EvalMode = Literal["standard", "reasoning", "both"]


@dataclass(kw_only=True)
class EvalConfig:
    """Next-token accuracy (standard argmax and next-token reasoning) by difficulty bucket."""

    mode: EvalMode = "both"
    """'standard': greedy argmax of one forward pass equals the true next token; 'reasoning':
    sample a chain of thought + a boxed prediction and judge it with the reward; 'both'."""
    difficulty_thresholds: tuple[float, float, float] = (0.5, 1.0, 1.5)
    """Entropy thresholds (nats) of the easy / medium / hard buckets. A position is in every
    bucket whose threshold its entropy exceeds (nested, as in the paper)."""
    entropy_model: str | None = None
    """Model whose top-k entropy defines the buckets (HF directory or 'embedded:smollm2'; must
    share the data's tokenizer). None: the entropies stored in the prepared data (the data
    proxy's), or for a raw corpus the first evaluated model. The paper buckets with the
    evaluated base model (R1-Distill-Qwen-14B), not with the training proxy."""
    entropy_top_k: int = 16
    """k of the top-k entropy when entropies are (re)computed here (paper: 16)."""
    max_positions: int | None = None
    """Evaluate at most this many positions (a deterministic subsample, stratified by bucket
    with proportional allocation, so every nested bucket's estimate stays unbiased); None:
    every eligible position of the split."""
    reasoning_max_positions: int | None = 200
    """Reasoning mode uses at most this many of those positions (a stratified subsample of the
    standard-mode positions, so they are a subset of them); None: all of them. Each position
    costs n_samples generations of up to max_new_tokens tokens."""
    template: TemplateName | None = None
    """Prompt template for reasoning mode (v0..v6, RPT paper Table 10); None: prompt.template."""
    judge: Literal["prefix_match", "first_token"] = "prefix_match"
    """Registered reward that decides whether a reasoning sample is correct: 'prefix_match'
    (the paper's reward) or 'first_token' (the prediction's first token is x_t)."""
    n_samples: int = 8
    """Samples per position in reasoning mode (Random@1 is their mean reward)."""
    pass_k: int = 8
    """k of Pass@k (unbiased estimator of Chen et al. 2021; reported when n_samples >= k)."""
    temperature: float = 0.8
    """Sampling temperature in reasoning mode (paper's rollout value; 0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass in reasoning mode (1 disables it)."""
    max_new_tokens: int = 8192
    """Longest reasoning response in tokens (the paper's 8k training length)."""
    stop_at_final_box: bool = False
    r"""End a reasoning response at its first closed ``\boxed{}`` after ``</think>``, as training
    does with ``rollout.stop_at_final_box`` (set both alike so training and evaluation read the
    same box; false: the last box of the full response, the paper's reading)."""
    context_tokens: int | None = None
    """Context = the last N document tokens before the position; None: data.context_tokens of
    the prepared data (3840 by default)."""
    engine: Literal["auto", "hf", "sglang"] = "auto"
    """Reasoning-mode rollout engine: 'hf' (transformers, CPU or GPU), 'sglang' (GPU; uses
    rollout.sglang settings), or 'auto': SGLang when its runtime and a GPU are present, else
    HF."""
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "float32"
    """Weight dtype for standard-mode forwards and the HF rollout engine (fp32/bf16/fp16 are
    read as torch's names)."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda[:i]'."""
    window_tokens: int | None = None
    """Longest window of one standard-mode forward; longer documents use overlapping windows.
    None: the model's max_position_embeddings."""
    window_overlap: int = 512
    """Tokens each later window re-reads from the previous one without re-scoring them, so
    every position keeps at least this much left context."""
    batch_tokens: int = 8192
    """Tokens per standard-mode forward batch (windows of several documents are packed)."""
    logits_chunk_tokens: int = 1024
    """Standard mode applies the output layer to this many positions at a time (argmax only),
    so full-vocabulary logits of a whole batch are never held at once."""
    reasoning_batch_prompts: int = 64
    """Prompts per generate call in reasoning mode (each has n_samples responses)."""
    seed: int = 1234
    """Seed of the position subsample and of reasoning-mode sampling (numbers are
    reproducible for a fixed seed, engine and batch settings)."""


def _check_thresholds(thresholds: tuple[float, ...], key: str) -> None:
    t = list(thresholds)
    if len(t) != 3 or any(b <= a for a, b in zip(t, t[1:], strict=False)):
        raise ConfigError(f"{key} must be three increasing values (easy < medium < hard), got {t}")


def validate_eval_config(cfg: EvalConfig, prefix: str = "eval.") -> EvalConfig:
    """Check single-section rules; raises ConfigError naming the field.

    >>> validate_eval_config(EvalConfig(difficulty_thresholds=(1.0, 0.5, 1.5)))
    Traceback (most recent call last):
    ...
    megatron_rpt.errors.ConfigError: eval.difficulty_thresholds must be three increasing values (easy < medium < hard), got [1.0, 0.5, 1.5]
    """
    _check_thresholds(cfg.difficulty_thresholds, f"{prefix}difficulty_thresholds")
    positive = (
        "entropy_top_k",
        "n_samples",
        "pass_k",
        "max_new_tokens",
        "window_overlap",
        "batch_tokens",
        "logits_chunk_tokens",
        "reasoning_batch_prompts",
    )
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{prefix}{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_positions", "reasoning_max_positions", "context_tokens", "window_tokens"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{prefix}{name} must be >= 1 or none, got {value}")
    if cfg.window_tokens is not None and cfg.window_overlap >= cfg.window_tokens:
        raise ConfigError(
            f"{prefix}window_overlap ({cfg.window_overlap}) must be < {prefix}window_tokens "
            f"({cfg.window_tokens})"
        )
    if not (cfg.temperature >= 0.0):
        raise ConfigError(f"{prefix}temperature must be >= 0, got {cfg.temperature}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"{prefix}top_p must be in (0, 1], got {cfg.top_p}")
    return cfg


__all__ = ["EvalConfig", "EvalMode", "validate_eval_config"]
