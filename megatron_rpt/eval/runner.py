"""One evaluation: several models x {standard, reasoning} on the same positions.

``evaluate(models, eval_set, cfg=...)`` picks the positions once (a stratified subsample when
``eval.max_positions`` is set, and a stratified subsample of those for reasoning mode), then
for each model runs the modes ``eval.mode`` asks for and returns an ``EvalRun``: one
``ModelResult`` per table row (standard accuracy, Random@1, Pass@k). Every model is scored on
identical positions, so rows are directly comparable (a base model and its RPT-trained
checkpoint; RPT and the plain-NTP control).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from megatron_rpt.data.config import PromptConfig
from megatron_rpt.data.entropy import EntropyScorer
from megatron_rpt.data.tokens import ByteVocabulary, load_tokenizer, token_byte_table
from megatron_rpt.eval.config import EvalConfig
from megatron_rpt.eval.dataset import EvalSet, load_corpus, load_prepared_split, rescore_entropy
from megatron_rpt.eval.metrics import (
    BucketScore,
    bucket_masks,
    bucket_mean,
    stratified_subsample,
    summarize,
)
from megatron_rpt.eval.models import (
    ModelRef,
    ResolvedModel,
    check_tokenizer,
    load_tokenizer_of,
    tokenizer_dir,
)
from megatron_rpt.eval.next_token import ForwardStats, load_causal_lm, standard_correct
from megatron_rpt.rollout.config import RolloutConfig
from megatron_rpt.rollout.hf_engine import HFEngine
from megatron_rpt.rollout.sglang_engine import SGLangEngine
from megatron_rpt.rollout.types import RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from megatron_rpt.data.config import DataConfig
    from megatron_rpt.rollout.config import RolloutConfig

logger = logging.getLogger(__name__)

EvalEngineFactory = Callable[[ResolvedModel, Any, Any], RolloutEngine]
"""(model, loaded HF model or None, tokenizer) -> a rollout engine for reasoning mode."""


@dataclass
class ModelResult:
    """One row of the table: a model in one mode, scored with one metric."""

    model: str
    path: str
    mode: str
    """'standard' or 'reasoning'."""
    metric: str
    """'accuracy' (standard), 'random@1' or 'pass@k' (reasoning)."""
    buckets: dict[str, BucketScore]
    """easy / medium / hard (nested) and all."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Unweighted mean of easy / medium / hard (the paper's derived 'mean')."""
        return bucket_mean(self.buckets)


@dataclass
class EvalRun:
    """Everything an evaluation produced (``report.py`` renders it)."""

    results: list[ModelResult]
    standard_set: EvalSet
    reasoning_set: EvalSet | None
    config: EvalConfig
    prompt: PromptConfig
    seconds: float = 0.0
    device: str = "cpu"
    engine: str = "none"
    """Reasoning-mode engine actually used ('hf', 'sglang'; 'none' without reasoning)."""

    @property
    def has_standard(self) -> bool:
        """Standard accuracy was measured."""
        return any(r.mode == "standard" for r in self.results)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_engine(engine: str) -> str:
    """'auto' -> 'sglang' when the SGLang runtime and a GPU are usable, else 'hf'."""
    if engine != "auto":
        return engine
    from megatron_rpt.capabilities import have_sglang_runtime

    return "sglang" if have_sglang_runtime() else "hf"


def select_positions(eval_set: EvalSet, cfg: EvalConfig) -> tuple[EvalSet, EvalSet | None]:
    """(standard positions, reasoning positions or None) for ``cfg`` (see module docstring)."""
    t = cfg.difficulty_thresholds
    std = eval_set.subset(stratified_subsample(eval_set.entropy_P, t, cfg.max_positions, cfg.seed))
    if cfg.mode == "standard":
        return std, None
    idx = stratified_subsample(std.entropy_P, t, cfg.reasoning_max_positions, cfg.seed + 1)
    return std, std.subset(idx)


def eval_engine_factory(
    cfg: EvalConfig, rollout_cfg: RolloutConfig | None = None
) -> EvalEngineFactory:
    """HF engine over the already loaded model, or an SGLang server for ``eval.engine=sglang``."""

    def build(model: ResolvedModel, hf_model: Any, tokenizer: Any) -> RolloutEngine:
        if resolve_engine(cfg.engine) == "hf":
            if hf_model is None:
                hf_model = load_causal_lm(
                    model.hf_dir, dtype=cfg.dtype, device=resolve_device(cfg.device)
                )
            rows = getattr(rollout_cfg, "max_batch_rows", 64)
            return HFEngine(hf_model, tokenizer, max_batch_rows=rows)
        import dataclasses

        rcfg = dataclasses.replace(rollout_cfg or RolloutConfig(), engine="sglang")
        return SGLangEngine.launch(rcfg, str(model.hf_dir), seed=cfg.seed)

    return build


