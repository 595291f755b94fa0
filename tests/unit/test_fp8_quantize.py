"""Blockwise FP8 (e4m3, 128x128) quantization of rollout weights: the math, with torch's float8.

Pinned here: the layout against a per-tile loop written independently of the vectorised code
(bit-exact FP8 bytes and scales); the derived error bound (``|W - deq| <= 2^-4 |W| + 2^-10 s``
per element, so ``<= amax / 28`` per tile; twice the tile bound with power-of-two scales);
exact round trips when every value is an e4m3 number times a power-of-two scale; zero tiles;
shapes that are not multiples of the block; non-finite weights; which HF tensors are quantized
and the names/shapes/dtypes of what is produced; the ``quantization_config``; the stream
dequantizer.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rpt.weight_sync.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    BlockFP8,
    dequantize_blockwise,
    dequantize_stream,
    quantize_blockwise,
)


def _reference(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile by tile, no padding: scale = amax / 448 (1 for a zero tile), q = cast(tile / scale)."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=FP8_DTYPE)
    scales = torch.empty(math.ceil(n / block), math.ceil(k / block))
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            amax = tile.abs().max()
            s = amax / FP8_MAX if amax > 0 else torch.tensor(1.0)
            scales[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (
                (tile / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            )
    return q, scales


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights whose rows span six orders of magnitude (tiles of very different amax)."""
    g = torch.Generator().manual_seed(seed)
    row_scale = 10 ** torch.empty(n, 1).uniform_(-3, 3, generator=g)
    return torch.randn(n, k, generator=g) * row_scale


@pytest.mark.parametrize("shape,block", [((256, 384), 128), ((130, 257), 128), ((7, 5), 4)])
def test_layout_matches_a_per_tile_reference_bit_exactly(shape, block):
    w = _weights(*shape)
    q, s = quantize_blockwise(w, block)
    q_ref, s_ref = _reference(w, block)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (-(-shape[0] // block), -(-shape[1] // block))
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def _check_bound(w: torch.Tensor, block: int, pow2: bool) -> float:
    q, s = quantize_blockwise(w, block, pow2_scales=pow2)
    err = (dequantize_blockwise(q, s, block) - w.float()).abs()
    s_full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[: w.shape[0], : w.shape[1]]
    # Half an e4m3 step: 2^-4 relative for normals, 2^-10 (in scaled units) for subnormals;
    # 1e-6 relative slack for the fp32 division and multiplication.
    bound = 2.0**-4 * w.abs() + 2.0**-10 * s_full + 1e-6 * w.abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    # Per tile: |W| <= 448 s, so the error is at most 16 s = amax / 28 (amax / 14 with pow2).
    amax = w.abs().float()
    tile_amax = torch.nn.functional.max_pool2d(amax[None, None], block, ceil_mode=True)[0, 0]
    amax_full = tile_amax.repeat_interleave(block, 0).repeat_interleave(block, 1)
    amax_full = amax_full[: w.shape[0], : w.shape[1]]
    assert bool((err <= amax_full / (14 if pow2 else 28) * (1 + 1e-6)).all())
    return float(err.max())


@pytest.mark.parametrize("pow2", [False, True])
def test_round_trip_error_bound_per_element_and_per_tile(pow2):
    w = _weights(300, 200, seed=1)
    w[:5] *= 1e-30  # tiny weights: the scale follows them down
    assert _check_bound(w, 128, pow2) > 0  # it did round
    # values far below their tile's amax land in e4m3's subnormal range: the 2^-10 s term
    w2 = torch.randn(128, 128, generator=torch.Generator().manual_seed(2))
    w2[0, 0] = 1e4
    _check_bound(w2, 128, pow2)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 200),
    k=st.integers(1, 200),
    block=st.sampled_from([16, 32, 128]),
    seed=st.integers(0, 2**16),
    pow2=st.booleans(),
)
def test_round_trip_bound_holds_for_any_shape(n, k, block, seed, pow2):
    _check_bound(_weights(n, k, seed), block, pow2)


