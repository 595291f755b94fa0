"""Tiny random HF causal LMs (Llama, Llama with tied embeddings, Qwen2, Qwen3) for tests.

Hidden 64, GQA with 4 query / 2 KV heads, vocabulary 250 (so Megatron pads it to 256), random
weights from a fixed seed. Norm weights and biases are perturbed away from HF's 1 / 0
initialisation so that a mix-up between two norms or a dropped bias changes the logits.
"""

from __future__ import annotations

import json
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
