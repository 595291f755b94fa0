r"""``train.objective=rlp``: RLP's information-gain reward through the RPT loop's machinery.

One step (``RLPSource.next_batch``, on every rank; only ``generate`` communicates):

1. **thoughts** (the engine fleet's ``generate``, results on every rank): the next
   ``train.contexts_per_step`` positions x_t of the prepared data (with
   ``data.train_positions=random_per_document``: one random position per document, RLP's
   protocol); each context x<t becomes the thought prompt (``prompt.template=rlp``: RLP's
   continuation-and-reasoning system message, the context as the user turn, the ``<think>``
   opener) and the engine samples G = ``rollout.n_samples`` thoughts. A thought is the
   response up to and including the token that completes ``rlp.thought_close``
   (``loss.rlp.thought_token_count``); what follows it is dropped.
2. **two scoring passes in the trainer** (Megatron forwards, the training step's
   vocab-parallel log-prob code at temperature 1, no gradient):

   * policy, with thought: ``log p_theta(x_t | x<t, c)`` on ``[x<t ; opener ; c ; x_t]``;
   * EMA teacher phi (trainer/ema.py), no thought: ``log pbar_phi(x_t | x<t)`` on
     ``[x<t ; x_t]``, one per context.

   The reward is their difference (the information gain). Scoring runs in the document's own
   frame: a thought without tokens (after dropping a trailing special token such as EOS) is
   scored with nothing between x<t and x_t, i.e. as the same sequence as the teacher's, so its
   reward is exactly ``log p_theta - log pbar_phi`` of plain next-token prediction (0 while
   phi = theta); a thought earns reward only by what it adds.
3. **advantages** ``G/(G-1) * (r_i - mean r)`` (``loss.rlp.rlp_advantages``); the batch holds
   (thought prompt, thought tokens) pairs, so the clipped surrogate covers thought tokens only;
   ``loss.aggregation=seq_mean_token_mean`` normalises each by its length; no next-token term.

After the optimizer step ``after_step`` updates phi (phi <- tau phi + (1 - tau) theta); the
loop then syncs the engines. The teacher is saved with every checkpoint (``save_state``) and
loaded on resume (``load_state``). The scoring passes' sequence lengths are returned for the
FLOP counter (``RLPStepBatch.scoring_lengths``) and their time is logged (``time/score_s``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_rpt.data.prompt import build_prompt
from megatron_rpt.loss.rlp import information_gain, rlp_advantages, thought_token_count
from megatron_rpt.rollout.scheduling import RolloutRequest
from megatron_rpt.trainer.batch import RolloutBatch, TrainSequence
from megatron_rpt.trainer.ema import EMATeacher
from megatron_rpt.trainer.engine_guard import EngineFailure
from megatron_rpt.trainer.rollout_source import GenerateFn, RolloutSource
from megatron_rpt.trainer.sampler import ContextSampler, derive_seed
from megatron_rpt.trainer.step_batch import StepBatch

if TYPE_CHECKING:
    from megatron_rpt.data.config import PromptConfig
    from megatron_rpt.data.store import SampleStore
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.trainer.rlp_config import RLPConfig
    from megatron_rpt.trainer.step import PolicyTrainer

logger = logging.getLogger(__name__)


@dataclass
class ThoughtGroup:
    """One context, its target token and its G thoughts (what the driver broadcasts)."""

    prompt_ids: list[int]
    """The thought prompt (system message, context, opener)."""
    context_ids: list[int]
    """x<t: the document tokens before the target (the scoring frame)."""
    target_id: int
    """x_t."""
    opener_ids: list[int]
    """Tokens of the opener the prompt ends with (scored before the thought)."""
    thoughts: list[list[int]]
    """Per sample: the thought's token ids (the response cut after ``rlp.thought_close``)."""
    logprobs: list[list[float]]
    """The engine's log-probs of those tokens."""
    scored: list[list[int]]
    """Per sample: the ids scored between x<t and x_t: opener + thought without a trailing
    special token (EOS), or nothing when that leaves no thought token."""
    closed: list[bool]
    """Whether the thought ended with the close marker."""
    response_lengths: list[int]
    """Generated tokens per sample (FLOP accounting: the engine decoded them all)."""


@dataclass
class RLPStepBatch(StepBatch):
    """``StepBatch`` plus the scoring passes' sequence lengths (FLOP accounting)."""

    scoring_lengths: list[int] = field(default_factory=list)


