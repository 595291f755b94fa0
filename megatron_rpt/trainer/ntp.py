"""The plain next-token-prediction (NTP) control: continued pretraining on the same data.

``train.objective=ntp`` trains the same model, with the same optimizer, checkpoints and
export, on the **train-split documents** of the same prepared directory, cut into windows of
``data.context_tokens`` tokens, with ordinary cross-entropy. It is the baseline the paper
compares RPT against (docs/METHOD.md §8; docs/EVAL.md).

It runs through the RPT training step unchanged. A window ``x_0..x_{W-1}`` becomes a
``TrainSequence`` with prompt ``x_0``, response ``x_1..x_{W-1}``, advantage 1 on every token
and no old log-probs (exactly on-policy, ratio 1), and the step's temperature is 1. The
clipped surrogate's gradient at ratio 1 is ``-A * grad log p``, so with ``A = 1`` and the
token-mean aggregation the loss gradient is exactly that of the mean cross-entropy over the
batch's predicted tokens (checked in tests/unit/test_trainer_ntp.py). Consecutive windows of a
document overlap by one token, so every token but a document's first is predicted exactly once
per epoch. The order of windows is a ``ContextSampler`` over all windows (resumable, like the
RPT contexts).

The rollout log-probs a ``TrainSequence`` carries are zeros. The training step's mismatch
metric ``train_rollout_logprob_abs_diff`` (mean ``|log p - 0|`` over the predicted tokens) is
then exactly the mean cross-entropy, and ``ntp_metrics`` reports it as ``train/loss`` (the
policy-gradient surrogate itself is always -1 at ratio 1 and says nothing), with
``train/perplexity``; the other mismatch metrics have no meaning here and are dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_rpt.errors import DataError
from megatron_rpt.trainer.batch import RolloutBatch, TrainSequence
from megatron_rpt.trainer.sampler import ContextSampler
from megatron_rpt.trainer.step_batch import StepBatch


class NTPWindows:
    """Windows of ``window_tokens`` tokens over the train-split documents of a prepared dir.

    Memory is O(documents): window ``i`` is located by a binary search over the cumulative
    window counts of the documents.
    """

    def __init__(self, prepared_dir: str | Path, window_tokens: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if window_tokens < 2:
            raise DataError(f"data.context_tokens={window_tokens}: NTP windows need >= 2 tokens")
        prepared_dir = Path(prepared_dir)
        self.window = window_tokens
        self.tokens = IndexedDataset(str(prepared_dir / "tokens"), mmap=True)
        records = [
            json.loads(line) for line in open(prepared_dir / "documents.jsonl", encoding="utf-8")
        ]
        lengths = self.tokens.sequence_lengths
        self.docs = np.array(
            [
                r["doc_index"]
                for r in records
                if r["split"] == "train" and lengths[r["doc_index"]] >= 2
            ],
            dtype=np.int64,
        )
        stride = window_tokens - 1
        counts = (lengths[self.docs].astype(np.int64) - 1 + stride - 1) // stride
        self.cumulative = np.concatenate([[0], np.cumsum(counts)])
        if len(self) == 0:
            raise DataError(f"{prepared_dir}: no train-split document with >= 2 tokens")

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        """int64 [<= W] token ids of window ``index``."""
        k = int(np.searchsorted(self.cumulative, index, side="right")) - 1
        doc = int(self.docs[k])
        start = (index - int(self.cumulative[k])) * (self.window - 1)
        n = int(self.tokens.sequence_lengths[doc])
        length = min(self.window, n - start)
        return np.asarray(self.tokens.get(doc, offset=start, length=length), dtype=np.int64)


class NTPSource:
    """Batches of ``train.contexts_per_step`` windows (every rank computes the same)."""

    def __init__(self, windows: NTPWindows, sampler: ContextSampler, contexts_per_step: int):
        """Draw ``contexts_per_step`` windows per step from ``sampler`` (over ``windows``)."""
        self.windows, self.sampler, self.n = windows, sampler, contexts_per_step

    def after_step(self) -> None:
        """Nothing to do after an optimizer step."""

    def next_batch(self, step: int) -> StepBatch:
        """The step's windows as a batch, with its data record (no communication)."""
        ids = self.sampler.take(self.n)
        sequences = []
        for g, i in enumerate(ids):
            tokens = torch.from_numpy(self.windows[i])
            sequences.append(
                TrainSequence(
                    prompt_ids=tokens[:1],
                    response_ids=tokens[1:],
                    rollout_logprobs=torch.zeros(tokens.numel() - 1),
                    advantage=1.0,
                    group_id=g,
                )
            )
        record = {
            "data/epoch": float(self.sampler.epoch),
            "data/cursor": float(self.sampler.cursor),
            "data/consumed": float(self.sampler.consumed),
            "data/sample_ids": ids,
        }
        return StepBatch(RolloutBatch(sequences), record, ([], []))


def ntp_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """A step record with ``train/loss`` = mean cross-entropy (see the module docstring)."""
    out = {
        k: v
        for k, v in record.items()
        if not k.startswith(("train/train_rollout", "train/token_mult_prob_error"))
    }
    cross_entropy = record.get("train/train_rollout_logprob_abs_diff")
    if cross_entropy is not None:
        out["train/pg_surrogate"] = record.get("train/loss")
        out["train/loss"] = cross_entropy
        out["train/perplexity"] = math.exp(min(cross_entropy, 50.0))
    return out


__all__ = ["NTPSource", "NTPWindows", "ntp_metrics"]
