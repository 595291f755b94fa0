"""Real SGLang server on a GPU: colocated weight sync, then outputs identical to the HF reference.

Skipped without a GPU and a working SGLang runtime (conftest markers). The server serves a
tiny random Llama saved to a temporary folder (fp32, so greedy paths and log-probs are compared
with a tight tolerance), starts with its *initial* weights deliberately different from the
reference, and only the colocated push (release -> update_weights -> resume) makes them equal:
any lost, reordered, half-copied or stale bucket shows up as a different greedy path, different
log-probs or a checksum mismatch. The trainer-side comparison comes with weight_sync/.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rpt.rollout.types import SamplingParams
from tests.helpers.rollout_helpers import smollm2_tokenizer, teacher_forced_logprobs, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.sglang_runtime, pytest.mark.timeout(900)]

LOGPROB_TOL = 2e-3  # fp32 on both sides; SGLang's kernels differ from HF's eager/SDPA path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.sglang_engine import SGLangEngine

    tok = smollm2_tokenizer()
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(tok, seed=1).save_pretrained(path)  # the server boots with *other* weights
    tok.save_pretrained(path)
    cfg = RolloutConfig(engine="sglang", mode="colocated")
    cfg.sglang.port = 0
    cfg.sglang.dtype = "float32"
    cfg.sglang.mem_fraction_static = 0.3
    cfg.sglang.bucket_bytes = 4 * 1024 * 1024  # several buckets, so lifetime/fencing is exercised
    cfg.sglang.extra_args = {"disable-cuda-graph": True}
    engine = SGLangEngine.launch(cfg, str(path))
    ref = tiny_llama(tok, seed=0).cuda()
    yield engine, ref, tok
    engine.shutdown()
    assert not engine.health()


def _push(engine, ref, version):  # noqa: ANN001, ANN202
    engine.release_memory()
    torch.cuda.synchronize()
    engine.update_weights(((n, p.detach()) for n, p in ref.named_parameters()), version=version)


def _check_equal_to_reference(engine, ref, tok):  # noqa: ANN001, ANN202
    prompts = [tok.encode(t) for t in ["The derivative of x squared is", "Let n be", "Hi there"]]
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
    for prompt, group in zip(prompts, out, strict=True):
        assert group[0].token_ids == group[1].token_ids
        ids = list(prompt)
        for t in group[0].token_ids:  # the reference's greedy path, step by step
            with torch.no_grad():
                assert t == int(ref(torch.tensor([ids], device="cuda")).logits[0, -1].argmax())
            ids.append(t)
        expected = teacher_forced_logprobs(ref.cpu(), prompt, group[0].token_ids, 0.0)
        ref.cuda()
        assert max(abs(a - b) for a, b in zip(expected, group[0].logprobs, strict=True)) < LOGPROB_TOL
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight"]
    table = dict(ref.named_parameters())
    from megatron_rpt.rollout.types import tensor_fingerprint

    assert engine.weight_checksums(names, max_rows=16) == {
        n: tensor_fingerprint(table[n], 16) for n in names
    }


def test_colocated_sync_then_identical_greedy_and_logprobs(served):
    engine, ref, tok = served
    _push(engine, ref, version=1)
    assert engine.weight_version == 1
    _check_equal_to_reference(engine, ref, tok)


def test_again_after_release_resume_cycles(served):
    engine, ref, tok = served
    for version in (2, 3):
        _push(engine, ref, version=version)
        _check_equal_to_reference(engine, ref, tok)
    engine.release_memory()
    engine.resume_memory()  # no CPU backup: the engine must refuse rather than serve garbage
    with pytest.raises(RuntimeError, match="update_weights"):
        engine.generate([[1, 2, 3]], SamplingParams(n=1, max_new_tokens=2))
    _push(engine, ref, version=4)
    _check_equal_to_reference(engine, ref, tok)


def test_prefix_cache_hit_rate_reported(served):
    engine, ref, tok = served
    _push(engine, ref, version=5)
    engine.reset_prefix_cache_stats()
    prompt = tok.encode("A long shared context " * 20)
    engine.generate([prompt], SamplingParams(n=8, max_new_tokens=4, temperature=0.8))
    stats = engine.prefix_cache_stats()
    assert stats is not None and stats.hit_rate > 0.5  # the G samples share the prompt
