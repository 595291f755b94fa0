"""Megatron models from HF checkpoints under TP=2 / PP=2 (gloo, 2 processes) match HF, and a
checkpoint saved at TP=2 loads at PP=2 and TP=1 with identical logits.

Two spawned runs share the work (each spawn costs ~5 s of imports per rank): the TP=2 run
checks logits and saves checkpoints; the second run checks PP=2 (and virtual PP=2), loads the
TP=2 checkpoints at PP=2 and at TP=1 and compares with the same layouts loaded from HF.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_rpt.testing.distributed import run_distributed
from megatron_rpt.testing.tiny_models import KINDS, VOCAB, hf_logits, save_tiny_model

TOL = 1e-4
SAVED = ("llama_tied", "qwen2")  # tied embeddings are the interesting case for PP


def _setup(tp, pp, vpp=None):
    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel

    groups = initialize_model_parallel(tp, pp, vpp)
    seed_model_parallel(0, groups)
    return groups


def _logits(model_cfg, parallel, groups, tokens):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.model.logits import forward_logits

    built = build_pretrained(model_cfg, parallel, groups)
    out = forward_logits(built, torch.from_numpy(tokens), groups)
    return built, None if out is None else out.numpy()


def _tp2_run(rank, world_size, dirs, tokens, ckpt_root):
    from megatron_rpt.checkpoint.io import metadata_for, save_checkpoint
    from megatron_rpt.conversion.tp_sharding import partitioning
    from megatron_rpt.model.config import ModelConfig, ParallelConfig

    groups = _setup(2, 1)
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    out = {}
    for kind, hf_dir in dirs.items():
        built, out[kind] = _logits(
            ModelConfig(hf_path=hf_dir, dtype="fp32"), parallel, groups, tokens
        )
        # Megatron sets these only when it initialises weights; DDP and TP loading need them.
        assert all(
            partitioning(p)
            for n, p in built.chunks[0].named_parameters()
            if "linear_" in n or "word_embeddings" in n
        )
        if kind in SAVED:
            save_checkpoint(
                built.chunks,
                Path(ckpt_root) / kind,
                metadata_for(built, groups, source=hf_dir),
                hf_source=Path(hf_dir),
            )
    return out


def _pp2_and_tp1_run(rank, world_size, dirs, deep_dir, tokens, ckpt_root):
    from megatron_rpt.model.config import ModelConfig, ParallelConfig

    res = {"pp2_hf": {}, "pp2_ckpt": {}, "tp1_hf": {}, "tp1_ckpt": {}}
    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    groups = _setup(1, 2)
    for kind, hf_dir in dirs.items():
        res["pp2_hf"][kind] = _logits(
            ModelConfig(hf_path=hf_dir, dtype="fp32"), pp2, groups, tokens
        )[1]
    for kind in SAVED:
        cfg = ModelConfig(megatron_checkpoint=str(Path(ckpt_root) / kind), dtype="fp32")
        res["pp2_ckpt"][kind] = _logits(cfg, pp2, groups, tokens)[1]
    # An fp32 checkpoint loads into a bf16 (Float16Module) model, as bf16 training from it does.
    cfg = ModelConfig(megatron_checkpoint=str(Path(ckpt_root) / SAVED[0]), dtype="bf16")
    res["pp2_ckpt_bf16"] = _logits(cfg, pp2, groups, tokens)[1]
    vpp = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    groups = _setup(1, 2, 2)
    res["vpp2_hf"] = _logits(ModelConfig(hf_path=deep_dir, dtype="fp32"), vpp, groups, tokens)[1]
    groups = _setup(1, 1)  # TP=1, PP=1, DP=2
    for kind in SAVED:
        res["tp1_hf"][kind] = _logits(
            ModelConfig(hf_path=dirs[kind], dtype="fp32"), ParallelConfig(), groups, tokens
        )[1]
        cfg = ModelConfig(megatron_checkpoint=str(Path(ckpt_root) / kind), dtype="fp32")
        res["tp1_ckpt"][kind] = _logits(cfg, ParallelConfig(), groups, tokens)[1]
    return res


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {kind: str(save_tiny_model(kind, root / kind)) for kind in KINDS}
    deep = str(save_tiny_model("llama", root / "deep", num_layers=4))
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    refs = {kind: hf_logits(d, tokens) for kind, d in dirs.items()} | {
        "deep": hf_logits(deep, tokens)
    }
    return dirs, deep, tokens.numpy(), refs, root / "ckpts"


def _diff(a: np.ndarray, ref: torch.Tensor) -> float:
    return (torch.from_numpy(a) - ref).abs().max().item()


@pytest.fixture(scope="module")
def tp2(models):
    dirs, _, tokens, _, ckpt_root = models
    return run_distributed(_tp2_run, 2, args=(dirs, tokens, str(ckpt_root)), timeout=240)


def test_tp2_logits_match_hf(models, tp2):
    refs = models[3]
    for kind in KINDS:
        assert np.array_equal(tp2[0][kind], tp2[1][kind])  # every TP rank has the full logits
        assert _diff(tp2[0][kind], refs[kind]) <= TOL, kind


def test_pp2_logits_and_tp2_checkpoint_resharding(models, tp2):
    dirs, deep, tokens, refs, ckpt_root = models
    first, last = run_distributed(
        _pp2_and_tp1_run, 2, args=(dirs, deep, tokens, str(ckpt_root)), timeout=300
    )
    assert all(v is None for v in first["pp2_hf"].values())  # logits live on the last stage
    for kind in KINDS:
        assert _diff(last["pp2_hf"][kind], refs[kind]) <= TOL, kind
    assert _diff(last["vpp2_hf"], refs["deep"]) <= TOL
    for kind in SAVED:
        # Saved at TP=2, loaded at PP=2 / TP=1: the same weights as loading HF at that layout.
        assert np.array_equal(last["pp2_ckpt"][kind], last["pp2_hf"][kind]), kind
        assert np.array_equal(first["tp1_ckpt"][kind], first["tp1_hf"][kind]), kind
        assert np.array_equal(last["tp1_ckpt"][kind], first["tp1_ckpt"][kind]), kind  # DP ranks
        assert _diff(first["tp1_ckpt"][kind], torch.from_numpy(tp2[0][kind])) <= 1e-5, kind
    assert _diff(last["pp2_ckpt_bf16"], refs[SAVED[0]]) < 0.1


def test_tp2_checkpoint_exports_bit_exactly(models, tp2):
    from safetensors.torch import load_file

    from megatron_rpt.checkpoint.discovery import read_metadata
    from megatron_rpt.checkpoint.megatron_to_hf import convert_megatron_to_hf

    dirs, ckpt_root = models[0], models[4]
    for kind in SAVED:
        assert read_metadata(ckpt_root / kind).tensor_model_parallel_size == 2
        out = convert_megatron_to_hf(ckpt_root / kind, ckpt_root / f"{kind}_hf")
        a = load_file(Path(dirs[kind]) / "model.safetensors")
        b = load_file(out / "model.safetensors")
        assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a), kind
