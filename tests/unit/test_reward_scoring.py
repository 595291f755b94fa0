r"""One scoring path for training and evaluation, in both prompt modes.

* Reasoning mode with a prefilled opener (``</think>\nThe next token is \boxed{``): evaluation
  and the trainer's rollout phase read ``opener + response`` through the same function and
  give identical rewards (evaluation used to drop the opener and parse nothing).
* Completion mode: the prompt is the context's own ids; the prediction is the sampled tokens'
  vocabulary bytes (half a UTF-8 character, ``}``, a trailing stop token).
* A tokenizer that marks ``</think>`` special: the reader re-decodes with it kept.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_rpt.config import RPTConfig, validate
from megatron_rpt.data.config import PromptConfig
from megatron_rpt.data.prompt import context_prompt
from megatron_rpt.data.tokens import ByteVocabulary
from megatron_rpt.data.types import RPTSample
from megatron_rpt.errors import ConfigError
from megatron_rpt.eval.dataset import EvalSet
from megatron_rpt.eval.reasoning import run_reasoning
from megatron_rpt.reward.registry import RewardTarget
from megatron_rpt.reward.scoring import ResponseReader, score_group
from megatron_rpt.rollout.types import Completion, SamplingParams
from megatron_rpt.testing.fake_engine import FakeRolloutEngine
from megatron_rpt.trainer.rollout_source import RolloutSource
from tests.helpers.rollout_helpers import smollm2_tokenizer

TEXT = "Let x be 3. Then x + 1 = 4, so the answer is 4 and we are done here."
OPENER = "<think>\n</think>\nThe next token is \\boxed{"


def _eval_set(tok):
    vocab = ByteVocabulary.from_tokenizer(tok)
    ids = np.array(tok(TEXT, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return EvalSet(
        source="synthetic", tokenizer_name="smollm2", tokenizer_digest=vocab.digest(), table=vocab.table,
        doc_ids=["d0"], doc_tokens=[ids], doc_P=np.zeros(3, dtype=np.int64),
        position_P=np.array([4, 8, 12]), entropy_P=np.array([0.7, 1.2, 2.0], dtype=np.float32),
        entropy_source="given", context_tokens=64, continuation_tokens=4,
    )  # fmt: skip


def _sample(es: EvalSet, i: int) -> RPTSample:
    return RPTSample(
        sample_index=i, doc_index=0, doc_id="d0", position=int(es.position_P[i]),
        context_ids=es.context_ids(i), continuation_ids=es.continuation_ids(i),
        continuation_token_bytes=es.continuation_bytes(i), entropy=float(es.entropy_P[i]),
        bucket="hard",
    )  # fmt: skip


class _Store:
    def __init__(self, es: EvalSet) -> None:
        self.es = es

    def context_text(self, sample: RPTSample) -> str:
        return self.es.context_text(int(sample.sample_index))


def _phase(tok, es, prompt: PromptConfig, reward: str = "prefix_match") -> RolloutSource:
    cfg = RPTConfig()
    cfg.reward.name = reward
    return RolloutSource(
        _Store(es), tok, sampler=None, generate=None,  # type: ignore[arg-type]
        rollout=cfg.rollout, prompt=prompt, reward=cfg.reward, loss=cfg.loss,
        contexts_per_step=cfg.train.contexts_per_step, seed=cfg.run.seed,
    )  # fmt: skip


def test_reasoning_eval_and_training_parse_the_prefilled_opener_the_same_way():
    tok = smollm2_tokenizer()
    es = _eval_set(tok)
    prompt = PromptConfig(think_opener=OPENER)
    phase = _phase(tok, es, prompt)
    responses = {}
    for i in range(len(es)):
        truth = es.continuation_bytes(i)[0].decode()
        # what the policy writes after the prefilled "\boxed{": the token and the brace
        texts = [truth + "}", truth + "}", " nope}", truth]  # the last one never closes
        key = tuple(phase._prompt(_sample(es, i))[0])
        assert key == tuple(context_prompt(es.context_ids(i), lambda i=i: es.context_text(i), tok, prompt).ids)
        responses[key] = texts
    engine = FakeRolloutEngine(lambda key, params: responses[key])
    params = SamplingParams(n=4, temperature=0.8, max_new_tokens=8, seed=3)
    out = run_reasoning(engine, es, tok, prompt_cfg=prompt, params=params, seed=3)
    assert out.rewards_PN.tolist() == [[1.0, 1.0, 0.0, 0.0]] * 3
    assert out.parsed_PN.tolist() == [[True, True, True, False]] * 3
    # the trainer scores the very same completions identically
    for i in range(len(es)):
        prompt_ids, opener = phase._prompt(_sample(es, i))
        assert opener == OPENER
        group = phase._score(_sample(es, i), prompt_ids, opener, engine.generate([prompt_ids], params)[0])
        assert group.rewards == out.rewards_PN[i].tolist()
        assert group.formatted == out.parsed_PN[i].tolist()


def _completion(ids, reason="length"):
    return Completion(token_ids=list(ids), text="(ignored)", logprobs=None, finish_reason=reason)


def test_completion_mode_scores_token_bytes():
    table = [b"", b"\xc3", b"\xa9", b" 4", b"}", b"<|im_end|>", b" 4}"]
    target = RewardTarget(continuation_token_bytes=(b"\xc3", b"\xa9", b"!"), continuation_ids=(1, 2, 9))
    reader = ResponseReader.completion(table)
    rewards, formatted = score_group(
        [_completion([1]), _completion([1, 2]), _completion([2]), _completion([1, 5], "stop"),
         _completion([5], "stop")], target, reader,
    )  # fmt: skip
    # half a character (decode() would give U+FFFD); two tokens; wrong; stop token dropped; EOS only
    assert rewards == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert formatted == [True, True, True, True, False]
    brace = RewardTarget(continuation_token_bytes=(b"}", b"."), continuation_ids=(4, 7))
    assert score_group([_completion([4]), _completion([6])], brace, reader)[0] == [1.0, 0.0]
    first = score_group([_completion([4, 3]), _completion([6])], brace, reader, reward_name="first_token")
    assert first[0] == [1.0, 0.0]
    with pytest.raises(ConfigError, match="prompt.mode=completion"):
        score_group([_completion([4])], brace, reader, reward_name="dense")


def test_completion_mode_in_training_and_eval_uses_the_context_ids():
    tok = smollm2_tokenizer()
    es = _eval_set(tok)
    prompt = PromptConfig(mode="completion")
    phase = _phase(tok, es, prompt)
    truth_ids = [int(es.continuation_ids(i)[0]) for i in range(len(es))]
    prompts = [phase._prompt(_sample(es, i)) for i in range(len(es))]
    assert [p for p, _ in prompts] == [es.context_ids(i).tolist() for i in range(len(es))]
    assert {o for _, o in prompts} == {""}
    by_prompt = {tuple(p): t for (p, _), t in zip(prompts, truth_ids, strict=True)}

    class TokenEngine(FakeRolloutEngine):
        def generate(self, prompts, params):  # noqa: ANN001, ANN202
            self.calls.append(([tuple(p) for p in prompts], params))
            return [[_completion([by_prompt[tuple(p)]]), _completion([0])] for p in prompts]

    engine = TokenEngine(lambda key, params: [])
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=1, seed=1)
    out = run_reasoning(engine, es, tok, prompt_cfg=prompt, params=params, seed=1)
    assert out.rewards_PN.tolist() == [[1.0, 0.0]] * 3
    for i, (p, o) in enumerate(prompts):
        group = phase._score(_sample(es, i), p, o, engine.generate([p], params)[0])
        assert group.rewards == [1.0, 0.0]


def test_special_think_close_is_kept_when_re_decoding():
    from transformers import AutoTokenizer

    from megatron_rpt.assets import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())  # a copy of its own: it is changed here
    tok.add_special_tokens({"additional_special_tokens": ["</think>"]})
    ids = tok("reasoning</think> \\boxed{ 4}", add_special_tokens=False)["input_ids"]
    engine_text = tok.decode(ids, skip_special_tokens=True)  # what an engine returns
    assert "</think>" not in engine_text
    c = Completion(token_ids=ids, text=engine_text, logprobs=None, finish_reason="length")
    target = RewardTarget(continuation_token_bytes=(b" 4",))
    reader = ResponseReader.for_prompt("reasoning", "", tok)
    assert score_group([c], target, reader) == ([1.0], [True])
    plain = ResponseReader.for_prompt("reasoning", "", smollm2_tokenizer())
    assert plain.decode is None  # "</think>" is plain text for SmolLM2: the engine text is used


def test_completion_mode_config():
    cfg = RPTConfig()
    cfg.prompt = dataclasses.replace(cfg.prompt, mode="completion")
    cfg.rollout.max_new_tokens = 1
    validate(cfg)
    cfg.rollout.stop_at_final_box = True
    with pytest.raises(ConfigError, match="stop_at_final_box"):
        validate(cfg)


def test_first_box_stop_and_reward_read_the_same_box():
    """stop_at_final_box ends at the first closed box after </think>; the reward reads the last
    box of what was generated, which is then that box. Without the stop (the paper's reading)
    a later box wins; eval.stop_at_final_box makes evaluation stop like training."""
    from megatron_rpt.reward.next_token import extract_prediction
    from megatron_rpt.rollout.stopping import FinalBoxStop, final_box_stop_regex

    full = "hmm \\boxed{x}</think> so \\boxed{ a} or rather \\boxed{ b}"
    stop = FinalBoxStop({ord("}")}, lambda ids: "".join(map(chr, ids)))
    ids = [ord(ch) for ch in full]
    cut = next(i for i in range(1, len(ids) + 1) if stop.done(ids[:i]))
    stopped = full[:cut]
    assert stopped.endswith("\\boxed{ a}")
    assert extract_prediction(stopped) == " a" and extract_prediction(full) == " b"
    import re

    m = re.search(final_box_stop_regex(), full)  # SGLang's rule: the same first box
    assert m is not None and full[: m.end()] == stopped


def test_eval_passes_stop_at_final_box(monkeypatch):
    from megatron_rpt.eval import reasoning
    from megatron_rpt.eval.config import EvalConfig
    from megatron_rpt.eval.models import ResolvedModel
    from megatron_rpt.eval.runner import _reasoning

    seen = []

    def fake_run(engine, eval_set, tokenizer, *, params, **kw):  # noqa: ANN001, ANN202
        seen.append(params.stop_at_final_box)
        raise RuntimeError("stop here")

    monkeypatch.setattr(reasoning, "run_reasoning", fake_run)

    class _Engine:
        def shutdown(self) -> None: ...

    model = ResolvedModel.__new__(ResolvedModel)
    for flag, mode in ((True, "reasoning"), (False, "reasoning"), (True, "completion")):
        with pytest.raises(RuntimeError, match="stop here"):
            _reasoning(model, None, None, None, EvalConfig(stop_at_final_box=flag),
                       PromptConfig(mode=mode), True, lambda *a: _Engine())  # fmt: skip
    assert seen == [True, False, False]
