"""The RolloutEngine contract, pinned for every engine.

Engines: the HF engine (tiny random Llama + the real SmolLM2 tokenizer) and the SGLang client
talking to a fake SGLang server on 127.0.0.1 (tests/helpers/fake_sglang_server.py, backed by the
same kind of HF model; runs wherever sglang is installed, including CPU CI). The real SGLang
server runs these same test functions in tests/gpu/test_sglang_contract.py.

Each engine comes with the model it serves (``ref``), so outputs are checked against a
teacher-forced forward of that model, never against numbers the engine produced itself.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from megatron_rpt.errors import InputError
from megatron_rpt.rollout.types import (
    FINISH_REASONS,
    RolloutEngine,
    SamplingParams,
    tensor_fingerprint,
)
from tests.helpers.rollout_helpers import (
    chain_weights,
    require_sglang_protocol,
    smollm2_tokenizer,
    teacher_forced_logprobs,
    tiny_llama,
)

torch.set_num_threads(min(2, os.cpu_count() or 1))


class Harness:
    """An engine, the model it serves (``ref``: a separate copy), and its tokenizer."""

    def __init__(self, engine: RolloutEngine, ref: torch.nn.Module, tok, tol: float) -> None:  # noqa: ANN001
        self.engine, self.ref, self.tok, self.tol = engine, ref, tok, tol

    def prompts(self) -> list[list[int]]:
        texts = ["The derivative of x squared is", "Let n be a positive integer such that", "Hi"]
        return [self.tok.encode(t) for t in texts]

    def state(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.detach().clone()) for n, p in self.ref.named_parameters()]


def _hf(tok):  # noqa: ANN001, ANN202
    from megatron_rpt.rollout.hf_engine import HFEngine

    return HFEngine(tiny_llama(tok), tok, max_batch_rows=16), tiny_llama(tok)


@pytest.fixture(params=["hf", "sglang_fake"])
def harness(request):  # noqa: ANN001, ANN201
    tok = smollm2_tokenizer()
    if request.param == "hf":
        engine, ref = _hf(tok)
        yield Harness(engine, ref, tok, tol=1e-5)
        engine.shutdown()
        return
    require_sglang_protocol()
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.sglang_engine import SGLangEngine
    from tests.helpers.fake_sglang_server import FakeSGLangServer

    backend, ref = _hf(tok)
    cfg = RolloutConfig(engine="sglang")
    cfg.sglang.launch_timeout_s = 20
    manifest = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    with FakeSGLangServer(backend) as server:
        engine = SGLangEngine.connect(server.url, cfg, manifest=manifest)
        yield Harness(engine, ref, tok, tol=1e-5)
        engine.shutdown()


def test_is_a_rollout_engine(harness):
    assert isinstance(harness.engine, RolloutEngine)
    assert harness.engine.health()
    assert harness.engine.weight_version == 0


def test_shapes_order_and_logprobs_match_teacher_forcing(harness):
    prompts = harness.prompts()
    params = SamplingParams(n=3, max_new_tokens=6, seed=7, temperature=0.8)
    out = harness.engine.generate(prompts, params)
    assert len(out) == len(prompts) and all(len(g) == 3 for g in out)
    for prompt, group in zip(prompts, out, strict=True):
        for c in group:
            assert 1 <= len(c.token_ids) <= 6
            assert c.finish_reason in FINISH_REASONS
            assert c.finish_reason != "length" or len(c.token_ids) == 6
            assert len(c.logprobs) == len(c.token_ids)
            assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
            ref = teacher_forced_logprobs(harness.ref, prompt, c.token_ids, 0.8)
            assert max(abs(a - b) for a, b in zip(ref, c.logprobs, strict=True)) < harness.tol
            assert c.text == harness.tok.decode(c.token_ids, skip_special_tokens=True)


def test_greedy_is_the_reference_argmax_path(harness):
    prompts = harness.prompts()
    out = harness.engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=5))
    for prompt, group in zip(prompts, out, strict=True):
        assert group[0].token_ids == group[1].token_ids  # greedy samples agree
        ids = list(prompt)
        for tok_id in group[0].token_ids:
            with torch.no_grad():
                logits = harness.ref(torch.tensor([ids])).logits[0, -1]
            assert tok_id == int(logits.argmax())
            ids.append(tok_id)
        ref = teacher_forced_logprobs(harness.ref, prompt, group[0].token_ids, 0.0)
        assert max(abs(a - b) for a, b in zip(ref, group[0].logprobs, strict=True)) < harness.tol


def test_seeded_sampling_is_deterministic_and_samples_differ(harness):
    prompts = harness.prompts()[:2]
    params = SamplingParams(n=4, max_new_tokens=5, seed=123, temperature=1.0)
    a = harness.engine.generate(prompts, params)
    b = harness.engine.generate(prompts, params)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert len({tuple(c.token_ids) for c in a[0]}) > 1  # the G samples are not copies
    other = harness.engine.generate(prompts, SamplingParams(n=4, max_new_tokens=5, seed=124, temperature=1.0))
    assert [[c.token_ids for c in g] for g in a] != [[c.token_ids for c in g] for g in other]


def test_stop_at_final_box_stops_right_after_the_closing_brace(harness):
    tok = harness.tok
    text = "</think> \\boxed{ 4} and then more words"
    chain = tok.encode("Answer:" + text)
    if len(set(chain)) != len(chain):
        pytest.skip("chain text tokenizes with repeated tokens")
    harness.engine.update_weights(chain_weights(harness.ref, chain), version=1)
    prompt = chain[:2]  # "Answer" ":" -> the model continues the chain greedily
    free = harness.engine.generate([prompt], SamplingParams(n=1, temperature=0.0, max_new_tokens=len(chain)))[0][0]
    assert free.token_ids[: len(chain) - 2] == chain[2:]
    assert free.text.startswith(text)
    boxed = harness.engine.generate(
        [prompt], SamplingParams(n=1, temperature=0.0, max_new_tokens=len(chain), stop_at_final_box=True)
    )[0][0]
    assert boxed.finish_reason == "box"
    assert boxed.text.rstrip().endswith("}") and boxed.text == tok.decode(chain[2 : 2 + len(boxed.token_ids)])
    assert "\\boxed{ 4}" in boxed.text and "more" not in boxed.text
    # a stop token ends the response and is kept with its log-prob
    stop_at = chain[5]
    stopped = harness.engine.generate(
        [prompt], SamplingParams(n=1, temperature=0.0, max_new_tokens=30, stop_token_ids=(stop_at,))
    )[0][0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == chain[2:6]
    assert len(stopped.logprobs) == 4


def test_update_weights_changes_outputs_and_checksums(harness):
    prompts = harness.prompts()[:1]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    before = harness.engine.generate(prompts, greedy)[0][0].token_ids
    new = [(n, t + 0.05 * torch.randn_like(t)) for n, t in harness.state()]
    harness.engine.update_weights(new, version=3)
    with torch.no_grad():
        for (_, t), (_, p) in zip(new, harness.ref.named_parameters(), strict=True):
            p.copy_(t)
    assert harness.engine.weight_version == 3
    after = harness.engine.generate(prompts, greedy)[0]
    assert after[0].token_ids != before
    ref = teacher_forced_logprobs(harness.ref, prompts[0], after[0].token_ids, 0.0)
    assert max(abs(a - b) for a, b in zip(ref, after[0].logprobs, strict=True)) < harness.tol
    names = ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"]
    sums = harness.engine.weight_checksums(names, max_rows=4)
    assert sums == {n: tensor_fingerprint(dict(new)[n], 4) for n in names}


def test_update_weights_rejects_unknown_names_and_bad_shapes(harness):
    good = harness.state()[0]
    with pytest.raises(InputError, match="model.nope.weight"):
        harness.engine.update_weights([good, ("model.nope.weight", torch.zeros(2))], version=1)
    name, t = harness.state()[1]
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        harness.engine.update_weights([(name, t[:-1])], version=1)
    # a failed update never leaves a usable-looking engine: a full push repairs it
    harness.engine.update_weights(harness.state(), version=2)
    assert harness.engine.generate(harness.prompts()[:1], SamplingParams(n=1, max_new_tokens=2, seed=0))


def test_release_update_resume_keeps_outputs_identical(harness):
    prompts = harness.prompts()
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=5)
    before = [[c.token_ids for c in g] for g in harness.engine.generate(prompts, greedy)]
    harness.engine.release_memory()  # colocated flow: release -> train -> push -> generate
    harness.engine.update_weights(harness.state(), version=1)
    assert [[c.token_ids for c in g] for g in harness.engine.generate(prompts, greedy)] == before
    harness.engine.release_memory()
    harness.engine.resume_memory()
    try:
        again = harness.engine.generate(prompts, greedy)
    except RuntimeError as exc:  # an engine that lost its weights must refuse, not guess
        assert "update_weights" in str(exc)
    else:
        assert [[c.token_ids for c in g] for g in again] == before
    harness.engine.flush_cache()
    assert harness.engine.health()


def test_prefix_cache_stats(harness):
    harness.engine.flush_cache()
    harness.engine.generate(harness.prompts()[:1], SamplingParams(n=4, max_new_tokens=2, seed=1))
    stats = harness.engine.prefix_cache_stats()
    if stats is None:
        return  # the HF engine has no cross-request cache
    # the 3 later samples reuse the prompt (a real SGLang may recompute its last token, or
    # serve the first sample from its prefix-prefill request too)
    length = len(harness.prompts()[0])
    assert 0.75 * (length - 1) / length <= stats.hit_rate <= 1.0


def test_hf_engine_tied_embeddings_and_report():
    from megatron_rpt.rollout.hf_engine import HFEngine

    tok = smollm2_tokenizer()
    model = tiny_llama(tok, tied=True)
    engine = HFEngine(model, tok)
    new = torch.randn_like(model.model.embed_tokens.weight)
    report = engine.update_weights([("lm_head.weight", new)], version=5)
    assert torch.equal(model.model.embed_tokens.weight, new)  # the alias updated the shared tensor
    assert report.updated == ["lm_head.weight"] and "model.embed_tokens.weight" not in report.not_updated
    assert "model.norm.weight" in report.not_updated and engine.weight_version == 5
