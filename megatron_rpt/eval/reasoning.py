r"""Next-token reasoning accuracy: sample a chain of thought + a boxed prediction, judge it.

For each evaluated position the context (the last ``context_tokens`` document tokens before t)
becomes a prompt exactly as in training (``data.prompt.context_prompt``: a paper template
v0..v6, chat template, ``<think>`` opener; or, with ``prompt.mode=completion``, the context's own
token ids), any ``RolloutEngine`` samples ``n`` responses, and the judge reward (the paper's
prefix-match by default, ``reward/registry.py``) scores each against the true continuation's
exact token bytes through ``reward.scoring.score_group``, the function training uses: the
reward reads the prompt's opener followed by the response (a prefilled ``</think>`` or
``\boxed{`` counts), and in completion mode the sampled tokens' bytes. Per position:

* **Random@1** = mean reward over the n samples (the accuracy of one random sample);
* **Pass@k** = the unbiased estimator 1 - C(n-c, k) / C(n, k), c = samples with reward 1
  (Chen et al. 2021), defined when n >= k.

Bucket means, counts and Wilson intervals come from ``metrics.summarize``.

Determinism: positions are processed in document order in chunks of ``batch_prompts``; chunk
b is generated with the seed ``derive_seed(seed, b)``. The HF engine draws from one explicit
``torch.Generator`` per call, so a fixed seed, engine, dtype, device and batch settings give
identical numbers. SGLang needs ``rollout.sglang.deterministic_inference`` for that.
Requests inside a chunk are sent grouped by document and position (prefix-cache reuse in
SGLang; results come back in the caller's order).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_rpt.data.config import PromptConfig
from megatron_rpt.data.prompt import context_prompt
from megatron_rpt.data.tokens import token_byte_table
from megatron_rpt.eval.metrics import pass_at_k
from megatron_rpt.reward.next_token import extract_prediction
from megatron_rpt.reward.registry import RewardTarget
from megatron_rpt.reward.scoring import ResponseReader, check_reward_for_mode, score_group
from megatron_rpt.rollout.scheduling import RolloutRequest, generate_in_document_order
from megatron_rpt.rollout.types import Completion, RolloutEngine, SamplingParams

logger = logging.getLogger(__name__)


def derive_seed(seed: int, index: int) -> int:
    """A 31-bit seed for chunk ``index`` of a run seeded with ``seed`` (stable across runs).

    >>> derive_seed(1234, 0) == derive_seed(1234, 0) != derive_seed(1234, 1)
    True
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class ReasoningOutcome:
    """Rewards of every sample, plus what helps read them (format failures, lengths)."""

    rewards_PN: np.ndarray
    """float [P, n]: judge reward of sample j at position i."""
    parsed_PN: np.ndarray
    """bool [P, n]: a prediction could be read (``</think>`` then a closed ``\\boxed{}``)."""
    response_tokens_PN: np.ndarray
    """int [P, n]: generated tokens per sample."""
    finish_reasons: dict[str, int] = field(default_factory=dict)
    """Count of each ``Completion.finish_reason``."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    """The first few samples (context tail, truth, response, prediction, reward)."""
    seconds: float = 0.0

    def random_at_1(self) -> np.ndarray:
        """float [P]: mean reward per position."""
        return self.rewards_PN.mean(axis=1)

    def pass_at(self, k: int) -> np.ndarray | None:
        """float [P]: unbiased Pass@k per position, or None when n < k."""
        n = self.rewards_PN.shape[1]
        if n < k:
            return None
        correct = (self.rewards_PN >= 1.0).sum(axis=1)
        return np.array([pass_at_k(n, int(c), k) for c in correct])

    def diagnostics(self) -> dict[str, Any]:
        """Summary numbers for the report (format failures are most of a weak model's misses)."""
        return {
            "samples": int(self.rewards_PN.size),
            "parsed_fraction": float(self.parsed_PN.mean()) if self.parsed_PN.size else None,
            "mean_response_tokens": float(self.response_tokens_PN.mean())
            if self.response_tokens_PN.size
            else None,
            "finish_reasons": dict(self.finish_reasons),
            "seconds": round(self.seconds, 2),
        }


def run_reasoning(
    engine: RolloutEngine,
    eval_set,  # noqa: ANN001 - dataset.EvalSet
    tokenizer: Any,
    *,
    prompt_cfg: PromptConfig,
    params: SamplingParams,
    judge: str = "prefix_match",
    require_think_close: bool = True,
    batch_prompts: int = 64,
    seed: int = 1234,
    n_examples: int = 3,
) -> ReasoningOutcome:
    """Sample ``params.n`` responses per position of ``eval_set`` and judge them."""
    t0 = time.perf_counter()
    check_reward_for_mode(judge, prompt_cfg.mode)
    token_bytes = None
    if prompt_cfg.mode == "completion":
        token_bytes = token_byte_table(tokenizer)
    n, P = params.n, len(eval_set)
    out = ReasoningOutcome(
        rewards_PN=np.zeros((P, n)),
        parsed_PN=np.zeros((P, n), dtype=bool),
        response_tokens_PN=np.zeros((P, n), dtype=np.int64),
    )
    reasons: collections.Counter[str] = collections.Counter()
    order = np.lexsort((eval_set.position_P, eval_set.doc_P))  # document order
    for b, start in enumerate(range(0, P, batch_prompts)):
        chunk = order[start : start + batch_prompts].tolist()
        prompts = {
            i: context_prompt(
                eval_set.context_ids(i), lambda i=i: eval_set.context_text(i), tokenizer,
                prompt_cfg,
            )  # fmt: skip
            for i in chunk
        }
        requests = [
            RolloutRequest(int(eval_set.doc_P[i]), int(eval_set.position_P[i]), tuple(prompts[i].ids))
            for i in chunk
        ]
        chunk_params = _with_seed(params, derive_seed(seed, b))
        groups = generate_in_document_order(
            lambda prompts, p=chunk_params: engine.generate(prompts, p), requests
        )
        for i, group in zip(chunk, groups, strict=True):
            reader = ResponseReader.for_prompt(
                prompt_cfg.mode, prompts[i].opener, tokenizer, token_bytes
            )
            target = RewardTarget(
                continuation_token_bytes=eval_set.continuation_bytes(i),
                continuation_ids=eval_set.continuation_ids(i).tolist(),
                tokenize=lambda s: tokenizer(s, add_special_tokens=False)["input_ids"],
            )
            rewards, parsed = score_group(
                group, target, reader, reward_name=judge, require_think_close=require_think_close
            )
            out.rewards_PN[i], out.parsed_PN[i] = rewards, parsed
            out.response_tokens_PN[i] = [len(c.token_ids) for c in group]
            reasons.update(c.finish_reason for c in group)
            if len(out.examples) < n_examples:
                out.examples.append(_example(eval_set, i, reader, group[0], rewards[0]))
        logger.info("reasoning: %d / %d positions", min(start + batch_prompts, P), P)
    out.finish_reasons = dict(reasons)
    out.seconds = time.perf_counter() - t0
    return out


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, seed=seed)


def _example(eval_set, i: int, reader: ResponseReader, c: Completion, reward: float) -> dict:  # noqa: ANN001
    if reader.mode == "completion":
        response = pred = reader.prediction_bytes(c).decode("utf-8", "backslashreplace")
    else:
        response = reader.assistant_turn(c)
        pred = extract_prediction(response)
    return {
        "doc_id": eval_set.doc_ids[int(eval_set.doc_P[i])],
        "position": int(eval_set.position_P[i]),
        "context_tail": eval_set.context_text(i)[-200:],
        "true_next_token": eval_set.continuation_bytes(i)[0].decode("utf-8", "backslashreplace"),
        "response": response[-2000:],
        "prediction": pred,
        "reward": float(reward),
    }


__all__ = ["ReasoningOutcome", "derive_seed", "run_reasoning"]
