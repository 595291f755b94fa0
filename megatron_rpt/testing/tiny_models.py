"""Tiny randomly initialised causal LMs that share a real tokenizer, for fast CPU tests.

``save_tiny_causal_lm(out_dir, tokenizer_dir)`` writes a HF model directory (safetensors +
the tokenizer files copied from ``tokenizer_dir``) holding a 2-layer, 64-wide model whose
vocabulary covers the tokenizer. It loads with ``AutoModelForCausalLM`` like any checkpoint,
so code under test goes through the same loading path as with real weights.

``arch="mistral"`` with ``sliding_window=w`` gives a model whose receptive field is limited to
``layers * (w - 1) + 1`` tokens, which makes "same result with less left context" properties
exactly testable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def save_tiny_causal_lm(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    vocab_size: int | None = None,
    arch: str = "llama",
    sliding_window: int | None = None,
    hidden_size: int = 64,
    layers: int = 2,
    initializer_range: float = 0.3,
    seed: int = 0,
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` (or Mistral) + the tokenizer to ``out_dir``.

    ``initializer_range`` is larger than usual so the random model's next-token distributions
    are not all near-uniform (a spread of top-k entropies to filter on).
    """
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if vocab_size is None:
        vocab_size = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy(src, out_dir / name)
    return out_dir


__all__ = ["save_tiny_causal_lm"]
