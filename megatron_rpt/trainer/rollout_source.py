r"""One step's rollouts: contexts -> G responses each -> reward -> GRPO advantages -> a batch.

``RolloutSource.next_batch(step)`` runs on every rank and computes the same batch everywhere:
only its ``generate`` function (the engine fleet, trainer/fleet.py) communicates, returning
every request's completions on every rank. Per sampling round:

1. **sample contexts**: the next ``train.contexts_per_step`` (then: the missing) sample ids
   from the ``ContextSampler``; each becomes a prompt (``data.prompt.context_prompt``: template,
   chat wrapper, reasoning opener; or the context's own ids with ``prompt.mode=completion``);
2. **generate G trajectories**: one ``generate`` call with ``n = rollout.n_samples`` for the
   round's requests (document and position travel with each prompt, for prefix-cache-aware
   scheduling), seeded by ``(run.seed, "rollout", contexts consumed so far)``, so a resumed or retried step
   samples exactly what the uninterrupted one did;
3. **parse and reward** (``reward.scoring.score_group``, the path evaluation uses too): the
   registered reward (``reward.name``) scores the *assistant turn*:
   the reasoning opener the prompt already contains (``prompt.think_opener`` when
   ``prompt.open_think``) followed by the response, so a prefilled ``</think>`` or ``\boxed{``
   counts exactly as if the policy had written it; in completion mode the sampled tokens'
   vocabulary bytes are the prediction;
4. **advantages**: GRPO per group (``loss.advantage_std_normalize``); from step
   ``loss.dynamic_sampling_start_step`` on (with ``loss.dynamic_sampling``) groups whose
   rewards are all equal are dropped and more contexts are sampled until the batch is full
   (``DynamicBatchFiller``; every drawn context counts as consumed).

Every rank draws the same contexts (the sampler is deterministic) and scores the same
completions, so every rank holds the same global batch. Statistics cover every generated
response of the step, before dynamic sampling drops groups.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron_rpt.data.prompt import context_prompt
from megatron_rpt.data.tokens import token_byte_table
from megatron_rpt.data.types import RPTSample
from megatron_rpt.loss.advantages import (
    DynamicBatchFiller,
    dynamic_sampling_active,
    grpo_advantages,
)
from megatron_rpt.reward import RewardTarget
from megatron_rpt.reward.scoring import ResponseReader, score_group
from megatron_rpt.rollout.scheduling import RolloutRequest
from megatron_rpt.rollout.types import Completion, SamplingParams
from megatron_rpt.trainer.batch import RolloutBatch, TrainSequence
from megatron_rpt.trainer.sampler import ContextSampler, derive_seed
from megatron_rpt.trainer.step_batch import StepBatch

if TYPE_CHECKING:
    from megatron_rpt.data.config import PromptConfig
    from megatron_rpt.data.store import SampleStore
    from megatron_rpt.loss.config import LossConfig
    from megatron_rpt.reward.config import RewardConfig
    from megatron_rpt.rollout.config import RolloutConfig

GenerateFn = Callable[[Sequence[RolloutRequest], SamplingParams], list[list[Completion]]]
"""``generate(requests, params)``: ``params.n`` completions per request, in request order."""

logger = logging.getLogger(__name__)


@dataclass
class GRPOGroup:
    """One context and its G scored responses."""

    sample: RPTSample
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float]
    formatted: list[bool]
    """The assistant turn has a parsable prediction (closed reasoning + closed box)."""


class RolloutSource:
    """Contexts -> scored groups -> ``RolloutBatch`` (see the module docstring)."""

    def __init__(
        self,
        store: SampleStore,
        tokenizer: Any,
        sampler: ContextSampler,
        generate: GenerateFn,
        *,
        rollout: RolloutConfig,
        prompt: PromptConfig,
        reward: RewardConfig,
        loss: LossConfig,
        contexts_per_step: int,
        seed: int,
    ) -> None:
        """``store``: the train ``SampleStore``; ``generate``: the engine fleet's (collective)
        generate function. The settings are the run's ``rollout`` (sampling), ``prompt``,
        ``reward``, ``loss`` (advantages, dynamic sampling) configs, ``train.contexts_per_step``
        and ``run.seed``."""
        self.store, self.tokenizer = store, tokenizer
        self.sampler, self.generate = sampler, generate
        self.rollout, self.prompt, self.reward, self.loss = rollout, prompt, reward, loss
        self.contexts_per_step, self.seed = contexts_per_step, seed
        self._token_bytes = None  # completion mode: the policy's byte table, built once

    def after_step(self) -> None:
        """Nothing to do after an optimizer step."""

    def next_batch(self, step: int) -> StepBatch:
        """The global batch of optimizer step ``step`` (0-based; collective through generate)."""
        loss, target = self.loss, self.contexts_per_step
        filler = None
        if dynamic_sampling_active(loss.dynamic_sampling, loss.dynamic_sampling_start_step, step):
            filler = DynamicBatchFiller(
                target,
                max_rounds=loss.dynamic_sampling_max_rounds,
                on_max_rounds=loss.dynamic_sampling_on_max_rounds,
            )
        generated: list[GRPOGroup] = []
        drawn: list[int] = []
        times = {"generate": 0.0, "reward": 0.0}
        need = target
        while True:
            ids = self.sampler.take(need)
            seed = derive_seed(self.seed, "rollout", self.sampler.consumed - need)
            grpo_groups = self._round(ids, seed, times)
            generated += grpo_groups
            drawn += ids
            if filler is None:
                kept = grpo_groups
                break
            filler.add_round(grpo_groups, _rewards_BG(grpo_groups))
            if not filler.need_more():
                kept = filler.finish()
                break
            need = filler.groups_needed
        batch = self._make_batch(kept) if kept else None
        if batch is None:
            logger.warning("step %d: no group with unequal rewards was sampled; skipping it", step)
        record = _statistics(generated, kept, filler, drawn, times, self.sampler)
        lengths = (
            [len(g.prompt_ids) for g in generated],
            [[len(c.token_ids) for c in g.completions] for g in generated],
        )
        return StepBatch(batch, record, lengths)

    def _round(self, ids: list[int], seed: int, times: dict[str, float]) -> list[GRPOGroup]:
        """Prompts of ``ids``, their G responses each, scored."""
        samples = [self.store[i] for i in ids]
        prompts = [self._prompt(s) for s in samples]
        params = self.rollout.sampling_params(seed=seed)
        t0 = time.perf_counter()
        requests = [
            RolloutRequest(s.doc_id, s.position, tuple(p))
            for s, (p, _) in zip(samples, prompts, strict=True)
        ]
        completions = self.generate(requests, params)
        t1 = time.perf_counter()
        grpo_groups = [
            self._score(s, p, opener, c)
            for s, (p, opener), c in zip(samples, prompts, completions, strict=True)
        ]
        times["generate"] += t1 - t0
        times["reward"] += time.perf_counter() - t1
        return grpo_groups

    def _prompt(self, sample: RPTSample) -> tuple[list[int], str]:
        """Prompt ids and the assistant-turn prefix they end with (the reasoning opener)."""
        result = context_prompt(
            sample.context_ids, lambda: self.store.context_text(sample), self.tokenizer,
            self.prompt,
        )  # fmt: skip
        return result.ids, result.opener

    def _score(
        self, sample: RPTSample, prompt_ids: list[int], opener: str, completions: list[Completion]
    ) -> GRPOGroup:
        target = RewardTarget(
            continuation_token_bytes=sample.continuation_token_bytes,
            continuation_ids=tuple(int(t) for t in sample.continuation_ids),
            tokenize=lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"],
        )
        mode = self.prompt.mode
        if mode == "completion" and self._token_bytes is None:
            self._token_bytes = token_byte_table(self.tokenizer)
        reader = ResponseReader.for_prompt(mode, opener, self.tokenizer, self._token_bytes)
        rewards, formatted = score_group(
            completions, target, reader, reward_name=self.reward.name,
            require_think_close=self.reward.require_think_close,
        )  # fmt: skip
        return GRPOGroup(sample, list(prompt_ids), completions, rewards, formatted)

    def _make_batch(self, grpo_groups: Sequence[GRPOGroup]) -> RolloutBatch:
        loss = self.loss
        adv_BG = grpo_advantages(
            _rewards_BG(grpo_groups), std_normalize=loss.advantage_std_normalize, eps=loss.advantage_eps
        )
        sequences = []
        for g_idx, (group, adv_G) in enumerate(zip(grpo_groups, adv_BG.tolist(), strict=True)):
            for comp, adv, reward in zip(group.completions, adv_G, group.rewards, strict=True):
                if not comp.token_ids:
                    continue  # nothing to train on (an engine that returned no token)
                assert comp.logprobs is not None, "EngineGuard.generate checks log-probs"
                sequences.append(
                    TrainSequence(
                        prompt_ids=group.prompt_ids,
                        response_ids=comp.token_ids,
                        rollout_logprobs=comp.logprobs,
                        advantage=adv,
                        group_id=g_idx,
                        reward=reward,
                    )
                )
        return RolloutBatch(sequences)


def _rewards_BG(grpo_groups: Sequence[GRPOGroup]) -> torch.Tensor:
    return torch.tensor([g.rewards for g in grpo_groups], dtype=torch.float32)


def _statistics(
    generated: list[GRPOGroup],
    kept: list[GRPOGroup],
    filler: DynamicBatchFiller | None,
    drawn: list[int],
    times: dict[str, float],
    sampler: ContextSampler,
) -> dict[str, Any]:
    rewards = [r for g in generated for r in g.rewards]
    lengths = [len(c.token_ids) for g in generated for c in g.completions]
    n = max(len(rewards), 1)
    return {
        "rollout/reward_mean": sum(rewards) / n,
        "rollout/accuracy": sum(r == 1.0 for r in rewards) / n,
        "rollout/format_rate": sum(f for g in generated for f in g.formatted) / n,
        "rollout/response_length_mean": sum(lengths) / n,
        "rollout/response_length_max": float(max(lengths, default=0)),
        "rollout/truncated_frac": sum(
            c.finish_reason == "length" for g in generated for c in g.completions
        )
        / n,
        "rollout/groups_sampled": float(len(generated)),
        "rollout/groups_kept": float(len(kept)),
        "rollout/groups_kept_frac": len(kept) / max(len(generated), 1),
        "rollout/rounds": float(filler.rounds if filler is not None else 1),
        "time/generate_s": times["generate"],
        "time/reward_s": times["reward"],
        "data/epoch": float(sampler.epoch),
        "data/cursor": float(sampler.cursor),
        "data/consumed": float(sampler.consumed),
        "data/sample_ids": drawn,
    }


__all__ = ["GenerateFn", "GRPOGroup", "RolloutSource"]
