"""FP8 rollout weights from a TP=2 Megatron model (gloo, 2 processes): the quantization happens
after the TP all-gather, on full tensors, so every pushed FP8 byte and scale equals what a
TP=1 model with the same weights produces (per-shard scales would differ wherever a 32x32
block's amax lies in the other shard), and the HF engine behind ``DequantizingEngine`` holds
exactly the dequantized weights.
"""

from __future__ import annotations

import torch

from megatron_rpt.testing.distributed import run_distributed
from megatron_rpt.testing.tiny_models import save_tiny_model

BLOCK = 32


def _portable(pairs):
    """FP8 tensors as (uint8 bytes, True): the result queue's pickling rejects float8 storages."""
    return [
        (n, (t.view(torch.uint8), True) if t.dtype == torch.float8_e4m3fn else (t, False))
        for n, t in pairs
    ]


def _restore(pairs):
    return [(n, t.view(torch.float8_e4m3fn) if fp8 else t) for n, (t, fp8) in pairs]


class _Recording:
    """Engine proxy that keeps a copy of every streamed tensor, then forwards the stream."""

    def __init__(self, inner):
        self.inner, self.seen = inner, {}

    def update_weights(self, named_tensors, **kwargs):
        def record():
            for name, tensor in named_tensors:
                self.seen[name] = tensor.clone()
                yield name, tensor

        return self.inner.update_weights(record(), **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _built(hf_dir, tp):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from tests.helpers.updates import perturb_parameters

    groups = initialize_model_parallel(tp, 1)
    seed_model_parallel(0, groups)
    built = build_pretrained(
        ModelConfig(hf_path=hf_dir, dtype="bf16"),
        ParallelConfig(tensor_model_parallel_size=tp),
        groups,
    )
    perturb_parameters(built.chunks, built.arch, built.vocab.padded, groups.tp_rank, tp)
    return built, groups


def _run(rank, world_size, hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rpt.assets import smollm2_dir
    from megatron_rpt.conversion.converter import iter_hf_weights
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.weight_sync import WeightSync, WeightSyncConfig
    from megatron_rpt.weight_sync.fp8 import BlockFP8, DequantizingEngine

    spec = BlockFP8(BLOCK)
    built, groups = _built(hf_dir, 2)
    engine = None
    if rank == 0:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        hf = HFEngine(model, AutoTokenizer.from_pretrained(smollm2_dir()))
        engine = _Recording(DequantizingEngine(hf, spec, torch.float32))
    cfg = WeightSyncConfig(bucket_bytes=20_000, verify="probe", probe_tolerance=0.05)
    metrics = WeightSync(built, groups, engine, cfg, quantization=spec)(version=1)
    out = {"metrics": metrics}
    if engine is not None:
        out["seen"] = _portable(engine.seen.items())
        out["state"] = {n: p.detach().clone() for n, p in hf.model.named_parameters()}
    ref_built, _ = _built(hf_dir, 1)  # same weights at TP=1 (collective: every rank)
    ref = iter_hf_weights(ref_built.chunks, ref_built.arch, ref_built.vocab.padded)
    quantized = [p for n, t in ref for p in spec.quantize(n, t)]
    out["reference"] = _portable(quantized) if rank == 0 else None
    return out


def test_tp2_fp8_sync_equals_tp1_quantization(tmp_path):
    from megatron_rpt.weight_sync.fp8 import FP8_DTYPE, dequantize_stream

    hf_dir = str(save_tiny_model("qwen2", tmp_path / "qwen2"))
    r0, r1 = run_distributed(_run, 2, args=(hf_dir,), timeout=300)
    m = r0["metrics"]
    assert m.pushed and m.fp8_tensors == 14 and not r1["metrics"].pushed
    assert 0 < m.probe_mean_abs_diff < 0.05
    reference, seen = _restore(r0["reference"]), _restore(r0["seen"])
    ref = dict(reference)
    assert [n for n, _ in seen] == [n for n, _ in reference]
    for name, tensor in seen:
        assert tensor.dtype == ref[name].dtype, name
        if tensor.dtype == FP8_DTYPE:
            assert torch.equal(tensor.view(torch.uint8), ref[name].view(torch.uint8)), name
        else:
            assert torch.equal(tensor, ref[name]), name
    expected = dict(dequantize_stream(reference, BLOCK, torch.float32))
    for name, tensor in expected.items():
        assert torch.equal(r0["state"][name], tensor.float()), name