class RLPSource:
    """The RLP batch source (the loop's ``BatchSource``, plus the EMA teacher's hooks)."""

    def __init__(
        self,
        store: SampleStore,
        tokenizer: Any,
        sampler: ContextSampler,
        generate: GenerateFn,
        trainer: PolicyTrainer,
        *,
        rlp: RLPConfig,
        rollout: RolloutConfig,
        prompt: PromptConfig,
        contexts_per_step: int,
        seed: int,
    ) -> None:
        """``store``: the train ``SampleStore``; ``generate``: the engine fleet's (collective)
        generate function; ``train_step`` scores the thoughts. The settings are the run's
        ``rlp``, ``rollout`` (sampling), ``prompt`` configs, ``train.contexts_per_step`` and
        ``run.seed``."""
        self.store, self.tokenizer = store, tokenizer
        self.sampler, self.generate, self.trainer = sampler, generate, trainer
        self.rlp, self.rollout, self.prompt = rlp, rollout, prompt
        self.contexts_per_step, self.seed = contexts_per_step, seed
        g = trainer.groups
        # The teacher file of a (TP, PP) coordinate has one writer: DP rank 0 of CP rank 0
        # (context-parallel ranks hold the same weights, like data-parallel ones).
        self.teacher = EMATeacher(
            trainer.model_modules, rlp.ema_decay,
            tp_rank=g.tp_rank, pp_rank=g.pp_rank, dp_rank=g.dp_rank * g.cp_size + g.cp_rank,
        )  # fmt: skip

    @classmethod
    def wrap(cls, source: RolloutSource, trainer: PolicyTrainer, rlp: RLPConfig) -> RLPSource:
        """Reuse an RPT ``RolloutSource``'s store, tokenizer, sampler, engines and settings."""
        return cls(
            source.store, source.tokenizer, source.sampler, source.generate, trainer, rlp=rlp,
            rollout=source.rollout, prompt=source.prompt,
            contexts_per_step=source.contexts_per_step, seed=source.seed,
        )  # fmt: skip

    # ------------------------------------------------------------------ loop interface

    def after_step(self) -> None:
        """After the optimizer step, before the weight sync: the EMA teacher update."""
        self.trainer.finish_param_sync()
        self.teacher.update()

    def save_state(self, checkpoint_dir: Path) -> None:
        """Write the EMA teacher into a checkpoint being saved (every rank)."""
        self.teacher.save(checkpoint_dir)

    def load_state(self, state: Any) -> None:
        """Read the EMA teacher from the checkpoint a run resumes from (a ``TrainerState``)."""
        self.teacher.load(state.root)

    def next_batch(self, step: int) -> RLPStepBatch:
        """The step's global batch (every rank; collective through ``generate``)."""
        if not self.teacher.initialized:  # RLP: phi <- theta on the first batch
            self.trainer.finish_param_sync()
            self.teacher.initialize()
        grpo_groups, record = self._generate()
        t0 = time.perf_counter()
        scored_BG, teacher_B, lengths = score_thoughts(self.trainer, self.teacher, grpo_groups)
        record["time/score_s"] = time.perf_counter() - t0
        rewards_BG, batch = thought_batch(grpo_groups, scored_BG, teacher_B)
        record.update(_statistics(grpo_groups, scored_BG, teacher_B, rewards_BG))
        flops = ([len(g.prompt_ids) for g in grpo_groups], [g.response_lengths for g in grpo_groups])
        return RLPStepBatch(batch, record, flops, lengths)

    # ------------------------------------------------------------------ driver

    def _generate(self) -> tuple[list[ThoughtGroup], dict[str, Any]]:
        n = self.contexts_per_step
        ids = self.sampler.take(n)
        seed = derive_seed(self.seed, "rollout", self.sampler.consumed - n)
        samples = [self.store[i] for i in ids]
        prompts = [
            build_prompt(self.store.context_text(s), self.tokenizer, self.prompt) for s in samples
        ]
        requests = [
            RolloutRequest(s.doc_id, s.position, tuple(p.ids))
            for s, p in zip(samples, prompts, strict=True)
        ]
        params = self.rollout.sampling_params(seed=seed)
        t0 = time.perf_counter()
        completions = self.generate(requests, params)
        t1 = time.perf_counter()
        grpo_groups = [
            self._group(s, p, c) for s, p, c in zip(samples, prompts, completions, strict=True)
        ]
        record = {
            "time/generate_s": t1 - t0,
            "data/epoch": float(self.sampler.epoch),
            "data/cursor": float(self.sampler.cursor),
            "data/consumed": float(self.sampler.consumed),
            "data/sample_ids": ids,
        }
        return grpo_groups, record

    def _group(self, sample: Any, prompt: Any, completions: list[Any]) -> ThoughtGroup:
        pc, close = self.prompt, self.rlp.thought_close
        opener = pc.think_opener if pc.open_think and prompt.text.endswith(pc.think_opener) else ""
        opener_ids = self._tokenize(opener) if opener else []
        special = set(self.tokenizer.all_special_ids)
        thoughts, logprobs, scored, closed = [], [], [], []
        for c in completions:
            if c.logprobs is None:
                raise EngineFailure("the engine returned no log-probs (return_logprobs)")
            k = thought_token_count(c.token_ids, self._decode, close)
            thought = list(c.token_ids[:k])
            thoughts.append(thought)
            logprobs.append(list(c.logprobs[:k]))
            body = thought[:-1] if thought and thought[-1] in special else thought
            scored.append(opener_ids + body if body else [])  # no thought: nothing in between
            closed.append(bool(close) and close in self._decode(thought))
        return ThoughtGroup(
            prompt_ids=list(prompt.ids),
            context_ids=[int(t) for t in sample.context_ids],
            target_id=int(sample.continuation_ids[0]),
            opener_ids=opener_ids,
            thoughts=thoughts,
            logprobs=logprobs,
            scored=scored,
            closed=closed,
            response_lengths=[len(c.token_ids) for c in completions],
        )

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: Any) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def score_thoughts(
    trainer: Any, teacher: EMATeacher, grpo_groups: list[ThoughtGroup]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The two scoring passes (collective; every rank gets the same values).

    Returns ``[B, G]`` log p_theta(x_t | x<t, c), ``[B]`` log pbar_phi(x_t | x<t) (both at
    temperature 1) and the token counts of every scored sequence (FLOP accounting).
    """
    with_thought = [
        _scoring_sequence(g.context_ids + block, g.target_id, b)
        for b, g in enumerate(grpo_groups)
        for block in g.scored
    ]
    no_thought = [_scoring_sequence(g.context_ids, g.target_id, b) for b, g in enumerate(grpo_groups)]
    scored = trainer.compute_logprobs(RolloutBatch(with_thought), temperature=1.0)
    trainer.finish_param_sync()
    with teacher.swapped_in():
        baseline = trainer.compute_logprobs(RolloutBatch(no_thought), temperature=1.0)
    scored_BG = torch.stack([lp[0] for lp in scored]).reshape(len(grpo_groups), -1)
    teacher_B = torch.stack([lp[0] for lp in baseline])
    lengths = [s.num_tokens for s in with_thought + no_thought]
    return scored_BG, teacher_B, lengths


def _scoring_sequence(prefix: list[int], target: int, group: int) -> TrainSequence:
    """``[prefix ; target]``: the log-prob of ``target`` after ``prefix``."""
    return TrainSequence(
        prompt_ids=prefix, response_ids=[target], rollout_logprobs=[0.0], advantage=0.0,
        group_id=group,
    )  # fmt: skip


def _make_batch(
    grpo_groups: list[ThoughtGroup], rewards_BG: torch.Tensor, advantages_BG: torch.Tensor
) -> RolloutBatch | None:
    """(thought prompt, thought) pairs with their advantages; empty thoughts are skipped."""
    sequences = [
        TrainSequence(
            prompt_ids=g.prompt_ids, response_ids=thought, rollout_logprobs=lp,
            advantage=float(advantages_BG[b, i]), group_id=b, reward=float(rewards_BG[b, i]),
        )  # fmt: skip
        for b, g in enumerate(grpo_groups)
        for i, (thought, lp) in enumerate(zip(g.thoughts, g.logprobs, strict=True))
        if thought
    ]
    return RolloutBatch(sequences) if sequences else None


def thought_batch(
    grpo_groups: list[ThoughtGroup], scored_BG: torch.Tensor, teacher_B: torch.Tensor
) -> tuple[torch.Tensor, RolloutBatch | None]:
    """Rewards ``[B, G]`` (information gain) and the policy batch with RLP's advantages."""
    rewards_BG = information_gain(scored_BG, teacher_B[:, None].expand_as(scored_BG))
    return rewards_BG, _make_batch(grpo_groups, rewards_BG, rlp_advantages(rewards_BG))


def _statistics(
    grpo_groups: list[ThoughtGroup],
    scored_BG: torch.Tensor,
    teacher_B: torch.Tensor,
    rewards_BG: torch.Tensor,
) -> dict[str, float]:
    lengths = [len(t) for g in grpo_groups for t in g.thoughts]
    n = max(len(lengths), 1)
    return {
        "rollout/reward_mean": float(rewards_BG.mean()),
        "rollout/reward_std": float(rewards_BG.std()) if rewards_BG.numel() > 1 else 0.0,
        "rlp/info_gain_mean": float(rewards_BG.mean()),
        "rlp/info_gain_max": float(rewards_BG.max()),
        "rlp/positive_gain_frac": float((rewards_BG > 0).float().mean()),
        "rlp/logprob_with_thought": float(scored_BG.mean()),
        "rlp/logprob_teacher": float(teacher_B.mean()),
        "rlp/thought_closed_frac": sum(c for g in grpo_groups for c in g.closed) / n,
        "rollout/response_length_mean": sum(lengths) / n,
        "rollout/response_length_max": float(max(lengths, default=0)),
        "rollout/groups_sampled": float(len(grpo_groups)),
    }


__all__ = ["RLPSource", "RLPStepBatch", "ThoughtGroup", "score_thoughts", "thought_batch"]
