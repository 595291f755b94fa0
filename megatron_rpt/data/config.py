"""Configs of the data pipeline and of the prompt (template + chat wrapper)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_rpt.errors import ConfigError

TemplateName = Literal["v0", "v1", "v2", "v3", "v4", "v5", "v6", "rlp"]
PromptMode = Literal["reasoning", "completion"]


@dataclass(kw_only=True)
class DataConfig:
    """Corpus reading, tokenisation, entropy filtering and sample construction."""

    corpus: str = "embedded:champ"
    """Corpus to read: 'embedded:champ' (CHAMP problems + human solutions, shipped with the
    champ-dataset package), a .jsonl file, a .txt file, a directory of .txt/.jsonl files, or a
    Megatron indexed dataset prefix (PREFIX.bin + PREFIX.idx, already tokenised with the
    policy's tokenizer). Several may be joined with commas."""
    corpus_format: Literal["auto", "champ", "jsonl", "text", "indexed"] = "auto"
    """How to read `corpus`; 'auto' decides from the file name."""
    text_field: str = "text"
    """JSONL field holding the document text."""
    id_field: str | None = None
    """Optional JSONL field holding a stable document id (default: file name + line number)."""
    on_invalid_utf8: Literal["error", "replace", "skip"] = "error"
    """Policy for text that is not valid UTF-8: stop with an error naming the file and byte
    offset, replace bad bytes with U+FFFD, or skip the document (counted in the summary)."""
    max_documents: int | None = None
    """Use at most this many documents (the first usable ones in corpus order), for quick
    runs. A document's split depends only on its id, so it does not change with this limit."""
    max_document_bytes: int = 64 << 20
    """Largest document (a .txt file, or one JSONL line) read, in bytes; a longer one stops
    preparation with an error naming it, before it is read whole (split such files first)."""
    tokenizer: str | None = None
    """Policy tokenizer (HF directory or 'embedded:smollm2'); default: the one the caller
    passes (the policy model's), else the embedded SmolLM2. Token ids, token bytes and reward
    boundaries all come from it."""
    prepared_dir: str = "runs/data/champ"
    """Directory written by tools/prepare_rpt_data.py and read by training/evaluation."""

    validation_fraction: float = 0.05
    """Fraction of documents held out for validation, chosen by a hash of the document id
    (deterministic, independent of corpus order)."""
    split_seed: int = 1234
    """Salt of the document-id hash used for the train/validation split."""

    entropy_model: str | None = None
    """Proxy causal LM that scores every position (HF directory or 'embedded:smollm2');
    default: the tokenizer's model. It must share the policy's tokenizer."""
    entropy_top_k: int = 16
    """Entropy is computed over the renormalised top-k next-token distribution (paper: 16)."""
    entropy_threshold: float = 1.5
    """Training keeps positions whose top-k entropy (nats) is >= this value. The paper gives
    no value; 1.5 is set for the embedded proxy: SmolLM2-135M's top-16 entropy on CHAMP has
    quantiles p25 0.52 / p50 1.23 / p75 1.85 / p90 2.21 (mean 1.20), so 1.5 keeps the most
    uncertain ~40% of positions (e^1.5 = 4.5 effective candidates or more) and matches the
    paper's 'hard' cut-off. Re-check it for another proxy or corpus: the prepare summary
    prints the quantiles (docs/BENCHMARKS.md has the full table)."""
    difficulty_thresholds: tuple[float, float, float] = (0.5, 1.0, 1.5)
    """Entropy thresholds (nats) of the easy / medium / hard evaluation buckets (paper: a
    position is in a bucket when its entropy exceeds the threshold; buckets are nested)."""
    entropy_batch_tokens: int = 8192
    """Tokens per proxy forward batch (windows are packed up to this budget)."""
    entropy_window_tokens: int = 2048
    """Longest window the proxy scores at once; longer documents use overlapping windows."""
    entropy_window_overlap: int = 512
    """Tokens each later window re-reads from the previous one without re-scoring them, so
    every position is scored with at least this much left context (window starts would
    otherwise look falsely high-entropy). At least 1 and below entropy_window_tokens."""
    entropy_dtype: Literal["float32", "bfloat16", "fp32", "bf16"] = "float32"
    """Proxy model dtype (the short names fp32/bf16 are read as float32/bfloat16)."""
    entropy_device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""

    context_tokens: int = 3840
    """Context = the last N document tokens before the target position (left-truncated);
    the paper's 4,096-token prompt limit minus room for the instruction and chat template."""
    min_context_tokens: int = 8
    """Positions with fewer preceding tokens are never samples."""
    continuation_tokens: int = 32
    """K: ground-truth continuation tokens kept per sample for the prefix-match reward."""
    drop_unboxable_targets: bool = True
    r"""Drop training positions whose target no ``\boxed{}`` can hold (its first token closes
    more braces than it opens, e.g. ``}``): a brace-counting parser can never reward them.
    Counted in the summary. Only reasoning mode needs this; completion mode can set it false."""
    max_positions_per_document: int | None = None
    """Cap on kept training positions per document (a deterministic subsample); None keeps all."""
    train_positions: Literal["entropy", "random_per_document"] = "entropy"
    """Which positions become training samples: 'entropy' (RPT: every eligible position whose
    proxy entropy is >= entropy_threshold, capped by max_positions_per_document) or
    'random_per_document' (RLP's protocol: one eligible position per train document, drawn
    uniformly from a hash of split_seed and the document id; no entropy filter). Validation
    positions are the same either way."""


@dataclass(kw_only=True)
class PromptConfig:
    """How a context becomes the policy's prompt."""

    mode: PromptMode = "reasoning"
    r"""'reasoning' (the paper's): the context in a template (``template``, chat wrapper,
    reasoning opener); the reward reads the last ``\boxed{}`` after ``</think>``.
    'completion': for models that cannot follow the template (e.g. SmolLM2-135M): the prompt
    is the context's own token ids, with no template and no chat wrapper; the response is the
    next token(s) and the reward matches the sampled tokens' vocabulary bytes directly (RPT
    with an empty chain of thought; docs/PROMPT_MODES.md). The other prompt fields are then
    unused."""
    template: TemplateName = "v0"
    """Next-token-reasoning template from the paper (Table 10); v0 was used for training.
    'rlp': RLP's thought prompt (train.objective=rlp)."""
    chat_template: bool = True
    """Wrap the instruction in the tokenizer's chat template as a user turn."""
    open_think: bool = True
    """Append the reasoning opener (think_opener) after the generation prompt so the response
    starts inside the reasoning block, unless the chat template already ends with it."""
    think_opener: str = "<think>\n"
    """The opener text appended when open_think is true."""
    system_prompt: str | None = None
    """Optional system message (templates that define their own system line use theirs)."""


def validate_data_config(cfg: DataConfig, prefix: str = "data.") -> DataConfig:
    """Check single-section rules; raises ConfigError naming the field.

    >>> validate_data_config(DataConfig(entropy_window_overlap=4096))
    Traceback (most recent call last):
    ...
    megatron_rpt.errors.ConfigError: data.entropy_window_overlap (4096) must be >= 1 and < data.entropy_window_tokens (2048)
    """
    positive = (
        "max_document_bytes",
        "entropy_top_k",
        "entropy_window_tokens",
        "entropy_batch_tokens",
        "continuation_tokens",
        "context_tokens",
    )
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{prefix}{name} must be >= 1, got {getattr(cfg, name)}")
    if not 1 <= cfg.entropy_window_overlap < cfg.entropy_window_tokens:
        raise ConfigError(
            f"{prefix}entropy_window_overlap ({cfg.entropy_window_overlap}) must be >= 1 and < "
            f"{prefix}entropy_window_tokens ({cfg.entropy_window_tokens})"
        )
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise ConfigError(
            f"{prefix}validation_fraction must be in [0, 1), got {cfg.validation_fraction}"
        )
    for name in ("max_documents", "max_positions_per_document"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{prefix}{name} must be >= 1 or none, got {value}")
    if cfg.min_context_tokens < 1:
        raise ConfigError(f"{prefix}min_context_tokens must be >= 1, got {cfg.min_context_tokens}")
    if cfg.context_tokens < cfg.min_context_tokens:
        raise ConfigError(f"{prefix}context_tokens must be >= {prefix}min_context_tokens")
    t = list(cfg.difficulty_thresholds)
    if len(t) != 3 or any(b <= a for a, b in zip(t, t[1:], strict=False)):
        raise ConfigError(
            f"{prefix}difficulty_thresholds must be three increasing values (easy < medium < hard), got {t}"
        )
    return cfg


__all__ = ["DataConfig", "PromptConfig", "PromptMode", "TemplateName", "validate_data_config"]
