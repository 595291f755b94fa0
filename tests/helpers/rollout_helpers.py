"""Shared helpers of the rollout tests: tiny models, a deterministic "chain" model, sglang gating."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch


@functools.cache
def smollm2_tokenizer():  # noqa: ANN201
    """The real SmolLM2 tokenizer (49,152 tokens) from the embedded asset."""
    from transformers import AutoTokenizer

    from megatron_rpt.assets import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


def tiny_llama(tok, *, seed: int = 0, tied: bool = False):  # noqa: ANN001, ANN201
    """A random 2-layer Llama over the real tokenizer's vocabulary (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger logits than the default init, so sampling is not uniform
        model.lm_head.weight.normal_(0, 0.5)
    return model


def chain_weights(model, chain: list[int]) -> list[tuple[str, torch.Tensor]]:  # noqa: ANN001
    """HF-named weights that make ``model`` greedily emit chain[i+1] after chain[i].

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's
    embedding; each chain token gets its own basis vector, and ``lm_head`` maps it to the next.
    """
    hidden = model.config.hidden_size
    assert len(chain) < hidden and len(set(chain)) == len(chain), "chain tokens must be unique"
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = []
    for name, t in state.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t = torch.zeros_like(t)
        elif name == "model.embed_tokens.weight":
            t = torch.zeros_like(t)
            t[:, hidden - 1] = 1.0  # every other token: a shared direction
            for i, tok in enumerate(chain):
                t[tok] = 0.0
                t[tok, i] = 1.0
        elif name == "lm_head.weight":
            t = torch.zeros_like(t)
            for i, (_, nxt) in enumerate(zip(chain, chain[1:], strict=False)):
                t[nxt, i] = 10.0
        out.append((name, t))
    return out


def teacher_forced_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> list[float]:  # noqa: ANN001
    """log softmax(logits / T) of each response token given prompt + preceding response."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits / t, dim=-1)
    return [logp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(response)]


def require_sglang_protocol() -> None:
    """Skip only when sglang is not installed; any other import failure is a test error.

    Installs the test-only torchvision stand-in first (tests/helpers/torchvision_standin.py).
    """
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed (CI installs it --no-deps; see the Makefile)")
    from tests.helpers.torchvision_standin import install

    install()
    import sglang.srt.managers.io_struct  # noqa: F401 - fail loudly if the install is broken
    import sglang.srt.weight_sync.tensor_bucket  # noqa: F401
