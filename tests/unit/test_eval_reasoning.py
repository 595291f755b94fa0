"""Next-token reasoning accuracy: hand-checkable Random@1 / Pass@k through a canned engine,
seeded determinism through the real HF engine, and the report of a two-mode evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_rpt.data.config import PromptConfig
from megatron_rpt.data.prompt import build_prompt
from megatron_rpt.data.tokens import ByteVocabulary
from megatron_rpt.eval.config import EvalConfig
from megatron_rpt.eval.dataset import EvalSet, load_prepared_split
from megatron_rpt.eval.metrics import bucket_masks, summarize
from megatron_rpt.eval.models import ResolvedModel
from megatron_rpt.eval.reasoning import run_reasoning
from megatron_rpt.eval.report import flat_metrics, markdown_table, write_report
from megatron_rpt.eval.runner import evaluate
from megatron_rpt.rollout.types import SamplingParams
from megatron_rpt.testing.fake_engine import FakeRolloutEngine
from tests.helpers.eval_helpers import shared_tiny
from tests.helpers.rollout_helpers import smollm2_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog, and then the dog sleeps all day long."
T = (0.5, 1.0, 1.5)


@pytest.fixture(scope="module")
def synthetic():
    """Four positions of one document with entropies 0.3 / 0.7 / 1.2 / 2.0 (none/easy/medium/hard)."""
    tok = smollm2_tokenizer()
    vocab = ByteVocabulary.from_tokenizer(tok)
    ids = np.array(tok(TEXT, add_special_tokens=False)["input_ids"], dtype=np.int64)
    es = EvalSet(
        source="synthetic", tokenizer_name="smollm2", tokenizer_digest=vocab.digest(), table=vocab.table,
        doc_ids=["d0"], doc_tokens=[ids], doc_P=np.zeros(4, dtype=np.int64),
        position_P=np.array([9, 3, 6, 12]), entropy_P=np.array([0.3, 0.7, 1.2, 2.0], dtype=np.float32),
        entropy_source="given", context_tokens=64, continuation_tokens=4,
    )  # fmt: skip
    return tok, es


def _canned(tok, es, correct_counts, n, prompt_cfg):
    """Engine answering position i with correct_counts[i] right responses out of n."""
    by_prompt = {}
    for i, c in enumerate(correct_counts):
        key = tuple(build_prompt(es.context_text(i), tok, prompt_cfg).ids)
        truth = es.continuation_bytes(i)[0].decode()
        right = f"Let me think.</think> The next token is \\boxed{{{truth}}}"
        wrong = ["</think> \\boxed{zzz}", "no closing tag \\boxed{" + truth + "}"]
        by_prompt[key] = [right] * c + [wrong[j % 2] for j in range(n - c)]
    return FakeRolloutEngine(lambda key, params: by_prompt[key])


def test_random_at_1_and_pass_at_k_by_hand(synthetic):
    tok, es = synthetic
    prompt_cfg = PromptConfig(template="v1")
    engine = _canned(tok, es, [1, 2, 0, 4], 4, prompt_cfg)
    params = SamplingParams(n=4, temperature=0.8, max_new_tokens=16, seed=5)
    out = run_reasoning(
        engine, es, tok, prompt_cfg=prompt_cfg, params=params, batch_prompts=3, seed=5
    )
    assert out.random_at_1().tolist() == [0.25, 0.5, 0.0, 1.0]
    # pass@2 = 1 - C(4-c, 2) / C(4, 2): c=1 -> 1-3/6, c=2 -> 1-1/6, c=0 -> 0, c=4 -> 1
    assert out.pass_at(2) == pytest.approx([0.5, 5 / 6, 0.0, 1.0])
    assert out.pass_at(5) is None
    r1 = summarize(out.random_at_1(), bucket_masks(es.entropy_P, T))
    # nested buckets: easy = positions 1,2,3; medium = 2,3; hard = 3
    assert (r1["easy"].value, r1["medium"].value, r1["hard"].value) == (0.5, 0.5, 1.0)
    assert (r1["easy"].n, r1["medium"].n, r1["hard"].n, r1["all"].n) == (3, 2, 1, 4)
    p2 = summarize(out.pass_at(2), bucket_masks(es.entropy_P, T))
    assert p2["easy"].value == pytest.approx((5 / 6 + 0 + 1) / 3)
    # every other wrong response lacks </think> and has no prediction (require_think_close)
    assert out.parsed_PN.sum(axis=1).tolist() == [1 + 2, 2 + 1, 0 + 2, 4 + 0]
    # two generate calls (batch_prompts=3) in document order (positions 3, 6, 9 then 12),
    # seeded differently
    prompt_of = {i: tuple(build_prompt(es.context_text(i), tok, prompt_cfg).ids) for i in range(4)}
    assert [c[0] for c in engine.calls] == [
        [prompt_of[1], prompt_of[2], prompt_of[0]],
        [prompt_of[3]],
    ]
    assert engine.calls[0][1].seed != engine.calls[1][1].seed


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model_dir, prepared = shared_tiny()
    es = load_prepared_split(prepared, context_tokens=48)
    return model_dir, es.subset(np.arange(0, len(es), len(es) // 5)[:5])


def test_hf_engine_sampling_is_deterministic_under_a_seed(tiny):
    from megatron_rpt.rollout.hf_engine import HFEngine

    model_dir, es = tiny
    engine = HFEngine.from_pretrained(model_dir, device="cpu", max_batch_rows=8)
    prompt_cfg = PromptConfig(chat_template=False)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6)

    def run(seed):
        out = run_reasoning(engine, es, engine.tokenizer, prompt_cfg=prompt_cfg, params=params,
                            batch_prompts=2, seed=seed, judge="first_token",
                            require_think_close=False)  # fmt: skip
        return out

    a, b, c = run(11), run(11), run(12)
    assert np.array_equal(a.rewards_PN, b.rewards_PN)
    assert [e["response"] for e in a.examples] == [e["response"] for e in b.examples]
    assert [e["response"] for e in a.examples] != [e["response"] for e in c.examples]
    assert a.response_tokens_PN.shape == (5, 3) and (a.response_tokens_PN == 6).all()


def test_two_modes_two_models_make_one_table(tiny, tmp_path):
    model_dir, es = tiny
    models = [ResolvedModel("base", str(model_dir), model_dir, "hf"),
              ResolvedModel("trained", str(model_dir), model_dir, "hf")]  # fmt: skip
    right_first = {"base": 0, "trained": 2}

    def factory(model, hf_model, tokenizer):
        assert hf_model is not None  # the standard pass's model is handed over
        n = right_first[model.name]

        def respond(key, params):
            i = prompts.index(key)
            truth = es.continuation_bytes(i)[0].decode("utf-8", "replace")
            return [f"</think>\\boxed{{{truth}}}"] * n + ["</think>\\boxed{\u2603}"] * (4 - n)

        prompts = [
            tuple(build_prompt(es.context_text(i), tokenizer, PromptConfig()).ids)
            for i in range(len(es))
        ]
        return FakeRolloutEngine(respond)

    cfg = EvalConfig(mode="both", n_samples=4, pass_k=2, difficulty_thresholds=(0.3, 0.8, 1.6),
                     device="cpu", reasoning_max_positions=None)  # fmt: skip
    run = evaluate(models, es, cfg=cfg, prompt=PromptConfig(), engine_factory=factory)
    rows = [(r.model, r.mode, r.metric) for r in run.results]
    assert rows == [(m, *x) for m in ("base", "trained")
                    for x in [("standard", "accuracy"), ("reasoning", "random@1"), ("reasoning", "pass@2")]]  # fmt: skip
    trained_r1 = run.results[4]
    assert trained_r1.buckets["all"].value == 0.5 and trained_r1.buckets["all"].n == 5
    assert run.results[5].buckets["all"].value == pytest.approx(5 / 6)  # pass@2 with c=2 of 4
    assert run.results[1].buckets["all"].value == 0.0
    # standard accuracy is the same model twice: identical rows
    assert run.results[0].buckets["all"] == run.results[3].buckets["all"]

    table = markdown_table(run)
    assert "| next-token reasoning, Random@1 | trained | " in table
    assert "| next-token reasoning, Pass@2 | trained | " in table
    metrics = flat_metrics(run)
    assert metrics["eval/trained/reasoning/all"] == 0.5
    assert metrics["eval/base/reasoning_pass@2/all"] == 0.0
    paths = write_report(run, tmp_path / "out", models=models)
    doc = json.loads(paths["eval.json"].read_text())
    assert doc["format"] == "megatron_rpt.eval_results" and doc["versions"]["torch"]
    assert doc["data"]["positions_reasoning"]["all"] == 5
    assert doc["results"][0]["extra"]["forward_calls"] == 1
    assert "on_reasoning_positions" in doc["results"][0]["extra"]
    assert doc["settings"]["eval"]["n_samples"] == 4
    assert paths["accuracy.png"].stat().st_size > 10_000


def test_hf_engine_without_weight_files_builds_from_config_and_a_sync_fills_it(tiny, tmp_path):
    """The training loop's engine for a model folder without weights (e.g. --init-from a
    Megatron checkpoint): architecture from config.json, weights from the first sync."""
    import shutil

    from megatron_rpt.rollout.hf_engine import HFEngine

    model_dir, _ = tiny
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    ref = HFEngine.from_pretrained(model_dir, device="cpu")
    engine = HFEngine.from_pretrained(bare, device="cpu", load_weights=False)
    state = dict(ref.model.named_parameters())
    assert set(dict(engine.model.named_parameters())) == set(state)
    assert any(not torch.equal(p, state[n]) for n, p in engine.model.named_parameters())
    engine.update_weights([(n, p.detach()) for n, p in state.items()], version=1)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    prompt = [ref.tokenizer.encode("the next token")]
    assert engine.generate(prompt, params)[0][0].token_ids == ref.generate(prompt, params)[0][0].token_ids
