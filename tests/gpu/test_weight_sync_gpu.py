"""Megatron trainer -> real SGLang server (colocated, GPU): after ``WeightSync`` the engine's
greedy outputs and log-probs are the trainer's own, also after release/resume cycles.

Skipped without a GPU and a working SGLang runtime (conftest markers). The server boots from a
tiny random Llama (fp32, over the real SmolLM2 tokenizer) with *other* weights than the
trainer, whose Megatron model is built from a second folder and then perturbed, so only the
sync can make them agree. The reference for every comparison is the Megatron forward
(``model.logits.forward_logits``), not an HF model: this is the trainer-side counterpart of
tests/gpu/test_sglang_engine.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rpt.rollout.types import SamplingParams
from tests.helpers.rollout_helpers import smollm2_tokenizer, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.sglang_runtime, pytest.mark.timeout(900)]

LOGPROB_TOL = 2e-3  # fp32 on both sides; SGLang's kernels differ from Megatron's


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.distributed import (
        initialize_model_parallel,
        seed_model_parallel,
        single_process_group,
    )
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.sglang_engine import SGLangEngine
    from tests.helpers.updates import perturb_parameters

    tok = smollm2_tokenizer()
    served, trained = tmp_path_factory.mktemp("served"), tmp_path_factory.mktemp("trained")
    for path, seed in ((served, 1), (trained, 0)):
        tiny_llama(tok, seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
    torch.cuda.set_device(0)
    with single_process_group():
        groups = initialize_model_parallel(1, 1)
        seed_model_parallel(0, groups)
        built = build_pretrained(
            ModelConfig(hf_path=str(trained), dtype="fp32"), ParallelConfig(), groups
        )
        perturb_parameters(built.chunks, built.arch, built.vocab.padded, 0, 1)
        cfg = RolloutConfig(engine="sglang", mode="colocated")
        cfg.sglang.port = 0
        cfg.sglang.dtype = "float32"
        cfg.sglang.mem_fraction_static = 0.3
        cfg.sglang.bucket_bytes = 4 * 1024 * 1024  # several buckets: lifetime/fencing exercised
        cfg.sglang.extra_args = {"disable-cuda-graph": True}
        engine = SGLangEngine.launch(cfg, str(served))
        yield built, groups, engine, tok
        engine.shutdown()


def _sync(built, groups, engine, version):  # noqa: ANN001, ANN202
    from megatron_rpt.weight_sync import WeightSync, WeightSyncConfig

    cfg = WeightSyncConfig(
        bucket_bytes=8 * 1024 * 1024, verify="checksum", probe_tolerance=LOGPROB_TOL
    )
    engine.release_memory()  # colocated flow: the engine gives its memory back for training
    torch.cuda.synchronize()
    return WeightSync(built, groups, engine, cfg)(version=version)


def _check_matches_trainer(built, groups, engine, tok):  # noqa: ANN001, ANN202
    from megatron_rpt.model.logits import forward_logits

    prompts = [tok.encode(t) for t in ["The derivative of x squared is", "Let n be", "Hi there"]]
    out = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=8))
    for prompt, (completion,) in zip(prompts, out, strict=True):
        ids = torch.tensor([prompt + completion.token_ids], device="cuda")
        logits = forward_logits(built, ids, groups)[0]  # [S, V], fp32
        start = len(prompt) - 1
        steps = logits[start : start + len(completion.token_ids)]
        assert steps.argmax(-1).tolist() == completion.token_ids  # the trainer's greedy path
        logp = torch.log_softmax(steps, -1)
        ref = logp.gather(-1, torch.tensor(completion.token_ids, device="cuda")[:, None])[:, 0]
        diff = (ref.cpu() - torch.tensor(completion.logprobs)).abs().max().item()
        assert diff < LOGPROB_TOL


def test_colocated_sync_from_megatron_then_identical_greedy_and_logprobs(setup):
    built, groups, engine, tok = setup
    metrics = _sync(built, groups, engine, version=1)
    assert engine.weight_version == 1 and metrics.buckets > 1 and metrics.checked_tensors > 0
    assert metrics.probe_max_abs_diff is not None and metrics.probe_max_abs_diff < LOGPROB_TOL
    _check_matches_trainer(built, groups, engine, tok)


def test_again_after_release_resume_cycles(setup):
    built, groups, engine, tok = setup
    for version in (2, 3):
        _sync(built, groups, engine, version)
        _check_matches_trainer(built, groups, engine, tok)
    engine.release_memory()
    engine.resume_memory()  # no CPU backup: the engine refuses until the next sync
    with pytest.raises(RuntimeError, match="update_weights"):
        engine.generate([[1, 2, 3]], SamplingParams(n=1, max_new_tokens=2))
    _sync(built, groups, engine, version=4)
    _check_matches_trainer(built, groups, engine, tok)