def test_scales_and_round_trip_are_exact_for_e4m3_values_times_powers_of_two():
    g = torch.Generator().manual_seed(3)
    # every finite e4m3 value at random (bytes 0x7f / 0xff are NaN in e4m3fn)
    codes = torch.randint(0, 256, (256, 256), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38  # 1.0
    v = codes.view(FP8_DTYPE).float()
    v[0::128, 0::128] = FP8_MAX  # every tile's amax is exactly 448
    exps = torch.tensor([[-20.0, 3.0], [0.0, -7.0]])
    w = v * torch.exp2(exps).repeat_interleave(128, 0).repeat_interleave(128, 1)
    for pow2 in (False, True):
        q, s = quantize_blockwise(w, 128, pow2_scales=pow2)
        assert torch.equal(s, torch.exp2(exps))  # 448 * 2^e / 448: exact
        assert torch.equal(q.float(), v)
        assert torch.equal(dequantize_blockwise(q, s, 128), w)


def test_pow2_scales_are_powers_of_two_at_least_amax_over_448():
    w = _weights(256, 256, seed=4)
    _, s = quantize_blockwise(w, 128)
    _, s2 = quantize_blockwise(w, 128, pow2_scales=True)
    assert torch.equal(torch.exp2(torch.log2(s2).round()), s2)
    assert bool((s2 >= s).all()) and bool((s2 < 2 * s).all())


def test_zero_tiles_get_scale_one_and_stay_zero():
    w = _weights(256, 256, seed=5)
    w[:128, 128:] = 0
    q, s = quantize_blockwise(w, 128)
    assert s[0, 1] == 1.0 and bool((q[:128, 128:].float() == 0).all())
    assert torch.equal(s[1], quantize_blockwise(w[128:], 128)[1][0])  # other tiles unaffected
    q0, s0 = quantize_blockwise(torch.zeros(3, 130), 128)
    assert torch.equal(s0, torch.ones(1, 2)) and not q0.float().any()
    assert not dequantize_blockwise(q0, s0, 128).any()


def test_edge_tiles_use_only_their_real_elements():
    w = torch.ones(130, 257)
    w[129, 256] = 7.0  # alone in the bottom-right edge tile
    w[0, 0] = 3.0
    _, s = quantize_blockwise(w, 128)
    assert s.shape == (2, 3)
    assert s[1, 2] == torch.tensor(7.0) / FP8_MAX and s[0, 0] == torch.tensor(3.0) / FP8_MAX
    assert s[1, 1] == torch.tensor(1.0) / FP8_MAX


def test_bf16_input_tiny_values_and_bad_input():
    w = _weights(64, 64, seed=6).bfloat16()
    q, s = quantize_blockwise(w, 32)
    back = dequantize_blockwise(q, s, 32, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.shape == w.shape
    tiny = torch.full((4, 4), 1e-44)  # fp32 subnormal: amax / 448 underflows to 0
    q, s = quantize_blockwise(tiny, 4)
    assert bool((s > 0).all()) and torch.isfinite(dequantize_blockwise(q, s, 4)).all()
    bad = torch.ones(4, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_blockwise(bad, 4)
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.ones(8), 4)
    with pytest.raises(ValueError, match="does not tile"):
        dequantize_blockwise(q, torch.ones(2, 2), 4)


QUANTIZED = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.11.self_attn.k_proj.weight",
    "model.layers.2.self_attn.v_proj.weight",
    "model.layers.2.self_attn.o_proj.weight",
    "model.layers.3.mlp.gate_proj.weight",
    "model.layers.3.mlp.up_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
]
KEPT = [
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.norm.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.self_attn.q_norm.weight",
]


def test_which_tensors_and_what_they_become():
    spec = BlockFP8(block_size=32)
    for name in QUANTIZED:
        out = spec.quantize(name, torch.randn(64, 96))
        assert [n for n, _ in out] == [name, name.removesuffix("weight") + "weight_scale_inv"]
        assert [(tuple(t.shape), t.dtype) for _, t in out] == [
            ((64, 96), FP8_DTYPE),
            ((2, 3), torch.float32),
        ]
        specs = spec.output_specs(name, (64, 96), torch.bfloat16)
        assert specs == [(n, tuple(t.shape), t.dtype) for n, t in out]
    for name in KEPT:
        t = (
            torch.randn(64, 96)
            if name.endswith(("embed_tokens.weight", "lm_head.weight"))
            else torch.randn(64)
        )
        (out,) = spec.quantize(name, t)
        assert out[0] == name and out[1] is t
        assert spec.output_specs(name, t.shape, torch.bfloat16) == [
            (name, tuple(t.shape), torch.bfloat16)
        ]


def test_quantization_config_is_the_sglang_block_fp8_format():
    cfg = BlockFP8().quantization_config(
        ["lm_head.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"]
    )
    assert cfg == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.layers.0.self_attn.q_proj", "model.norm"],
    }
    assert BlockFP8(64, pow2_scales=True).quantization_config()["scale_fmt"] == "ue8m0"


def test_dequantize_stream_pairs_weights_with_their_scales():
    spec = BlockFP8(block_size=16)
    w = _weights(32, 48, seed=7)
    norm = torch.randn(48)
    stream = [("model.norm.weight", norm)] + spec.quantize(QUANTIZED[0], w)
    out = dict(dequantize_stream(stream, 16, torch.float32))
    assert list(out) == ["model.norm.weight", QUANTIZED[0]]
    q, s = quantize_blockwise(w, 16)
    assert (
        torch.equal(out[QUANTIZED[0]], dequantize_blockwise(q, s, 16))
        and out["model.norm.weight"] is norm
    )
    with pytest.raises(ValueError, match="without weight_scale_inv"):
        list(dequantize_stream(stream[:2], 16, torch.float32))
    with pytest.raises(ValueError, match="arrived without its FP8 weight"):
        list(dequantize_stream([stream[0], stream[2]], 16, torch.float32))
