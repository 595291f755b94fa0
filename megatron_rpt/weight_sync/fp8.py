r"""Blockwise FP8 rollout weights: quantize the synced HF tensors for an FP8-served SGLang model.

The format is the DeepSeek-V3 / SGLang "fp8 with weight_block_size" checkpoint (what slime's
``tools/convert_hf_to_fp8.py --strategy block`` writes and SGLang's ``Fp8LinearMethod`` loads):

* each quantized linear weight ``W [N, K]`` is stored as ``<prefix>.weight`` in
  ``float8_e4m3fn`` plus ``<prefix>.weight_scale_inv`` in fp32 of shape
  ``[ceil(N / b), ceil(K / b)]`` (``b`` = block side, 128): one scale per ``b x b`` tile, tiles
  clipped at the right/bottom edges;
* ``weight_scale_inv`` is the *dequantization* multiplier (the name is historical):
  ``W ~= float(W_fp8) * scale_inv`` tile by tile, with ``scale_inv = amax(|tile|) / 448``, so
  the largest element of each tile maps to e4m3's largest finite value, 448;
* config.json carries ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
  "activation_scheme": "dynamic", "weight_block_size": [b, b], "modules_to_not_convert": ...}``
  (plus ``"scale_fmt": "ue8m0"`` for power-of-two scales). Activations are quantized by SGLang
  itself at run time (per token, 1 x b groups).

Which tensors: the 2-D linear weights of the decoder layers (``q/k/v/o_proj``,
``gate/up/down_proj``). Embeddings, ``lm_head``, norms and biases keep the pushed dtype, as in
slime and every FP8 serving checkpoint (the output layer is the most precision-sensitive GEMM).

Error bound (``quantize_blockwise``): e4m3 has 3 mantissa bits, so rounding a normal value
moves it by at most half a step, 2^-4 of its magnitude; below 2^-6 (subnormals, step 2^-9) by
at most 2^-10 in scaled units. With ``s`` the tile's scale, every element satisfies
``|W - deq(q(W))| <= 2^-4 |W| + 2^-10 s`` (plus fp32 rounding of the division), and since
``|W| <= 448 s`` the error never exceeds ``16 s = amax / 28`` in a tile (twice that with
power-of-two scales, which may be up to 2x larger). Zero tiles get scale 1 and stay exactly 0.

In the sync (``weight_sync.plan`` / ``gather``): ``BlockFP8`` decides per HF tensor; the plan
lists the ``*.weight_scale_inv`` siblings right after their weights, and the executor
quantizes each converted tensor before it enters a bucket. ``DequantizingEngine`` lets an
engine that cannot hold FP8 weights (the HF engine) receive the stream anyway: it simulates FP8
serving by loading the dequantized weights (weight rounding only; its activations stay in the
engine's dtype, unlike SGLang's).

Shape letters: N output rows, K input columns, nb/kb tile counts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from megatron_rpt.dtypes import short_dtype
from megatron_rpt.errors import ConfigError

if TYPE_CHECKING:
    from megatron_rpt.model.config import PrecisionConfig
    from megatron_rpt.rollout.config import RolloutConfig

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
SCALE_SUFFIX = ".weight_scale_inv"
# Linear weights of Llama-family decoder layers (HF names); the merged groups are the ones
# SGLang loads into one fused parameter (qkv_proj, gate_up_proj).
_QUANTIZED = re.compile(
    r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$"
)
_MERGED_COLUMN = re.compile(r"\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.weight$")
_ROW_PARALLEL = re.compile(r"\.(self_attn\.o_proj|mlp\.down_proj)\.weight$")


# ----------------------------------------------------------------------------- the math


def quantize_blockwise(
    w_NK: torch.Tensor, block: int = 128, *, pow2_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [N, K]`` -> (``[N, K]`` float8_e4m3fn, ``[nb, kb]`` fp32 ``scale_inv``).

    ``pow2_scales`` rounds each scale up to a power of two (the 'ue8m0' format): still no
    overflow, since the scale only grows. Raises ValueError on non-finite weights.

    >>> w = torch.tensor([[1.0, -0.5], [0.25, 0.0]])
    >>> q, s = quantize_blockwise(w, block=2)
    >>> s, q.float() * s
    (tensor([[0.0022]]), tensor([[ 1.0000, -0.5000],
            [ 0.2500,  0.0000]]))
    """
    if w_NK.dim() != 2:
        raise ValueError(f"blockwise FP8 needs a 2-D weight, got shape {tuple(w_NK.shape)}")
    n, k = w_NK.shape
    nb, kb = -(-n // block), -(-k // block)
    # Zero padding never changes a tile's amax; edge tiles are clipped back below.
    padded = F.pad(w_NK.float(), (0, kb * block - k, 0, nb * block - n))
    tiles = padded.view(nb, block, kb, block)
    amax_nk = tiles.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax_nk).all():
        raise ValueError("blockwise FP8: the weight holds inf or NaN")
    scale_nk = amax_nk / FP8_MAX
    if pow2_scales:
        scale_nk = torch.exp2(torch.ceil(torch.log2(scale_nk)))
    # Zero tiles: scale 1 (any positive value dequantizes 0 to 0). The floor keeps a tile of
    # tiny values from dividing by a scale that underflowed to 0.
    tiny = torch.finfo(torch.float32).tiny
    scale_nk = torch.where(amax_nk > 0, scale_nk.clamp(min=tiny), torch.ones_like(scale_nk))
    # Clamp: amax / (amax / 448) can round to 448 * (1 + 2^-23), which e4m3fn turns into NaN.
    q = (tiles / scale_nk[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), scale_nk


def dequantize_blockwise(
    q_NK: torch.Tensor,
    scale_inv: torch.Tensor,
    block: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise`` (up to rounding): ``float(q) * scale_inv`` per tile."""
    n, k = q_NK.shape
    if tuple(scale_inv.shape) != (-(-n // block), -(-k // block)):
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not tile a {n}x{k} weight in "
            f"{block}x{block} blocks"
        )
    full = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return (q_NK.float() * full).to(dtype)


# ----------------------------------------------------------------------------- naming


@dataclass(frozen=True)
class BlockFP8:
    """Blockwise FP8 rollout weights: which HF tensors, which block size, which scale format."""

    block_size: int = 128
    pow2_scales: bool = False

    def quantizes(self, name: str, shape: Sequence[int]) -> bool:
        """A decoder-layer linear weight (2-D) that the FP8 checkpoint stores in FP8."""
        return len(shape) == 2 and _QUANTIZED.search(name) is not None

    def output_specs(
        self, name: str, shape: Sequence[int], dtype: torch.dtype
    ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of what ``quantize`` yields for a ``shape`` tensor ``name``."""
        if not self.quantizes(name, shape):
            return [(name, tuple(shape), dtype)]
        n, k = shape
        b = self.block_size
        return [
            (name, (n, k), FP8_DTYPE),
            (scale_name(name), (-(-n // b), -(-k // b)), torch.float32),
        ]

    def quantize(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``[(name, tensor)]`` unchanged, or ``[(name, fp8), (name_scale_inv, fp32)]``."""
        if not self.quantizes(name, tensor.shape):
            return [(name, tensor)]
        try:
            q, scale = quantize_blockwise(tensor, self.block_size, pow2_scales=self.pow2_scales)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        return [(name, q), (scale_name(name), scale)]

    def quantization_config(self, not_converted: Iterable[str] = ()) -> dict[str, Any]:
        """The ``quantization_config`` entry of the served model's config.json."""
        cfg: dict[str, Any] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [self.block_size, self.block_size],
        }
        if self.pow2_scales:
            cfg["scale_fmt"] = "ue8m0"
        modules = sorted({n.removesuffix(".weight").removesuffix(".bias") for n in not_converted})
        if modules:
            cfg["modules_to_not_convert"] = modules
        return cfg


def scale_name(weight_name: str) -> str:
    """``a.b.weight`` -> ``a.b.weight_scale_inv``."""
    assert weight_name.endswith(".weight"), weight_name
    return weight_name.removesuffix(".weight") + SCALE_SUFFIX


def rollout_quantization(precision: PrecisionConfig | None) -> BlockFP8 | None:
    """The ``BlockFP8`` a ``PrecisionConfig`` asks for (None when ``rollout_fp8`` is off)."""
    if precision is None or not precision.rollout_fp8:
        return None
    return BlockFP8(precision.rollout_fp8_block_size, precision.rollout_fp8_pow2_scales)


def rollout_precision(rollout_cfg: RolloutConfig, precision: PrecisionConfig | None) -> str | None:
    """Label of the rollout engine's weight numerics ('bf16', 'fp8-block128', ...), None when
    unknown (SGLang's dtype 'auto' follows the served checkpoint)."""
    if precision is not None and precision.rollout_fp8:
        return f"fp8-block{precision.rollout_fp8_block_size}"
    dtype = rollout_cfg.dtype if rollout_cfg.engine == "hf" else rollout_cfg.sglang.dtype
    try:
        return short_dtype(dtype)
    except ConfigError:  # 'auto' (or a name SGLang knows and we do not)
        return None


# ----------------------------------------------------------------------------- streams


def dequantize_stream(
    named_tensors: Iterable[tuple[str, torch.Tensor]], block: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """FP8 weights + their ``weight_scale_inv`` -> ``dtype`` weights; other tensors pass.

    A weight is held until its scale arrives (the sync emits the scale right after it).
    """
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in named_tensors:
        if tensor.dtype == FP8_DTYPE:
            pending[name] = tensor
        elif name.endswith(SCALE_SUFFIX):
            weight = name.removesuffix(SCALE_SUFFIX) + ".weight"
            if weight not in pending:
                raise ValueError(f"{name} arrived without its FP8 weight {weight}")
            yield weight, dequantize_blockwise(pending.pop(weight), tensor, block, dtype)
        else:
            yield name, tensor
    if pending:
        raise ValueError(f"FP8 weights without weight_scale_inv: {sorted(pending)[:4]}")


class DequantizingEngine:
    """A ``RolloutEngine`` proxy for engines that hold no FP8 weights (the HF engine): the FP8
    stream of ``update_weights`` is dequantized into the engine's parameter dtype, so the
    engine serves exactly the FP8-rounded weights (activations keep the engine's dtype)."""

    def __init__(self, engine: Any, quantization: BlockFP8, dtype: torch.dtype) -> None:
        self.engine, self.quantization, self.dtype = engine, quantization, dtype

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], **kwargs: Any
    ) -> Any:
        """Dequantize the stream, then the wrapped engine's ``update_weights``."""
        stream = dequantize_stream(named_tensors, self.quantization.block_size, self.dtype)
        return self.engine.update_weights(stream, **kwargs)

    def weight_checksums(self, names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Refused: the engine holds dequantized weights, whose fingerprints cannot match the
        pushed FP8 bytes (use weight_sync.verify='probe')."""
        raise NotImplementedError(
            "weight fingerprints compare pushed bytes; an FP8 stream dequantized into the "
            "engine cannot match them: use weight_sync.verify=probe with precision.rollout_fp8"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


# ----------------------------------------------------------------------------- serving checks


def check_servable(
    hf_shapes: Mapping[str, Sequence[int]], quantization: BlockFP8, engine_tp: int = 1
) -> None:
    """Raise ConfigError when SGLang could not load these blockwise FP8 weights.

    SGLang (``Fp8LinearMethod.validate_block_quant_shapes``, 0.5.x) needs the rows of each part
    of a merged weight (q/k/v -> qkv_proj, gate/up -> gate_up_proj) per engine TP rank, and the
    columns of row-parallel weights (o_proj, down_proj) per rank when TP > 1, to be multiples of
    the block. (With fewer KV heads than engine TP ranks SGLang replicates them; this check is
    then stricter than SGLang's.)
    """
    b = quantization.block_size
    bad = []
    for name, shape in hf_shapes.items():
        if not quantization.quantizes(name, shape):
            continue
        rows, cols = shape
        if _MERGED_COLUMN.search(name) and (rows // engine_tp) % b:
            bad.append(f"{name} rows {rows} / TP {engine_tp}")
        if engine_tp > 1 and _ROW_PARALLEL.search(name) and (cols // engine_tp) % b:
            bad.append(f"{name} columns {cols} / TP {engine_tp}")
    if bad:
        raise ConfigError(
            f"precision.rollout_fp8: SGLang cannot serve {len(bad)} weight(s) in "
            f"{b}x{b} FP8 blocks (sizes must be multiples of {b}): {bad[:4]}"
            f"{' ...' if len(bad) > 4 else ''}; serve this model in bf16 "
            "(precision.rollout_fp8=false)"
        )


__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_SUFFIX",
    "BlockFP8",
    "DequantizingEngine",
    "check_servable",
    "dequantize_blockwise",
    "dequantize_stream",
    "quantize_blockwise",
    "rollout_precision",
    "rollout_quantization",
    "scale_name",
]
