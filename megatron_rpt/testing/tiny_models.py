"""Tiny random HF causal LMs for fast CPU tests.

1. ``save_tiny_model(kind, out_dir)`` (conversion/model tests): Llama, Llama with tied
embeddings, Qwen2, Qwen3 with stand-in tokenizer files.

Hidden 64, GQA with 4 query / 2 KV heads, vocabulary 250 (so Megatron pads it to 256), random
weights from a fixed seed. Norm weights and biases are perturbed away from HF's 1 / 0
initialisation so that a mix-up between two norms or a dropped bias changes the logits.

2. ``save_tiny_causal_lm(out_dir, tokenizer_dir)`` (data/rollout tests): a tiny random model that
shares a real tokenizer.

``save_tiny_causal_lm(out_dir, tokenizer_dir)`` writes a HF model directory (safetensors +
the tokenizer files copied from ``tokenizer_dir``) holding a 2-layer, 64-wide model whose
vocabulary covers the tokenizer. It loads with ``AutoModelForCausalLM`` like any checkpoint,
so code under test goes through the same loading path as with real weights.

``arch="mistral"`` with ``sliding_window=w`` gives a model whose receptive field is limited to
``layers * (w - 1) + 1`` tokens, which makes "same result with less left context" properties
exactly testable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

KINDS = ("llama", "llama_tied", "qwen2", "qwen3")
VOCAB = 250


def tiny_config_dict(kind: str, *, num_layers: int = 2) -> dict:
    """config.json contents of a tiny model of ``kind``."""
    family = kind.removesuffix("_tied")
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[
        family
    ]
    cfg = {
        "architectures": [arch],
        "model_type": family,
        "hidden_size": 64,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": kind.endswith("_tied"),
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
        "hidden_act": "silu",
    }
    if family == "qwen3":
        cfg["head_dim"] = 32  # != hidden / heads, as in real Qwen3 models
    return cfg


def save_tiny_model(
    kind: str,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    num_layers: int = 2,
    config_overrides: dict | None = None,
) -> Path:
    """Write a random tiny HF model (safetensors + config + stand-in tokenizer files)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    cfg_dict = tiny_config_dict(kind, num_layers=num_layers) | (config_overrides or {})
    config = AutoConfig.for_model(**cfg_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.2 * torch.randn_like(param))
    model.to(dtype).save_pretrained(out)
    # Stand-ins for tokenizer files: conversion must carry them along unchanged.
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}) + "\n")
    return out


def hf_logits(model_dir: str | Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Fp32 logits ``[B, S, V]`` of an HF model directory (loaded in fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens_BS).logits.float()

# ----------------------------------------------------------------------------- with a real tokenizer



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