def evaluate(
    models: list[ResolvedModel],
    eval_set: EvalSet,
    *,
    cfg: EvalConfig,
    prompt: PromptConfig,
    require_think_close: bool = True,
    engine_factory: EvalEngineFactory | None = None,
) -> EvalRun:
    """Score every model in the modes ``cfg.mode`` asks for (module docstring)."""
    t0 = time.perf_counter()
    std_set, reason_set = select_positions(eval_set, cfg)
    logger.info(
        "evaluating %d model(s) on %d positions (%s) from %s",
        len(models), len(std_set), _counts(std_set, cfg), eval_set.source,
    )  # fmt: skip
    if reason_set is not None:
        logger.info(
            "reasoning mode on %d positions (%s)", len(reason_set), _counts(reason_set, cfg)
        )
        budget = len(reason_set) * cfg.n_samples * cfg.max_new_tokens
        if resolve_device(cfg.device) == "cpu" and budget > 1_000_000:
            logger.warning(
                "reasoning mode may generate up to %.1fM tokens per model on CPU (positions x "
                "n_samples x max_new_tokens); this can take hours. Lower "
                "eval.reasoning_max_positions / n_samples / max_new_tokens for a quick check.",
                budget / 1e6,
            )
    factory = engine_factory or eval_engine_factory(cfg)
    device = resolve_device(cfg.device)
    engine = resolve_engine(cfg.engine) if reason_set is not None else "none"
    run = EvalRun([], std_set, reason_set, cfg, prompt, device=device, engine=engine)
    for model in models:
        tokenizer = load_tokenizer(str(model.hf_dir))
        hf_model = None
        if cfg.mode in ("standard", "both") or engine == "hf":
            hf_model = load_causal_lm(model.hf_dir, dtype=cfg.dtype, device=device)
        if cfg.mode in ("standard", "both"):
            run.results.append(_standard(model, hf_model, std_set, reason_set, cfg))
        if engine == "sglang" and hf_model is not None:
            hf_model = None  # free the accelerator for the SGLang server
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if reason_set is not None:
            run.results.extend(
                _reasoning(model, hf_model, tokenizer, reason_set, cfg, prompt, require_think_close, factory)
            )  # fmt: skip
        del hf_model
    run.seconds = time.perf_counter() - t0
    return run


def _counts(s: EvalSet, cfg: EvalConfig) -> str:
    masks = bucket_masks(s.entropy_P, cfg.difficulty_thresholds)
    return ", ".join(f"{k} {int(v.sum())}" for k, v in masks.items() if k != "all")


def _standard(
    model: ResolvedModel,
    hf_model: Any,
    std_set: EvalSet,
    reason_set: EvalSet | None,
    cfg: EvalConfig,
) -> ModelResult:
    stats = ForwardStats()
    correct_P = standard_correct(
        hf_model,
        std_set,
        window_tokens=cfg.window_tokens,
        window_overlap=cfg.window_overlap,
        batch_tokens=cfg.batch_tokens,
        logits_chunk_tokens=cfg.logits_chunk_tokens,
        stats=stats,
    )
    masks = bucket_masks(std_set.entropy_P, cfg.difficulty_thresholds)
    extra: dict[str, Any] = {
        "forward_calls": stats.forward_calls,
        "windows": stats.windows,
        "tokens_read": stats.tokens,
        "seconds": round(stats.seconds, 2),
    }
    if reason_set is not None:
        # The same model's standard accuracy on exactly the reasoning positions (paired view).
        key = {
            (d, t): c for d, t, c in zip(std_set.doc_P, std_set.position_P, correct_P, strict=True)
        }
        sub = np.array(
            [key[(d, t)] for d, t in zip(reason_set.doc_P, reason_set.position_P, strict=True)]
        )
        sub_masks = bucket_masks(reason_set.entropy_P, cfg.difficulty_thresholds)
        extra["on_reasoning_positions"] = {
            k: v.to_dict() for k, v in summarize(sub, sub_masks).items()
        }
    logger.info("%s standard: %s", model.name, _fmt(summarize(correct_P, masks)))
    return ModelResult(
        model.name, model.path, "standard", "accuracy", summarize(correct_P, masks), extra
    )


