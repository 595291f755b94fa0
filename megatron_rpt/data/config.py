"""Configs of the data pipeline and of the prompt (template + chat wrapper)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TemplateName = Literal["v0", "v1", "v2", "v3", "v4", "v5", "v6"]


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
    """Read at most this many documents (after the split), for quick runs."""
    tokenizer: str | None = None
    """Tokenizer (HF directory or 'embedded:smollm2'); default: the policy model's."""
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
    entropy_threshold: float = 1.0
    """Training keeps positions whose top-k entropy (nats) is >= this value."""
    difficulty_thresholds: tuple[float, float, float] = (0.5, 1.0, 1.5)
    """Entropy thresholds (nats) of the easy / medium / hard evaluation buckets (paper: a
    position is in a bucket when its entropy exceeds the threshold; buckets are nested)."""
    entropy_batch_tokens: int = 8192
    """Tokens per proxy forward batch (windows are packed up to this budget)."""
    entropy_window_tokens: int = 2048
    """Longest window the proxy scores at once; longer documents use overlapping windows."""
    entropy_dtype: Literal["float32", "bfloat16"] = "float32"
    """Proxy model dtype."""
    entropy_device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""

    context_tokens: int = 3840
    """Context = the last N document tokens before the target position (left-truncated);
    the paper's 4,096-token prompt limit minus room for the instruction and chat template."""
    min_context_tokens: int = 8
    """Positions with fewer preceding tokens are never samples."""
    continuation_tokens: int = 32
    """K: ground-truth continuation tokens kept per sample for the prefix-match reward."""
    max_positions_per_document: int | None = None
    """Cap on kept training positions per document (a deterministic subsample); None keeps all."""


@dataclass(kw_only=True)
class PromptConfig:
    """How a context becomes the policy's prompt."""

    template: TemplateName = "v0"
    """Next-token-reasoning template from the paper (Table 10); v0 was used for training."""
    chat_template: bool = True
    """Wrap the instruction in the tokenizer's chat template as a user turn."""
    open_think: bool = True
    """Append the reasoning opener (think_opener) after the generation prompt so the response
    starts inside the reasoning block, unless the chat template already ends with it."""
    think_opener: str = "<think>\n"
    """The opener text appended when open_think is true."""
    system_prompt: str | None = None
    """Optional system message (templates that define their own system line use theirs)."""


__all__ = ["DataConfig", "PromptConfig", "TemplateName"]