def _reasoning(
    model: ResolvedModel,
    hf_model: Any,
    tokenizer: Any,
    reason_set: EvalSet,
    cfg: EvalConfig,
    prompt: PromptConfig,
    require_think_close: bool,
    factory: EvalEngineFactory,
) -> list[ModelResult]:
    import dataclasses

    from megatron_rpt.eval.reasoning import run_reasoning

    params = SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        n=cfg.n_samples,
        seed=cfg.seed,
        stop_at_final_box=cfg.stop_at_final_box and prompt.mode == "reasoning",
    )
    prompt_cfg = dataclasses.replace(prompt, template=cfg.template or prompt.template)
    engine = factory(model, hf_model, tokenizer)
    try:
        outcome = run_reasoning(
            engine, reason_set, tokenizer, prompt_cfg=prompt_cfg, params=params, judge=cfg.judge,
            require_think_close=require_think_close, batch_prompts=cfg.reasoning_batch_prompts,
            seed=cfg.seed,
        )  # fmt: skip
    finally:
        engine.shutdown()
    masks = bucket_masks(reason_set.entropy_P, cfg.difficulty_thresholds)
    extra = {**outcome.diagnostics(), "examples": outcome.examples}
    rows = [
        ModelResult(
            model.name,
            model.path,
            "reasoning",
            "random@1",
            summarize(outcome.random_at_1(), masks),
            extra,
        )
    ]
    pass_k = outcome.pass_at(cfg.pass_k)
    if pass_k is None:
        logger.warning(
            "eval.pass_k=%d > eval.n_samples=%d: Pass@k is not reported", cfg.pass_k, cfg.n_samples
        )
    else:
        rows.append(
            ModelResult(
                model.name, model.path, "reasoning", f"pass@{cfg.pass_k}", summarize(pass_k, masks)
            )
        )
    logger.info("%s reasoning Random@1: %s", model.name, _fmt(rows[0].buckets))
    return rows


def _fmt(scores: dict[str, BucketScore]) -> str:
    return ", ".join(
        f"{k} {100 * v.value:.2f}% (n={v.n})" if not math.isnan(v.value) else f"{k} - (n=0)"
        for k, v in scores.items()
    )


def build_eval_set(
    refs: list[Any],
    eval_cfg: EvalConfig,
    data_cfg: DataConfig,
    *,
    prepared_dir: str | None = None,
    split: str = "valid",
    corpus: str | None = None,
    hf_config: str | None = None,
) -> EvalSet:
    """The positions to evaluate, with every model's tokenizer checked against them first.

    From ``prepared_dir`` (a held-out split of prepared data) or, with ``corpus``, any corpus
    ``data_cfg`` can read, tokenised with the first model's tokenizer and scored on the fly by
    ``eval.entropy_model`` (default: the first model). With a prepared split and
    ``eval.entropy_model`` set, the positions are re-bucketed by that model's entropies.
    """
    import dataclasses

    entropy_ref = (
        ModelRef("entropy_model", eval_cfg.entropy_model) if eval_cfg.entropy_model else None
    )
    if corpus is not None:
        data_cfg = dataclasses.replace(
            data_cfg,
            corpus=corpus,
            context_tokens=eval_cfg.context_tokens or data_cfg.context_tokens,
        )
        tokenizer = load_tokenizer_of(refs[0], hf_config)
        scorer_ref = entropy_ref or refs[0]
        if entropy_ref is not None:
            check_tokenizer(entropy_ref, load_tokenizer_of(entropy_ref), _digest(tokenizer), corpus)
        scorer = _scorer(
            tokenizer_dir(scorer_ref, hf_config), len(_table(tokenizer)), eval_cfg, data_cfg
        )
        eval_set = load_corpus(data_cfg, tokenizer, scorer, scorer_name=scorer_ref.path)
    else:
        eval_set = load_prepared_split(
            prepared_dir or data_cfg.prepared_dir, split, context_tokens=eval_cfg.context_tokens
        )
    for ref in refs + ([entropy_ref] if entropy_ref else []):
        check_tokenizer(
            ref, load_tokenizer_of(ref, hf_config), eval_set.tokenizer_digest, eval_set.source
        )
    if corpus is None and entropy_ref is not None:
        scorer = _scorer(tokenizer_dir(entropy_ref), len(eval_set.table), eval_cfg, data_cfg)
        eval_set = rescore_entropy(eval_set, scorer, scorer_name=entropy_ref.path)
    return eval_set


def _table(tokenizer: Any) -> list[bytes]:
    return token_byte_table(tokenizer)


def _digest(tokenizer: Any) -> str:
    return ByteVocabulary.from_tokenizer(tokenizer).digest()


def _scorer(path: Any, vocab_size: int, cfg: EvalConfig, data_cfg: DataConfig) -> Any:
    window = cfg.window_tokens or data_cfg.entropy_window_tokens
    return EntropyScorer.from_pretrained(
        path,
        vocab_size=vocab_size,
        dtype=cfg.dtype,
        device=cfg.device,
        top_k=cfg.entropy_top_k,
        window_tokens=window,
        window_overlap=min(cfg.window_overlap, window - 1),
        batch_tokens=cfg.batch_tokens,
    )


__all__ = [
    "EvalEngineFactory",
    "build_eval_set",
    "EvalRun",
    "ModelResult",
    "eval_engine_factory",
    "evaluate",
    "resolve_device",
    "resolve_engine",
    "select_positions",
]
